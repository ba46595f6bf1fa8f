"""NSFW scores from a real classifier: NudeNet's detector (the ONNX weights inside the ``nudenet``
wheel, MIT, run by onnxruntime; nothing is downloaded).

NudeNet is a YOLOv8n that finds 18 kinds of body parts, exposed or covered. The image-level
``nsfw_classifier_score`` is the highest confidence, over the whole image, of any class in
``classes`` (by default the exposed genitalia, breasts, buttocks and anus), and
``nsfw_classifier_label`` that class; ``filters.nsfw_classifier_threshold`` turns the score into
the ``nsfw`` reject reason. Images are letterboxed to a square (padded right and bottom, as
NudeNet does) and resized to ``resolution`` px, in batches.

``nsfw_task`` is the stage function (one shard) that an executor runs; ``score_nsfw`` runs it
over the pool's rows. The classifier loads its session lazily and drops it when pickled.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import polars as pl
from PIL import Image

from aim_kedro.common.config import check_choice
from aim_kedro.curation.executors import Executor, LocalExecutor, ShardTask, shard_tasks
from aim_kedro.curation.index import IndexConfig, decode_task
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)

# NudeNet 3.4's class order (the model's output columns after the 4 box coordinates).
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
NSFW_CLASSES: tuple[str, ...] = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
)
CLASSIFIERS = ("nudenet", "none")

NSFW_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "nsfw_classifier_score": pl.Float32(),  # NaN: the image no longer decodes
    "nsfw_classifier_label": pl.String(),  # the class of the highest score, null below 0.01
}


def nudenet_weights() -> str:
    """The path of ``320n.onnx`` inside the installed ``nudenet`` package."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "curation.nsfw.classifier is nudenet but the nudenet package is not installed: "
            "pip install nudenet (or set curation.nsfw.model_path to a local NudeNet .onnx)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "320n.onnx")


@dataclass(frozen=True)
class NsfwClassifierConfig:
    """The NSFW classifier (``curation.nsfw``): ``classifier`` nudenet | none, the NudeNet
    ``classes`` that count as NSFW, an optional local ``model_path``, the input ``resolution``,
    images per ``batch_size`` and onnxruntime's ``num_threads``."""

    classifier: str = "nudenet"
    classes: tuple[str, ...] = NSFW_CLASSES
    model_path: str | None = None
    resolution: int = 320
    batch_size: int = 16
    num_threads: int = 1

    def __post_init__(self) -> None:
        check_choice(self.classifier, CLASSIFIERS, "curation.nsfw.classifier")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        unknown = sorted(set(self.classes) - set(NUDENET_LABELS))
        if unknown or not self.classes:
            raise ValueError(
                f"curation.nsfw.classes must name NudeNet classes, got unknown {unknown}; "
                f"known: {list(NUDENET_LABELS)}"
            )
        for name in ("resolution", "batch_size", "num_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"curation.nsfw.{name} must be an integer >= 1, got {value!r}")
        if self.resolution % 32:
            raise ValueError(
                f"curation.nsfw.resolution must be a multiple of 32 (NudeNet's stride), got "
                f"{self.resolution}"
            )
        if self.model_path is not None and not os.path.isfile(self.model_path):
            raise FileNotFoundError(
                f"curation.nsfw.model_path {self.model_path!r} does not exist; set it to a local "
                "NudeNet .onnx or null (the weights inside the nudenet wheel)"
            )

    def make_classifier(self) -> NudeNetClassifier | None:
        """The classifier this block names (None for ``none``); checks that its weights exist."""
        if self.classifier == "none":
            return None
        path = self.model_path or nudenet_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"curation.nsfw: NudeNet weights {path!r} do not exist")
        return NudeNetClassifier(path, self.classes, self.resolution, self.batch_size,
                                 self.num_threads)


