"""Faces of the kept samples, and the samples of the curated subset: faces blurred, resized.

Both walk the raw pool shard by shard through ``index.decode_selected``, so memory holds one
shard's wanted rows and one image at a time; the subset is a generator that a shard writer
consumes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl
from PIL import Image
from tqdm.auto import tqdm

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.blur import blur_and_resize
from aim_kedro.curation.faces import FaceDetector
from aim_kedro.curation.index import IndexConfig, decode_selected
from aim_kedro.io.shards import Sample, ShardSet

logger = logging.getLogger(__name__)

FACE_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "boxes": pl.List(pl.List(pl.Int32())),
    "face_count": pl.Int32(),
}

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class SubsetConfig:
    """How subset images are written (``curation.subset``): shorter side in pixels, file format,
    JPEG/WebP quality, and the face blur (box growth and blur sigma per box side)."""

    shorter_side: int = 224
    image_format: str = "jpg"
    quality: int = 95
    only_if_bigger: bool = False
    blur_grow: float = 0.1
    blur_sigma_factor: float = 0.1

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


def detect_faces(
    detector: FaceDetector,
    shards: ShardSet,
    rows: pl.DataFrame,
    index_cfg: IndexConfig,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run the face detector on every row's image (rows: uid, shard, key, position), shard by
    shard; return the face table (uid, boxes, face_count) and a summary."""
    start = time.perf_counter()
    uids: list[str] = []
    boxes: list[list[list[int]]] = []
    failed = 0
    bar = tqdm(total=rows.height, desc="detect faces", unit="image", disable=not progress)
    for row, image in decode_selected(shards, rows, index_cfg):
        found: list[list[int]] = []
        if image is None:
            failed += 1
        else:
            found = [[int(v) for v in box] for box in detector.detect(image)]
        uids.append(row["uid"])
        boxes.append(found)
        bar.update(1)
    bar.close()
    table = pl.DataFrame(
        {"uid": uids, "boxes": boxes, "face_count": [len(b) for b in boxes]}, schema=FACE_SCHEMA
    )
    summary = {
        "images": table.height,
        "images_with_faces": int((table["face_count"] > 0).sum()),
        "faces": int(table["face_count"].sum()),
        "undecodable": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return table, summary


def subset_sample(
    row: Mapping[str, Any], image: Image.Image, boxes: Iterable[Iterable[int]], cfg: SubsetConfig
) -> Sample:
    """One subset sample: the image with faces blurred and resized, its caption and metadata.

    ``row`` has uid, caption, clip_score, nsfw_score, dedup_cluster, shard, key.
    """
    boxes = [tuple(int(v) for v in box) for box in boxes]
    out, out_boxes = blur_and_resize(
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
    }
    return {
        "__key__": str(row["uid"]),
        cfg.image_format: encode_image(out, cfg.image_format, cfg.quality),
        "txt": row["caption"],
        "json": meta,
    }


def iter_subset(
    shards: ShardSet,
    rows: pl.DataFrame,
    cfg: SubsetConfig,
    index_cfg: IndexConfig,
    stats: dict[str, Any] | None = None,
    progress: bool = True,
) -> Iterator[Sample]:
    """Subset samples of ``rows`` (uid, shard, key, position, caption, clip_score, nsfw_score,
    dedup_cluster, boxes), streamed shard by shard.

    ``stats`` (when given) is filled as the stream is consumed: written, blurred, undecodable,
    seconds. A sample whose image no longer decodes is skipped and counted.
    """
    stats = stats if stats is not None else {}
    stats.update(written=0, images_blurred=0, undecodable=0, seconds=0.0)
    start = time.perf_counter()
    bar = tqdm(total=rows.height, desc="write dfn_subset", unit="image", disable=not progress)
    try:
        for row, image in decode_selected(shards, rows, index_cfg):
            bar.update(1)
            if image is None:
                stats["undecodable"] += 1
                logger.warning("dfn_subset: %s no longer decodes, skipped", row["uid"])
                continue
            boxes = row.get("boxes") or []
            sample = subset_sample(row, image, boxes, cfg)
            stats["written"] += 1
            stats["images_blurred"] += bool(boxes)
            yield sample
    finally:
        bar.close()
        stats["seconds"] = round(time.perf_counter() - start, 3)
        logger.info(
            "write_dfn_subset: %d samples written (%d with blurred faces, %d undecodable) in %.1f s",
            stats["written"], stats["images_blurred"], stats["undecodable"], stats["seconds"],
        )


__all__ = [
    "FACE_SCHEMA",
    "IMAGE_FORMATS",
    "SubsetConfig",
    "detect_faces",
    "encode_image",
    "iter_subset",
    "subset_sample",
]
