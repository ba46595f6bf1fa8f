"""The samples of the curated subset (faces blurred, resized), and the check of the subset once
written (the face stage before it is ``curation.face_stage``).

``subset_task`` is the stage function (one shard) that an executor runs; ``iter_subset`` runs it
over the kept rows, so memory holds one shard's wanted rows and one image at a time; the subset
is a stream that a shard writer consumes. ``check_subset`` reads the written subset back and
accounts for every manifest row.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl
from PIL import Image

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.blur import blur_and_resize
from aim_kedro.curation.executors import Executor, LocalExecutor, ShardTask, shard_tasks
from aim_kedro.curation.faces import FaceDetector, box_iou, for_face_size
from aim_kedro.curation.index import IndexConfig, decode_member, read_task
from aim_kedro.io.decode import decode_image
from aim_kedro.io.shards import Sample, ShardSet, sample_json

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_EXIF_ORIENTATION = 0x0112
ROW_FIELDS = frozenset({
    "uid", "shard", "key", "position", "caption", "clip_score", "nsfw_score", "dedup_cluster",
    "boxes", "face_count", "url",
})
"""What a subset row holds besides the pool's extra columns, which go into the json as they are."""


@dataclass(frozen=True)
class SubsetConfig:
    """How subset images are written (``curation.subset``): shorter side in pixels, file format,
    JPEG/WebP quality, and the face blur (box growth and blur sigma per box side).

    The defaults are conf/base's (the sample's 48 px PNG; 224 and jpg on real pools). A blur of
    grow 0.2, sigma 0.2 leaves no sample face detectable; img2dataset's 0.1 / 0.1 leaves some.
    """

    shorter_side: int = 48
    image_format: str = "png"
    quality: int = 95
    only_if_bigger: bool = False
    blur_grow: float = 0.2
    blur_sigma_factor: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.shorter_side, bool) or int(self.shorter_side) < 1:
            raise ValueError(
                f"curation.subset.shorter_side must be a size in pixels >= 1, got "
                f"{self.shorter_side!r}; e.g. 224 (48 for the sample)"
            )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"curation.subset.image_format must be one of {sorted(IMAGE_FORMATS)}, got "
                f"{self.image_format!r}"
            )
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"curation.subset.quality must be in [1, 100], got {self.quality}")
        if float(self.blur_grow) < 0:
            raise ValueError(f"curation.subset.blur_grow must be >= 0, got {self.blur_grow}")
        if float(self.blur_sigma_factor) <= 0:
            raise ValueError(
                f"curation.subset.blur_sigma_factor must be > 0, got {self.blur_sigma_factor}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SubsetConfig:
        """Build from ``curation.subset``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.subset")


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    """Encode an RGB image as ``png``, ``jpg`` or ``webp`` bytes."""
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if image_format in ("jpg", "webp"):
        options["quality"] = int(quality)
    image.convert("RGB").save(buffer, IMAGE_FORMATS[image_format], **options)
    return buffer.getvalue()


def same_size(size: tuple[int, int], cfg: SubsetConfig) -> bool:
    """Whether ``resize_shorter_side`` leaves an image of ``size`` as it is."""
    shorter = min(size)
    return shorter == cfg.shorter_side or (cfg.only_if_bigger and shorter <= cfg.shorter_side)


def reusable_bytes(found: tuple[str, bytes] | None, image_format: str) -> bytes | None:
    """The source file's bytes when they can be written to the subset as they are: already in
    ``image_format``, one frame, RGB or greyscale without transparency, no EXIF rotation, so
    they decode (``decode_image``) to the very pixels a re-encode would start from; else None.
    Reads the header only."""
    if found is None:
        return None
    data = found[1]
    try:
        with Image.open(io.BytesIO(data)) as raw:
            plain = (
                raw.format == IMAGE_FORMATS[image_format]
                and raw.mode in ("RGB", "L")
                and "transparency" not in raw.info
                and getattr(raw, "n_frames", 1) == 1
                and raw.getexif().get(_EXIF_ORIENTATION, 1) == 1
            )
    except Exception:  # noqa: BLE001 - an unreadable header is simply not reused
        return None
    return data if plain else None


def subset_sample(
    row: Mapping[str, Any], image: Image.Image, boxes: Iterable[Iterable[int]], cfg: SubsetConfig,
    source: tuple[str, bytes] | None = None,
) -> Sample:
    """One subset sample: the image with faces blurred and resized, its caption and metadata.

    An image that needs neither blur nor resize is written as its ``source`` bytes where they
    can be (``reusable_bytes``), not re-encoded: same pixels, none of a lossy re-encode's loss.

    ``row`` has uid, caption, clip_score, nsfw_score, dedup_cluster, shard, key, url and the
    pool's extra columns (carried into the json by name).
    """
    boxes = [tuple(int(v) for v in box) for box in boxes]
    reused = None if boxes or not same_size(image.size, cfg) else reusable_bytes(source, cfg.image_format)
    out, out_boxes = (image, []) if reused is not None else blur_and_resize(
        image,
        boxes,
        cfg.shorter_side,
        grow=cfg.blur_grow,
        sigma_factor=cfg.blur_sigma_factor,
        only_if_bigger=cfg.only_if_bigger,
    )
    meta = {
        "uid": row["uid"],
        "clip_score": None if row.get("clip_score") is None else float(row["clip_score"]),
        "nsfw_score": None if row.get("nsfw_score") is None else float(row["nsfw_score"]),
        "dedup_cluster": row.get("dedup_cluster"),
        "source_shard": row["shard"],
        "source_key": row["key"],
        "width": out.width,
        "height": out.height,
        "face_count": len(boxes),
        "face_boxes": [list(b) for b in out_boxes],
        "url": row.get("url"),
    }
    for name, value in row.items():
        if name not in ROW_FIELDS and name not in meta:
            meta[name] = value if isinstance(value, str | int | float | bool | list | dict) \
                or value is None else str(value)
    return {
        "__key__": str(row["uid"]),
        cfg.image_format: reused if reused is not None else encode_image(out, cfg.image_format, cfg.quality),
        "txt": row["caption"],
        "json": meta,
    }


def subset_task(task: ShardTask, cfg: SubsetConfig, index_cfg: IndexConfig) -> Iterator[Sample]:
    """Stage function: the subset samples of one shard task's rows (see ``iter_subset``); a row
    whose image no longer decodes is skipped with a warning."""
    for row, found in read_task(task, index_cfg):
        image = decode_member(found, index_cfg)
        if image is None:
            logger.warning("dfn_subset: %s no longer decodes, skipped", row["uid"])
            continue
        yield subset_sample(row, image, row.get("boxes") or [], cfg, found)


def iter_subset(
    shards: ShardSet,
    rows: pl.DataFrame,
    cfg: SubsetConfig,
    index_cfg: IndexConfig,
    executor: Executor | None = None,
    progress: bool = True,
) -> Iterator[Sample]:
    """Subset samples of ``rows`` (uid, shard, key, position, caption, clip_score, nsfw_score,
    dedup_cluster, boxes), streamed shard by shard in the pool's order, one task per shard on
    ``executor`` (local by default). What was written is counted by ``check_subset`` once the
    stream is saved; this only logs how many samples it streamed, and in how long."""
    executor = executor or LocalExecutor(progress)
    start = time.perf_counter()
    written = 0
    work = functools.partial(subset_task, cfg=cfg, index_cfg=index_cfg)
    try:
        for sample in executor.stream_shards(work, shard_tasks(shards, rows), desc="dfn_subset"):
            written += 1
            yield sample
    finally:
        logger.info("write_dfn_subset: %d of %d samples streamed in %.1f s", written, rows.height,
                    time.perf_counter() - start)


def subset_stream(
    shards: ShardSet, rows: pl.DataFrame, pool_index: pl.DataFrame, cfg: SubsetConfig,
    index_cfg: IndexConfig, executor: Executor | None = None,
) -> Iterator[Sample]:
    """``iter_subset`` of ``rows``, logging first what it does to the images' size
    (``resize_note``) and how many samples, with faces, it streams."""
    logger.info("write_dfn_subset: %s", resize_note(pool_index, rows, cfg))
    logger.info("write_dfn_subset: streaming %d samples (%d with faces) to the shard writer",
                rows.height, int((rows["face_count"] > 0).sum()))
    return iter_subset(shards, rows, cfg, index_cfg, executor)


def _faces_left(
    detector: FaceDetector, image: Image.Image, boxes: list[list[int]], iou: float
) -> int:
    """How many of the blurred ``boxes`` the detector, set to find faces of their size, still
    finds a face in (IoU >= ``iou``, or a detection inside the box)."""
    whole = [0, 0, image.width, image.height]
    boxes = [b for b in boxes if list(b) != whole]  # unchecked images blurred whole
    if not boxes:
        return 0
    side = min(max(b[2] - b[0], b[3] - b[1]) for b in boxes)
    found = for_face_size(detector, side).detect(image)
    left = 0
    for box in boxes:
        inside = any(f[0] >= box[0] and f[1] >= box[1] and f[2] <= box[2] and f[3] <= box[3]
                     for f in found)
        left += inside or any(box_iou(box, f) >= iou for f in found)
    return left


def resize_note(pool_index: pl.DataFrame, rows: pl.DataFrame, cfg: SubsetConfig) -> str:
    """One line on what the subset does to the kept images' size (the shorter sides of the pool
    images, and the subset's), for the log: a resize is never silent."""
    sides = (
        rows.select("uid").join(pool_index.select("uid", "width", "height"), on="uid", how="left")
        .select(pl.min_horizontal("width", "height").alias("side"))["side"].drop_nulls()
    )
    if sides.is_empty():
        return "no kept images"
    low, high, median = int(sides.min()), int(sides.max()), int(sides.median())
    if cfg.only_if_bigger:
        target = f"shorter side {cfg.shorter_side} px where bigger, others as they are"
    else:
        target = f"shorter side {cfg.shorter_side} px"
    verb = "downscaled to" if low >= cfg.shorter_side else "resized to"
    return (f"kept images have shorter sides {low}-{high} px (median {median}), {verb} {target} "
            "(curation.subset.shorter_side)")


def check_subset(
    samples: Iterable[Sample],
    manifest: pl.DataFrame,
    cfg: SubsetConfig,
    detector: FaceDetector | None = None,
    iou: float = 0.3,
) -> dict[str, Any]:
    """Read a written subset back against its manifest (uid, face_count): count the samples
    written, those with blurred faces (``face_count`` > 0 in their json) and the manifest rows
    missing (undecodable at write time, so skipped). With a ``detector``, each image with
    blurred faces is searched again (``blur_check``): a blurred face it still finds is counted
    and logged. Raises AssertionError when a written uid is not in the manifest or repeats, or
    a sample lacks its image or has the wrong size."""
    start = time.perf_counter()
    expected = set(manifest["uid"].to_list())
    seen: set[str] = set()
    blurred = 0
    verify = {"images_checked": 0, "faces_checked": 0, "faces_still_detected": 0,
              "images_with_a_face_left": 0}
    left_uids: list[str] = []
    for sample in samples:
        meta = sample_json(sample)
        uid = str(meta.get("uid", sample.get("__key__")))
        if uid not in expected:
            raise AssertionError(f"dfn_subset holds {uid}, which dfn_manifest does not list")
        if uid in seen:
            raise AssertionError(f"dfn_subset holds {uid} twice")
        seen.add(uid)
        if cfg.image_format not in sample:
            raise AssertionError(f"dfn_subset sample {uid} has no .{cfg.image_format} image")
        shorter = min(int(meta.get("width", 0)), int(meta.get("height", 0)))
        if shorter != cfg.shorter_side and not (cfg.only_if_bigger and shorter < cfg.shorter_side):
            raise AssertionError(
                f"dfn_subset sample {uid} has a shorter side of {shorter} px, not "
                f"curation.subset.shorter_side={cfg.shorter_side}"
            )
        has_faces = int(meta.get("face_count") or 0) > 0
        blurred += has_faces
        if detector is not None and has_faces:
            image = decode_image(bytes(sample[cfg.image_format]))
            boxes = [list(b) for b in meta.get("face_boxes") or []]
            left = _faces_left(detector, image, boxes, iou)
            verify["images_checked"] += 1
            verify["faces_checked"] += len(boxes)
            verify["faces_still_detected"] += left
            if left:
                verify["images_with_a_face_left"] += 1
                left_uids.append(uid)
    missing = sorted(expected - seen)
    if missing:
        logger.warning("dfn_subset: %d manifest rows were not written (undecodable), e.g. %s",
                       len(missing), missing[:3])
    if left_uids:
        logger.warning("dfn_subset: the detector still finds a face where one was blurred in %d "
                       "images, e.g. %s; raise curation.subset.blur_sigma_factor or blur_grow",
                       len(left_uids), left_uids[:3])
    stats: dict[str, Any] = {
        "kept": manifest.height,
        "with_faces": int((manifest["face_count"] > 0).sum()),
        "shorter_side": cfg.shorter_side,
        "image_format": cfg.image_format,
        "written": len(seen),
        "images_blurred": blurred,
        "undecodable": len(missing),
    }
    if detector is not None:
        stats["blur_check"] = {**verify, "box_iou": iou, "uids_with_a_face_left": left_uids[:20]}
    stats["seconds"] = round(time.perf_counter() - start, 3)
    logger.info("check_dfn_subset: %d of %d samples written (%d with blurred faces, %d "
                "undecodable); blur check: %d of %d blurred faces still detected in %.1f s",
                stats["written"], stats["kept"], blurred, len(missing),
                verify["faces_still_detected"], verify["faces_checked"], stats["seconds"])
    return stats


__all__ = [
    "IMAGE_FORMATS",
    "SubsetConfig",
    "check_subset",
    "encode_image",
    "iter_subset",
    "resize_note",
    "reusable_bytes",
    "same_size",
    "subset_sample",
    "subset_stream",
    "subset_task",
]