@dataclass
class NudeNetClassifier:
    """NudeNet's ONNX detector as an image-level NSFW score (see the module doc)."""

    path: str
    classes: tuple[str, ...] = NSFW_CLASSES
    resolution: int = 320
    batch_size: int = 16
    num_threads: int = 1
    _session: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        return state

    def _load(self) -> Any:
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = onnxruntime.InferenceSession(
                self.path, options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def _blob(self, image: Image.Image) -> np.ndarray:
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        side = max(height, width)
        square = cv2.copyMakeBorder(rgb, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT)
        square = cv2.resize(square, (self.resolution, self.resolution),
                            interpolation=cv2.INTER_LINEAR)
        return square.transpose(2, 0, 1).astype(np.float32) / 255.0

    def scores(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[str | None]]:
        """The NSFW score (float32 in [0, 1]) and the top NSFW class (None under 0.01) of each
        image."""
        columns = np.array([4 + NUDENET_LABELS.index(c) for c in self.classes])
        session = self._load()
        name = session.get_inputs()[0].name
        scores = np.zeros(len(images), dtype=np.float32)
        labels: list[str | None] = [None] * len(images)
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self._blob(im) for im in images[start:start + self.batch_size]])
            out = session.run(None, {name: batch})[0][:, columns, :]  # [B, classes, anchors]
            best = out.max(axis=2)
            for i, row in enumerate(best):
                k = int(row.argmax())
                scores[start + i] = float(row[k])
                labels[start + i] = self.classes[k] if row[k] >= 0.01 else None
        return scores, labels


def nsfw_task(
    task: ShardTask, classifier: NudeNetClassifier, index_cfg: IndexConfig
) -> pl.DataFrame:
    """Stage function: the NSFW table (``NSFW_SCHEMA``) of one shard task's rows; an image that
    no longer decodes gets a NaN score."""
    uids: list[str] = []
    scores: list[float] = []
    labels: list[str | None] = []
    pending: list[tuple[int, Image.Image]] = []

    def flush() -> None:
        found, names = classifier.scores([im for _, im in pending])
        for (i, _), score, label in zip(pending, found, names, strict=True):
            scores[i], labels[i] = float(score), label
        pending.clear()

    for row, image in decode_task(task, index_cfg):
        uids.append(row["uid"])
        scores.append(float("nan"))
        labels.append(None)
        if image is not None:
            pending.append((len(uids) - 1, image))
            if len(pending) >= classifier.batch_size:
                flush()
    if pending:
        flush()
    return pl.DataFrame({"uid": uids, "nsfw_classifier_score": scores,
                         "nsfw_classifier_label": labels}, schema=NSFW_SCHEMA)


def score_nsfw(
    classifier: NudeNetClassifier | None,
    shards: ShardSet,
    rows: pl.DataFrame,
    index_cfg: IndexConfig,
    executor: Executor | None = None,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The NSFW table of ``rows`` (uid, shard, key, position) in the pool's shard order, one
    task per shard on ``executor``, and a summary; with no classifier, an empty table."""
    start = time.perf_counter()
    if classifier is None:
        return pl.DataFrame(schema=NSFW_SCHEMA), {"classifier": "none", "scored": 0,
                                                  "seconds": 0.0}
    executor = executor or LocalExecutor(progress)
    work = functools.partial(nsfw_task, classifier=classifier, index_cfg=index_cfg)
    parts = executor.map_shards(work, shard_tasks(shards, rows), desc="nsfw")
    table = pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema=NSFW_SCHEMA)
    score = table["nsfw_classifier_score"]
    summary = {
        "classifier": "nudenet",
        "classes": list(classifier.classes),
        "resolution": classifier.resolution,
        "scored": int(score.is_not_nan().sum()),
        "undecodable": int(score.is_nan().sum()),
        "score_quantiles": {
            q: None if table.height == 0 else round(float(score.fill_nan(None).quantile(float(q))
                                                          or 0.0), 4)
            for q in ("0.5", "0.9", "0.99", "1.0")
        },
        **executor.describe(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return table, summary


__all__ = [
    "CLASSIFIERS",
    "NSFW_CLASSES",
    "NSFW_SCHEMA",
    "NUDENET_LABELS",
    "NsfwClassifierConfig",
    "NudeNetClassifier",
    "nsfw_task",
    "nudenet_weights",
    "score_nsfw",
]
