"""dlib's face detectors: the MMOD CNN (``dlib_cnn``) and the HOG + linear SVM (``dlib_hog``).

Both find faces from about ``native`` (80) px up, through their own image pyramid. So each image
is resized once so that a face of ``min_face`` px (in the input image) becomes ``native`` px, the
working frame's longer side bounded by ``max_detect_size``: one pass covers every face from
``min_face`` up. An image so large that the bound keeps its faces of ``min_face`` px under
``native`` is *unchecked* for those (``unchecked(size)`` says why; ``curation.faces.unchecked``
decides what happens to it). ``angles`` adds passes on the frame rotated by those degrees, for
tilted heads, each mapped back to upright boxes; the boxes of all passes are merged.

The MMOD weights (``mmod_human_face_detector.dat``, public domain / CC0, by Davis King) come from
the ``face-recognition-models`` wheel; nothing is downloaded. dlib-bin is a CPU build.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from aim_kedro.curation.faces import (
    Box,
    LazyModel,
    make_frame,
    merge_overlapping,
    rotated,
    unrotate,
)

MMOD_FILE = "mmod_human_face_detector.dat"

Rect = tuple[float, float, float, float]


def mmod_weights() -> str:
    """The path of the MMOD weights inside the installed ``face_recognition_models`` package,
    found without importing it (its ``__init__`` needs the retired ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "face detector kind 'dlib_cnn' needs the MMOD weights of the face-recognition-models "
            "package: pip install face-recognition-models (or set the detector's 'weights' to a "
            f"local {MMOD_FILE})"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "models", MMOD_FILE)


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib-bin is a dependency
        raise ImportError(
            "face detector kinds dlib_cnn / dlib_hog need dlib: pip install dlib-bin"
        ) from exc
    return dlib


