"""Face blurring: the face region loses detail and is no longer found, every pixel outside the
grown boxes stays bit-identical, and resizing for the subset keeps the boxes in register."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from aim_kedro.curation.blur import (
    blur_and_resize,
    blur_faces,
    grown_boxes,
    resize_shorter_side,
    scale_boxes,
)
from aim_kedro.curation.faces import box_iou, make_detector

ASTRONAUT_FACE = (175, 65, 273, 163)  # what the default detector returns for skimage's astronaut
# Blur strength used where a detector must no longer fire. DataComp's 0.1 (the default) leaves
# the face findable by a Haar cascade in about 1 in 9 pasted LFW faces and in the astronaut; 0.15
# removed all of them in our measurements.
SIGMA_UNFINDABLE = 0.15


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def grace_hopper() -> Image.Image:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module")
def detector():
    return make_detector()


def _outside_mask(size: tuple[int, int], boxes) -> np.ndarray:
    outside = np.ones((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    return outside


def _laplacian_energy(image: Image.Image, box) -> float:
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    x0, y0, x1, y1 = box
    return float(np.abs(cv2.Laplacian(gray, cv2.CV_64F)[y0:y1, x0:x1]).mean())


def test_grown_boxes_grow_by_a_tenth_of_the_longer_side():
    assert grown_boxes([(20, 30, 40, 80)], (200, 200)) == [(15, 25, 45, 85)]
    assert grown_boxes([(20, 30, 40, 80)], (200, 200), grow=0.0) == [(20, 30, 40, 80)]


def test_grown_boxes_clip_to_the_image():
    assert grown_boxes([(2, 3, 50, 40)], (52, 60)) == [(0, 0, 52, 45)]
    assert grown_boxes([(-10, -10, 70, 70)], (64, 48)) == [(0, 0, 64, 48)]
    assert grown_boxes([(100, 100, 120, 120)], (64, 64)) == []  # wholly outside: dropped


def test_pixels_outside_the_grown_boxes_are_bit_identical(astronaut):
    boxes = [ASTRONAUT_FACE, (400, 20, 460, 90), (0, 480, 40, 512)]
    out = blur_faces(astronaut, boxes)
    grown = grown_boxes(boxes, astronaut.size)
    outside = _outside_mask(astronaut.size, grown)
    before, after = np.asarray(astronaut), np.asarray(out)
    assert out.size == astronaut.size and out.mode == "RGB"
    assert np.array_equal(before[outside], after[outside])
    assert not np.array_equal(before[~outside], after[~outside])


def test_face_loses_high_frequency_detail(astronaut):
    out = blur_faces(astronaut, [ASTRONAUT_FACE])
    before = _laplacian_energy(astronaut, ASTRONAUT_FACE)
    after = _laplacian_energy(out, ASTRONAUT_FACE)
    assert after < 0.25 * before, (before, after)


def test_matches_a_whole_image_blur_inside_the_grown_box():
    """The cropped computation equals DataComp's whole-image recipe, with the mask cut at the box."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    box = (50, 4, 78, 30)  # near two edges, so border handling matters
    out = np.asarray(blur_faces(image, [box])).astype(np.float64)
    src = np.asarray(image).astype(np.float32)
    sigma = 0.1 * 28
    ksize = 2 * int(np.ceil(4 * sigma)) + 1
    blurred = cv2.GaussianBlur(src, (ksize, ksize), sigma)
    gx0, gy0, gx1, gy1 = grown_boxes([box], image.size)[0]
    mask = np.zeros(src.shape[:2], np.float32)
    mask[gy0:gy1, gx0:gx1] = 1
    mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
    clipped = np.zeros_like(mask)
    clipped[gy0:gy1, gx0:gx1] = mask[gy0:gy1, gx0:gx1]
    expected = src * (1 - clipped[..., None]) + blurred * clipped[..., None]
    assert np.abs(out - expected).max() <= 1.0


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_detector_no_longer_finds_a_blurred_face(detector, name, request):
    image = request.getfixturevalue(name).resize((256, 256), Image.Resampling.BICUBIC)
    boxes = detector.detect(image)
    assert boxes, "the detector must find the face before blurring"
    out = blur_faces(image, boxes, sigma_factor=SIGMA_UNFINDABLE)
    again = detector.detect(out)
    assert not any(box_iou(a, b) > 0 for a in again for b in boxes), again


