"""Verification of copy candidates: local features + RANSAC, border trimming, luminance only
for greyscale, and distinct images (little-overlapping crops, other pictures) kept apart."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scene_picture
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from aim_kedro.curation.borders import border_box, trim_borders
from aim_kedro.curation.verify import (
    VerifyConfig,
    VerifyStats,
    prepare,
    verify_candidates,
    verify_pair,
)

CFG = VerifyConfig(min_coverage=0.0, min_correlation=0.5)  # the real-pool values of conf/base


def _letterbox(image: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (image.width, int(image.height * 1.5)), (0, 0, 0))
    canvas.paste(image, (0, image.height // 4))
    return canvas


def _overlay(image: Image.Image) -> Image.Image:
    out = image.copy()
    ImageDraw.Draw(out).text((10, 10), "COPY " * 4, fill=(255, 255, 255))
    return out


COPIES = {
    "crop 19%": lambda im: im.crop((0, 0, int(im.width * 0.9), int(im.height * 0.9))),
    "letterbox": _letterbox,
    "padding": lambda im: ImageOps.expand(im, border=40, fill=(255, 0, 255)),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
    "brightness +25%": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "contrast -25%": lambda im: ImageEnhance.Contrast(im).enhance(0.75),
    "rotation 4 deg": lambda im: im.rotate(4, resample=Image.Resampling.BILINEAR),
    "text overlay": _overlay,
    "downscale": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
}


@pytest.mark.parametrize("family", sorted(COPIES))
def test_copies_are_verified(family: str) -> None:
    original = scene_picture(1)
    verdict = verify_pair(prepare(original, CFG), prepare(COPIES[family](original), CFG), CFG)
    assert verdict.copy, (family, verdict)


def test_distinct_images_stay_distinct() -> None:
    photo = scene_picture(2, 384)
    left, right = photo.crop((0, 0, 210, 384)), photo.crop((174, 0, 384, 384))  # 17% overlap
    assert not verify_pair(prepare(left, CFG), prepare(right, CFG), CFG).copy
    other = scene_picture(3)
    assert not verify_pair(prepare(scene_picture(1), CFG), prepare(other, CFG), CFG).copy
    # the same layout recoloured is a look-alike, not a copy, when both sides have colour
    recoloured = Image.fromarray(np.asarray(scene_picture(1))[..., ::-1].copy())
    assert not verify_pair(prepare(scene_picture(1), CFG), prepare(recoloured, CFG), CFG).copy


def test_borders_are_trimmed() -> None:
    picture = scene_picture(4, 128)
    boxed = _letterbox(picture)
    left, top, right, bottom = border_box(boxed)
    assert (left, right) == (0, 128) and abs(top - 32) <= 1 and abs(bottom - 160) <= 1
    assert trim_borders(picture).size == picture.size  # nothing to trim
    framed = ImageOps.expand(ImageOps.expand(picture, 6, (255, 255, 255)), 20, (0, 0, 255))
    assert abs(trim_borders(framed).width - 128) <= 2  # two passes: the pad, then the margin


def test_verify_candidates_skips_joined_pairs_and_counts() -> None:
    images = {0: scene_picture(1), 1: COPIES["greyscale"](scene_picture(1)), 2: scene_picture(5),
              3: None}

    def load(rows):
        for row in rows:
            yield row, images[row]

    stats = VerifyStats()
    pairs = np.array([0, 0, 1, 2]), np.array([1, 2, 2, 3])
    out = list(verify_candidates(*pairs, load, None, CFG, joined=lambda a, b: (a, b) == (1, 2),
                                 stats=stats))
    assert [(a, b) for a, b, _ in out] == [(0, 1), (0, 2), (2, 3)]
    assert [v.copy for _, _, v in out] == [True, False, False]
    assert out[2][2].kind == "undecodable" and stats.skipped == 1 and stats.images_missing == 1


def test_bad_verify_settings_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"curation\.dedup\.verify\.features"):
        VerifyConfig(features="surf")
    with pytest.raises(ValueError, match=r"curation\.dedup\.verify\.min_inliers"):
        VerifyConfig(min_inliers=1)
    with pytest.raises(ValueError, match="unknown"):
        VerifyConfig.from_dict({"min_inlier": 3})
