"""The face stage around the detector: the policy for images the detector cannot check (blur
the whole image, drop it, keep it), DataComp-style sidecar boxes (union, replace, ignore), and
the blur check of the written subset (the detector run again where faces were blurred)."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest
import skimage.data
from PIL import Image

from aim_kedro.curation.face_stage import FacePolicy, detect_faces, drop_unchecked
from aim_kedro.curation.faces import make_detector
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.manifest import dfn_manifest
from aim_kedro.curation.subset import SubsetConfig, check_subset, iter_subset
from aim_kedro.io.shards import ShardSet, write_shards

CROP = (120, 0, 330, 210)  # around the astronaut's face
FACE_64 = (15, 16, 48, 51)  # where the detectors find it in the 64-px crop


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[ShardSet, pl.DataFrame]:
    """Three 64-px images: the astronaut's face, the same mirrored, and a face-free crop."""
    photo = Image.fromarray(skimage.data.astronaut())
    face = photo.crop(CROP).resize((64, 64), Image.Resampling.BICUBIC)
    free = Image.fromarray(skimage.data.coffee()).crop((0, 0, 300, 300)).resize((64, 64))
    images = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), free]
    samples = [{"__key__": f"k{i}", "png": _png(im), "txt": f"a photo {i}",
                "json": {"uid": f"u{i}"}} for i, im in enumerate(images)]
    root = tmp_path_factory.mktemp("faces_pool")
    write_shards(samples, str(root / "pool"), samples_per_shard=2)
    shards = ShardSet.open(str(root / "pool"))
    index, _ = build_index(shards, IndexConfig(), progress=False)
    return shards, index.select("uid", "shard", "key", "position", "caption")


def _hits(box, found) -> bool:
    return any(min(b[2], box[2]) - max(b[0], box[0]) > 0.5 * (box[2] - box[0]) for b in found)


def test_checked_images_get_the_detectors_boxes(pool) -> None:
    shards, index = pool
    faces, summary = detect_faces(make_detector("dlib_hog"), shards, index, IndexConfig(),
                                  progress=False)
    boxes = dict(zip(faces["uid"], faces["boxes"].to_list(), strict=True))
    assert _hits(FACE_64, boxes["u0"]) and boxes["u1"] and boxes["u2"] == []
    assert faces["unchecked"].null_count() == 3 and not faces["dropped"].any()
    assert summary["unchecked"] == 0 and summary["detector"] == "DlibHogDetector"


@pytest.mark.parametrize("policy", ["blur", "drop", "keep"])
def test_unchecked_images_follow_the_policy(pool, policy) -> None:
    shards, index = pool
    # faces down to 10 px would need a 614-px frame; the bound of 100 px leaves them unchecked
    detector = make_detector("dlib_hog", min_face=10, max_detect_size=100)
    faces, summary = detect_faces(detector, shards, index, IndexConfig(), progress=False,
                                  policy=FacePolicy(unchecked=policy))
    assert summary["unchecked"] == 3 and summary["unchecked_policy"] == policy
    assert all("faces under" in reason for reason in faces["unchecked"])
    rows = drop_unchecked(index, faces)
    if policy == "blur":
        assert faces["boxes"].to_list() == [[[0, 0, 64, 64]]] * 3
        assert rows.height == 3 and summary["dropped_unchecked"] == 0
    elif policy == "drop":
        assert faces["dropped"].all() and rows.height == 0 and summary["dropped_unchecked"] == 3
    else:
        assert not faces["dropped"].any() and rows.height == 3
        assert [[0, 0, 64, 64]] not in faces["boxes"].to_list()


def test_sidecar_boxes_are_merged_or_replace_the_detector(pool) -> None:
    shards, index = pool
    side = index.with_columns(face_bboxes=pl.Series(
        [[[0.0, 0.0, 0.25, 0.25]], None, [[0.5, 0.5, 1.0, 1.0]]],
        dtype=pl.List(pl.List(pl.Float64))))
    hog = make_detector("dlib_hog")

    def boxes(mode: str) -> dict[str, list]:
        faces, summary = detect_faces(hog, shards, side, IndexConfig(), progress=False,
                                      policy=FacePolicy(sidecar=mode))
        assert summary["with_sidecar_boxes"] == (0 if mode == "ignore" else 2)
        return dict(zip(faces["uid"], faces["boxes"].to_list(), strict=True))

    union, replace, ignore = boxes("union"), boxes("replace"), boxes("ignore")
    assert [0, 0, 16, 16] in union["u0"] and _hits(FACE_64, union["u0"])
    assert union["u2"] == [[32, 32, 64, 64]]
    assert replace["u0"] == [[0, 0, 16, 16]]  # the detector did not run on u0
    assert _hits(FACE_64, replace["u1"])  # u1 has no sidecar boxes: the detector ran
    assert ignore["u2"] == [] and _hits(FACE_64, ignore["u0"])


def _write(shards, index, faces, cfg, folder: Path):
    rows = index.join(faces, on="uid", how="left", maintain_order="left").with_columns(
        clip_score=pl.lit(0.5), nsfw_score=pl.lit(0.1), dedup_cluster=pl.lit(None, pl.Int64))
    write_shards(iter_subset(shards, rows, cfg, IndexConfig(), progress=False), str(folder),
                 samples_per_shard=10)
    return ShardSet.open(str(folder)), dfn_manifest(rows)


def test_the_blur_check_finds_faces_a_weak_blur_left(pool, tmp_path) -> None:
    shards, index = pool
    cnn = make_detector()
    faces, _ = detect_faces(cnn, shards, index, IndexConfig(), progress=False)
    assert faces["face_count"].to_list() == [1, 1, 0]
    strong = SubsetConfig(shorter_side=64, image_format="png")  # conf/base's blur
    subset, manifest = _write(shards, index, faces, strong, tmp_path / "strong")
    stats = check_subset(subset, manifest, strong, cnn)
    assert stats["blur_check"]["images_checked"] == 2 and stats["blur_check"]["faces_checked"] == 2
    assert stats["blur_check"]["faces_still_detected"] == 0
    weak = SubsetConfig(shorter_side=64, image_format="png", blur_grow=0.0,
                        blur_sigma_factor=0.01)
    subset, manifest = _write(shards, index, faces, weak, tmp_path / "weak")
    check = check_subset(subset, manifest, weak, cnn)["blur_check"]
    assert check["faces_still_detected"] == 2 and check["images_with_a_face_left"] == 2
    assert sorted(check["uids_with_a_face_left"]) == ["u0", "u1"]
    assert "blur_check" not in check_subset(subset, manifest, weak)


def test_kept_face_rows_are_the_kept_rows_with_their_sidecar_boxes() -> None:
    from aim_kedro.curation.face_stage import kept_face_rows
    from aim_kedro.curation.faces import SIDECAR_COLUMN

    manifest = pl.DataFrame({"uid": ["a", "b", "c"], "shard": ["s"] * 3, "key": ["1", "2", "3"],
                             "position": [0, 1, 2], "kept": [True, False, True], "other": [1, 2, 3]})
    rows = kept_face_rows(manifest, pl.DataFrame({"uid": ["c", "a"]}))
    assert rows.columns == ["uid", "shard", "key", "position"] and rows["uid"].to_list() == ["a", "c"]
    index = pl.DataFrame({"uid": ["c", "a"], SIDECAR_COLUMN: ["[[1, 2, 3, 4]]", None]})
    rows = kept_face_rows(manifest, index)
    assert rows["uid"].to_list() == ["a", "c"] and rows[SIDECAR_COLUMN].to_list() == [None, "[[1, 2, 3, 4]]"]
