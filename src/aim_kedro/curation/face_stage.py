"""The face stage of curation: the boxes of every kept sample's faces, from the detector and a
pool's sidecar boxes, and what to do with an image the detector cannot check.

``faces_task`` is the stage function (one shard) that an executor runs; ``detect_faces`` runs it
over the kept rows; ``drop_unchecked`` leaves out of the subset what the policy drops.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import polars as pl
from PIL import Image

from aim_kedro.common.config import check_choice
from aim_kedro.curation.executors import Executor, LocalExecutor, ShardTask, shard_tasks
from aim_kedro.curation.faces import SIDECAR_COLUMN, face_check, merge_overlapping, sidecar_boxes
from aim_kedro.curation.index import IndexConfig, decode_task
from aim_kedro.io.shards import ShardSet

if TYPE_CHECKING:
    from aim_kedro.curation.faces import Box, FaceDetector

logger = logging.getLogger(__name__)

FACE_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "boxes": pl.List(pl.List(pl.Int32())),
    "face_count": pl.Int32(),
    "unchecked": pl.String(),  # why the detector could not check the image, or null
    "dropped": pl.Boolean(),  # left out of the subset (curation.faces.unchecked: drop)
}


UNCHECKED_POLICIES = ("blur", "drop", "keep")
SIDECAR_MODES = ("union", "replace", "ignore")


@dataclass(frozen=True)
class FacePolicy:
    """What ``detect_faces`` does with an image the detector cannot check for faces as small as
    it was asked to (``unchecked``: blur the whole image, drop it from the subset, or keep it
    as found) and with sidecar face boxes (``sidecar``: merge them with the detector's, use
    them instead of running the detector, or ignore them)."""

    unchecked: str = "blur"
    sidecar: str = "union"

    def __post_init__(self) -> None:
        check_choice(self.unchecked, UNCHECKED_POLICIES, "curation.faces.unchecked")
        check_choice(self.sidecar, SIDECAR_MODES, "curation.faces.sidecar")


def _image_faces(
    detector: FaceDetector, image: Image.Image, given: Any, policy: FacePolicy
) -> tuple[list[Box], str | None, bool]:
    """Boxes, why the image is unchecked (or None) and whether it is dropped, for one image;
    ``given`` is its sidecar boxes (None: no sidecar)."""
    sidecar = sidecar_boxes(given, image.size) if given is not None else None
    if sidecar is not None and policy.sidecar == "replace":
        return sidecar, None, False
    try:
        found, reason = face_check(detector, image)
    except (RuntimeError, cv2.error) as exc:
        found, reason = [], f"the detector failed: {exc}"
    if sidecar:
        found = merge_overlapping(sorted(found + sidecar), 0.3)
    if reason is not None and policy.unchecked == "blur":
        found = [(0, 0, image.width, image.height)]
    return found, reason, reason is not None and policy.unchecked == "drop"


def faces_task(
    task: ShardTask, detector: FaceDetector, index_cfg: IndexConfig,
    policy: FacePolicy | None = None,
) -> tuple[pl.DataFrame, int]:
    """Stage function: the face table (``FACE_SCHEMA``) of one shard task's rows, and how many
    of its images no longer decode (they get no boxes). Rows with a ``face_bboxes`` column
    (a DataComp-style sidecar) bring their own boxes, used as ``policy.sidecar`` says."""
    policy = policy or FacePolicy()
    use_sidecar = (policy.sidecar != "ignore" and task.rows is not None
                   and SIDECAR_COLUMN in task.rows.columns)
    columns: dict[str, list[Any]] = {name: [] for name in FACE_SCHEMA}
    failed = 0
    for row, image in decode_task(task, index_cfg):
        found: list[Box] = []
        reason, dropped = None, False
        if image is None:
            failed += 1
        else:
            given = row.get(SIDECAR_COLUMN) if use_sidecar else None
            found, reason, dropped = _image_faces(detector, image, given, policy)
        columns["uid"].append(row["uid"])
        columns["boxes"].append([[int(v) for v in box] for box in found])
        columns["face_count"].append(len(found))
        columns["unchecked"].append(reason)
        columns["dropped"].append(dropped)
    return pl.DataFrame(columns, schema=FACE_SCHEMA), failed


def detect_faces(
    detector: FaceDetector,
    shards: ShardSet,
    rows: pl.DataFrame,
    index_cfg: IndexConfig,
    executor: Executor | None = None,
    progress: bool = True,
    policy: FacePolicy | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run the face detector on every row's image (rows: uid, shard, key, position and, from a
    sidecar, face_bboxes), one task per shard on ``executor`` (local by default; the detector is
    shipped to each worker, its model loaded there); return the face table in the pool's shard
    order and a summary."""
    policy = policy or FacePolicy()
    executor = executor or LocalExecutor(progress)
    start = time.perf_counter()
    work = functools.partial(faces_task, detector=detector, index_cfg=index_cfg, policy=policy)
    parts = executor.map_shards(work, shard_tasks(shards, rows), desc="detect faces")
    tables = [table for table, _ in parts]
    table = pl.concat(tables, how="vertical") if tables else pl.DataFrame(schema=FACE_SCHEMA)
    unchecked = int(table["unchecked"].is_not_null().sum())
    sidecar = 0
    if SIDECAR_COLUMN in rows.columns and policy.sidecar != "ignore":
        sidecar = int(rows[SIDECAR_COLUMN].is_not_null().sum())
    summary = {
        "images": table.height,
        "images_with_faces": int((table["face_count"] > 0).sum()),
        "faces": int(table["face_count"].sum()),
        "undecodable": sum(failed for _, failed in parts),
        "unchecked": unchecked,
        "unchecked_policy": policy.unchecked,
        "dropped_unchecked": int(table["dropped"].sum()),
        "with_sidecar_boxes": sidecar,
        "sidecar": policy.sidecar,
        "detector": type(detector).__name__,
        **executor.describe(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if unchecked:
        logger.warning("detect_faces: %d images could not be checked for faces (%s), e.g. %s; "
                       "curation.faces.unchecked: %s", unchecked, "bounded working resolution",
                       table.filter(pl.col("unchecked").is_not_null())["unchecked"][0],
                       policy.unchecked)
    return table, summary


def drop_unchecked(rows: pl.DataFrame, face_boxes: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (with uid) less those ``face_boxes`` marks dropped (``curation.faces.unchecked:
    drop``); the face summary counts them."""
    if "dropped" not in face_boxes.columns:
        return rows
    dropped = face_boxes.filter(pl.col("dropped"))["uid"]
    return rows.filter(~pl.col("uid").is_in(dropped.implode())) if dropped.len() else rows



def kept_face_rows(pool_manifest: pl.DataFrame, pool_index: pl.DataFrame) -> pl.DataFrame:
    """The rows ``detect_faces`` reads: every kept sample's uid, shard, key and position, with
    the pool's sidecar ``face_bboxes`` where ``pool_index`` carries them."""
    kept = pool_manifest.filter(pl.col("kept")).select("uid", "shard", "key", "position")
    if SIDECAR_COLUMN in pool_index.columns:
        kept = kept.join(pool_index.select("uid", SIDECAR_COLUMN), on="uid", how="left",
                         maintain_order="left")
    return kept


__all__ = [
    "FACE_SCHEMA",
    "SIDECAR_MODES",
    "UNCHECKED_POLICIES",
    "FacePolicy",
    "detect_faces",
    "drop_unchecked",
    "faces_task",
    "kept_face_rows",
]