@dataclass
class _DlibDetector(LazyModel):
    """Shared by both dlib detectors: the working scale, the rotated passes, the merge."""

    min_face: int = 32
    max_detect_size: int = 1024
    pad: float = 0.1
    angles: tuple[float, ...] = ()
    threshold: float = 0.0
    iou_threshold: float = 0.3
    native: ClassVar[int] = 80
    _model: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.min_face, bool) or not isinstance(self.min_face, int) or self.min_face < 1:
            raise ValueError(f"min_face must be a face side in pixels >= 1, got {self.min_face!r}")
        if self.max_detect_size < self.native:
            raise ValueError(
                f"max_detect_size must be >= {self.native} (the detector's smallest face), got "
                f"{self.max_detect_size}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if not 0.0 <= self.pad <= 1.0:
            raise ValueError(f"pad must be in [0, 1] (a fraction of the shorter side), got {self.pad}")
        self.angles = tuple(float(a) for a in (self.angles or ()))
        if any(a == 0 or abs(a) > 90 for a in self.angles):
            raise ValueError(
                f"angles must be non-zero rotations in [-90, 90] degrees (the upright pass "
                f"always runs), got {list(self.angles)}"
            )

    def working_scale(self, size: tuple[int, int]) -> float:
        """The resize factor that brings a ``min_face`` face to ``native`` px, bounded so that
        the padded frame's longer side stays within ``max_detect_size``."""
        longer = max(size) * (1 + 2 * self.pad)
        return min(self.native / self.min_face, self.max_detect_size / max(longer, 1.0))

    def unchecked(self, size: tuple[int, int]) -> str | None:
        """Why an image of ``size`` (w, h) cannot be checked for faces of ``min_face`` px (its
        frame would outgrow ``max_detect_size``), or None when it can."""
        smallest = self.native / self.working_scale(size)
        if smallest <= self.min_face * 1.01:
            return None
        return (
            f"faces under {math.ceil(smallest)} px are not checked in a {size[0]}x{size[1]} "
            f"image (min_face {self.min_face}, max_detect_size {self.max_detect_size})"
        )

    def _rects(self, array: np.ndarray) -> list[Rect]:
        raise NotImplementedError

    def detect(self, image: Image.Image) -> list[Box]:
        """Return the face boxes of ``image`` in its own pixel coordinates."""
        rgb = np.asarray(image.convert("RGB"))
        frame = make_frame(rgb, self.working_scale(image.size), self.pad, image.size)
        rects: list[Rect] = []
        for angle in (0.0, *self.angles):
            array, inverse = rotated(frame.array, angle)
            found = self._rects(array)
            rects.extend(unrotate(found, inverse) if angle else found)
        return merge_overlapping(sorted(frame.to_image_boxes(rects)), self.iou_threshold)


@dataclass
class DlibCnnDetector(_DlibDetector):
    """dlib's MMOD CNN face detector (``kind: dlib_cnn``); ``threshold`` is on its confidence
    (0 is dlib's own cut; a cut below 0, down to ``lowest_threshold``, needs the torch backend,
    as dlib's Python API returns only detections above 0), ``weights`` a local .dat to use
    instead of the packaged one.

    ``backend: torch`` runs the same weights through PyTorch (``faces_mmod``: the same boxes,
    several times faster than this CPU build of dlib), on ``num_threads`` torch threads;
    ``backend: dlib`` calls dlib itself."""

    weights: str | None = None
    backend: str = "torch"
    num_threads: int | None = 1
    backends: ClassVar[tuple[str, ...]] = ("torch", "dlib")
    # Below this the background windows pass in hundreds per image (531 candidates on a 256-px
    # scene at -1.5, 3 at -1.0), and most face-free images get a box.
    lowest_threshold: ClassVar[float] = -1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in self.backends:
            raise ValueError(
                f"face detector kind 'dlib_cnn': backend must be one of {list(self.backends)}, "
                f"got {self.backend!r}"
            )
        if self.threshold < self.lowest_threshold:
            raise ValueError(
                f"face detector kind 'dlib_cnn': threshold must be >= {self.lowest_threshold} "
                f"(below it most face-free images get a box), got {self.threshold}"
            )
        if self.threshold < 0 and self.backend == "dlib":
            raise ValueError(
                f"face detector kind 'dlib_cnn': threshold {self.threshold} is below dlib's own "
                "cut (0), which backend dlib cannot lower (its Python API returns only the "
                "detections above 0); use backend torch"
            )
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool)
            or not isinstance(self.num_threads, int)
            or self.num_threads < 1
        ):
            raise ValueError(
                f"face detector kind 'dlib_cnn': num_threads must be >= 1 or null, got "
                f"{self.num_threads!r}"
            )
        path = self.weights or mmod_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"face detector kind 'dlib_cnn': the MMOD weights {path!r} do not exist; "
                "pip install face-recognition-models or set 'weights' to a local "
                f"{MMOD_FILE}"
            )

    def _rects(self, array: np.ndarray) -> list[Rect]:
        if self.backend == "torch":
            return self._torch_rects(array)
        if self._model is None:
            self._model = _import_dlib().cnn_face_detection_model_v1(self.weights or mmod_weights())
        out = []
        for det in self._model(array, 0):
            if det.confidence >= self.threshold:
                r = det.rect
                out.append((r.left(), r.top(), r.width(), r.height()))
        return out

    def _torch_rects(self, array: np.ndarray) -> list[Rect]:
        from aim_kedro.common.training import cpu_threads
        from aim_kedro.curation.faces_mmod import MmodNet

        if self._model is None:
            self._model = MmodNet.from_file(self.weights or mmod_weights())
        with cpu_threads(self.num_threads):
            found = self._model.detect(np.ascontiguousarray(array), min(0.0, self.threshold))
        return [
            (left, top, width, height)
            for left, top, width, height, confidence in found
            if confidence >= self.threshold
        ]


@dataclass
class DlibHogDetector(_DlibDetector):
    """dlib's HOG + linear SVM frontal face detector (``kind: dlib_hog``; no weights file);
    ``threshold`` shifts its SVM cut (dlib's ``adjust_threshold``)."""

    def _rects(self, array: np.ndarray) -> list[Rect]:
        if self._model is None:
            self._model = _import_dlib().get_frontal_face_detector()
        gray = np.ascontiguousarray(cv2.cvtColor(array, cv2.COLOR_RGB2GRAY))
        rects, _, _ = self._model.run(gray, 0, self.threshold)
        return [(r.left(), r.top(), r.width(), r.height()) for r in rects]


__all__ = ["MMOD_FILE", "DlibCnnDetector", "DlibHogDetector", "mmod_weights"]
