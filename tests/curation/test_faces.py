"""Face detector: finds real faces (astronaut, Grace Hopper, LFW faces pasted into scenes), stays
quiet on face-free crops, maps boxes back to the input image, and fails clearly on bad config."""

from __future__ import annotations

import pickle

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from aim_kedro.curation.faces import (
    FaceDetector,
    HaarCascadeDetector,
    NoFaceDetector,
    box_iou,
    make_detector,
    rotated,
    sidecar_boxes,
    unrotate,
)
from aim_kedro.curation.faces_dlib import DlibCnnDetector

# Face boxes read off the images (forehead to chin, ear to ear).
ASTRONAUT_FACE = (170, 45, 285, 170)
GRACE_HOPPER_FACE = (165, 135, 355, 330)
BACKGROUNDS = ("coffee", "rocket", "brick", "grass", "gravel", "chelsea")


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]


def _crop(rng: np.random.Generator, array: np.ndarray, size: int) -> np.ndarray:
    height, width = array.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(height, width))
    y = int(rng.integers(0, height - side + 1))
    x = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(_rgb(array[y : y + side, x : x + side]))
    return np.array(crop.resize((size, size), Image.Resampling.BICUBIC))


def pasted_lfw(indices: range, seed: int, scene: int = 64, lo: int = 32, hi: int = 48):
    """LFW 25x25 crops upscaled to lo..hi px, tinted, pasted at random places into scene crops."""
    rng = np.random.default_rng(seed)
    lfw = skimage.data.lfw_subset()
    backgrounds = [getattr(skimage.data, name)() for name in BACKGROUNDS]
    out = []
    for k, i in enumerate(indices):
        scene_px = _crop(rng, backgrounds[k % len(backgrounds)], scene)
        side = int(rng.integers(lo, hi + 1))
        face = Image.fromarray((lfw[i] * 255).astype(np.uint8))
        face = np.asarray(face.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
        tint = rng.uniform(0.7, 1.0, 3)
        x = int(rng.integers(0, scene - side + 1))
        y = int(rng.integers(0, scene - side + 1))
        scene_px[y : y + side, x : x + side] = np.clip(face[..., None] * tint, 0, 255)
        out.append((Image.fromarray(scene_px), (x, y, x + side, y + side)))
    return out


def face_free(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    """Crops of coffee, rocket, chelsea (a cat) and coins, and coloured digits drawn large."""
    rng = np.random.default_rng(seed)
    sources = [skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea(),
               skimage.data.coins()]
    font = ImageFont.load_default(size=size * 3 // 4)
    out = []
    for k in range(n):
        if k % 5 == 4:
            colours = rng.integers(0, 256, (2, 3))
            image = Image.new("RGB", (size, size), tuple(int(c) for c in colours[0]))
            ImageDraw.Draw(image).text((size // 4, 0), str(k % 10), font=font,
                                       fill=tuple(int(c) for c in colours[1]))
            out.append(image)
        else:
            out.append(Image.fromarray(_crop(rng, sources[k % 5], size)))
    return out


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return make_detector("opencv_haar")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def astronaut_256(astronaut) -> Image.Image:
    return astronaut.resize((256, 256), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def grace_hopper() -> Image.Image:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def _hit(boxes, truth, threshold: float = 0.3) -> bool:
    return any(box_iou(box, truth) >= threshold for box in boxes)


def test_default_detector_is_the_cnn_and_each_kind_is_a_face_detector(detector):
    assert isinstance(make_detector(), DlibCnnDetector)
    assert isinstance(detector, FaceDetector)
    assert isinstance(detector, HaarCascadeDetector)


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_finds_the_face_in_photos(detector, name, request):
    image = request.getfixturevalue(name)
    truth = ASTRONAUT_FACE if name == "astronaut" else GRACE_HOPPER_FACE
    boxes = detector.detect(image)
    assert _hit(boxes, truth), boxes
    assert len(boxes) == 1, boxes


def test_boxes_map_back_from_the_upscaled_frame(detector, astronaut):
    small = astronaut.resize((64, 64), Image.Resampling.BICUBIC)
    boxes = detector.detect(small)
    truth = tuple(v / 8 for v in ASTRONAUT_FACE)
    assert _hit(boxes, truth), boxes
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert all(isinstance(v, int) for v in (x0, y0, x1, y1))


def test_finds_lfw_faces_pasted_into_64px_scenes(detector):
    scenes = pasted_lfw(range(0, 100, 2), seed=0)
    found = sum(_hit(detector.detect(image), box) for image, box in scenes)
    assert found >= 45, f"{found}/50"  # measured 49/50


def test_finds_faces_that_fill_the_frame(detector):
    lfw = skimage.data.lfw_subset()
    images = [Image.fromarray((lfw[i] * 255).astype(np.uint8)).convert("RGB").resize((64, 64))
              for i in range(1, 100, 4)]
    found = sum(_hit(detector.detect(image), (0, 0, 64, 64)) for image in images)
    assert found >= 22, f"{found}/25"  # measured 25/25; padding the frame makes these findable


def test_few_boxes_on_face_free_images(detector):
    images = face_free(60, seed=1) + [im for im, _ in pasted_lfw(range(100, 200, 5), seed=3)]
    boxes = sum(len(detector.detect(image)) for image in images)
    assert boxes <= 2, f"{boxes} boxes on {len(images)} face-free images"  # measured 0


def test_other_cascades_and_profile_from_params(astronaut_256):
    params = {"kind": "opencv_haar", "cascades": ["frontalface_alt", "profileface"],
              "min_neighbors": 4, "detect_size": 96}
    det = make_detector(**params)
    assert det.cascades == ("frontalface_alt", "profileface")
    boxes = det.detect(astronaut_256)
    assert _hit(boxes, tuple(v / 2 for v in ASTRONAUT_FACE)), boxes


def test_detector_pickles_for_workers(detector, astronaut_256):
    boxes = detector.detect(astronaut_256)  # loads the cascade
    clone = pickle.loads(pickle.dumps(detector))
    assert clone.detect(astronaut_256) == boxes


def test_grayscale_input(detector, astronaut_256):
    boxes = detector.detect(astronaut_256.convert("L"))
    assert _hit(boxes, tuple(v / 2 for v in ASTRONAUT_FACE)), boxes


def test_sidecar_boxes_are_datacomp_fractions():
    assert sidecar_boxes([[0.1, 0.2, 0.5, 0.6]], (200, 100)) == [(20, 20, 100, 60)]
    assert sidecar_boxes([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.9]], (10, 10)) == [(0, 0, 10, 10)]
    assert sidecar_boxes(None, (10, 10)) == []
    with pytest.raises(ValueError, match=r"face_bboxes: \[12.0, 3.0, 40.0, 50.0\].*fractions"):
        sidecar_boxes([[12.0, 3.0, 40.0, 50.0]], (64, 64))


def test_rotated_and_back_bound_the_same_region():
    array = np.zeros((60, 100), np.uint8)
    array[20:30, 40:70] = 255
    for angle in (-30.0, 25.0, 90.0):
        turned, inverse = rotated(array, angle)
        assert turned.shape[0] >= 60 and turned.shape[1] >= 60
        ys, xs = np.nonzero(turned > 127)
        rect = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1))
        (x, y, w, h), = unrotate([rect], inverse)
        assert x <= 41 and y <= 21 and x + w >= 69 and y + h >= 29, (angle, x, y, w, h)
        assert w * h <= 5 * 30 * 10 < turned.size  # the bar (up to two bounding boxes), not the canvas


def test_none_kind_finds_nothing(astronaut):
    det = make_detector("none")
    assert isinstance(det, NoFaceDetector)
    assert det.detect(astronaut) == []


def test_onnx_missing_path_raises_clearly(tmp_path):
    missing = tmp_path / "yunet.onnx"
    with pytest.raises(FileNotFoundError, match="'path'.*yunet.onnx"):
        make_detector("onnx", path=str(missing))
    with pytest.raises(ValueError, match="needs option 'path'"):
        make_detector("onnx")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"kind": "mtcnn"}, "kind 'mtcnn' is unknown"),
        ({"scale": 1.1}, r"no option\(s\) \['scale'\]"),
        ({"kind": "opencv_haar", "scale_factor": 1.0}, "scale_factor must be > 1"),
        ({"kind": "opencv_haar", "cascades": ["frontalface_nope"]}, "cascades: 'frontalface_nope'"),
        ({"kind": "opencv_haar", "detect_size": 256, "max_detect_size": 128}, "max_detect_size"),
        ({"kind": "opencv_haar", "pad": 2.0}, "pad must be in"),
    ],
)
def test_bad_params_name_the_option(params, match):
    with pytest.raises(ValueError, match=match):
        make_detector(**params)