def _pasted_lfw_faces(n: int, seed: int) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """LFW face crops upscaled to 32-48 px and pasted into 64 px crops of the coffee photo."""
    rng = np.random.default_rng(seed)
    faces = skimage.data.lfw_subset()[:100]
    coffee = skimage.data.coffee()
    out = []
    for i in rng.choice(100, n, replace=False):
        y, x = int(rng.integers(0, 200)), int(rng.integers(0, 400))
        scene = np.array(Image.fromarray(coffee[y : y + 200, x : x + 200]).resize((64, 64)))
        side = int(rng.integers(32, 49))
        face = Image.fromarray((faces[i] * 255).astype(np.uint8)).resize((side, side))
        fx, fy = (int(v) for v in rng.integers(0, 64 - side + 1, 2))
        scene[fy : fy + side, fx : fx + side] = np.asarray(face)[..., None]
        out.append((Image.fromarray(scene), (fx, fy, fx + side, fy + side)))
    return out


def test_detector_no_longer_finds_blurred_lfw_faces(detector):
    scenes = _pasted_lfw_faces(30, seed=5)
    checked = still_found = 0
    for image, truth in scenes:
        boxes = [b for b in detector.detect(image) if box_iou(b, truth) >= 0.3]
        if not boxes:
            continue
        checked += 1
        again = detector.detect(blur_faces(image, boxes, sigma_factor=SIGMA_UNFINDABLE))
        still_found += any(box_iou(a, truth) > 0 for a in again)
    assert checked >= 20
    assert still_found == 0, f"{still_found}/{checked} faces still found after blurring"


def test_no_boxes_returns_an_equal_copy(astronaut):
    out = blur_faces(astronaut, [])
    assert out is not astronaut
    assert np.array_equal(np.asarray(out), np.asarray(astronaut))


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_keeps_gray_and_rgba_modes(astronaut, mode):
    image = astronaut.convert(mode)
    out = blur_faces(image, [ASTRONAUT_FACE])
    assert out.mode == mode
    outside = _outside_mask(image.size, grown_boxes([ASTRONAUT_FACE], image.size))
    assert np.array_equal(np.asarray(out)[outside], np.asarray(image)[outside])


def test_palette_images_come_back_rgb(astronaut):
    out = blur_faces(astronaut.convert("P"), [ASTRONAUT_FACE])
    assert out.mode == "RGB"


def test_bad_sigma_and_grow_raise():
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="sigma_factor"):
        blur_faces(image, [(1, 1, 10, 10)], sigma_factor=0)
    with pytest.raises(ValueError, match="grow"):
        blur_faces(image, [(1, 1, 10, 10)], grow=-0.1)


def test_resize_shorter_side(grace_hopper):
    assert grace_hopper.size == (512, 600)
    assert resize_shorter_side(grace_hopper, 64).size == (64, 75)
    wide = Image.new("RGB", (300, 100))
    assert resize_shorter_side(wide, 50).size == (150, 50)
    assert resize_shorter_side(wide, 200).size == (600, 200)
    assert resize_shorter_side(wide, 200, only_if_bigger=True).size == (300, 100)


def test_scale_boxes_rounds_outwards_and_clips():
    assert scale_boxes([(100, 50, 200, 150)], (400, 200), (100, 50)) == [(25, 12, 50, 38)]
    assert scale_boxes([(0, 0, 400, 200)], (400, 200), (64, 32)) == [(0, 0, 64, 32)]
    assert scale_boxes([(1, 1, 3, 3)], (400, 200), (64, 32)) == [(0, 0, 1, 1)]


def test_blur_and_resize_blurs_at_full_resolution(astronaut):
    out, boxes = blur_and_resize(astronaut, [ASTRONAUT_FACE], shorter_side=64)
    expected = resize_shorter_side(blur_faces(astronaut, [ASTRONAUT_FACE]), 64)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert boxes == scale_boxes([ASTRONAUT_FACE], (512, 512), (64, 64))
    assert box_iou(boxes[0], tuple(v / 8 for v in ASTRONAUT_FACE)) > 0.8
