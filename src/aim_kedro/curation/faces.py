"""Face detectors behind one small interface, chosen and configured from a params dict.

``make_detector(kind, **options)`` builds a :class:`FaceDetector` whose ``detect(image)`` returns
``(x0, y0, x1, y1)`` pixel boxes (``x1``/``y1`` exclusive) in the input image's coordinates.

Kinds:
- ``opencv_haar`` (default): OpenCV Haar cascades shipped inside ``opencv-python`` (no download).
  Small images are upscaled so the shorter side is at least ``detect_size`` and padded by
  ``pad`` x the shorter side (edge pixels repeated), so faces that fill or touch the frame are
  found; boxes are mapped back and clipped.
- ``onnx``: a YuNet ONNX model (OpenCV Zoo ``face_detection_yunet_*.onnx``) at a local ``path``,
  run through ``cv2.FaceDetectorYN``.
- ``dlib_cnn`` / ``dlib_hog``: dlib's MMOD CNN (weights from the ``face-recognition-models``
  wheel) and HOG detectors, at a working scale chosen from ``min_face``, with rotated passes
  (``faces_dlib.py``).
- ``none``: finds nothing (for pools known to hold no faces).
- ``union``: several of the above on each image, their boxes merged.

Detectors load their model lazily and drop it when pickled, so they can be shipped to workers.
A detector whose working resolution is bounded says, through ``unchecked(size)``, when it
cannot check an image for faces as small as it was asked to (``face_check``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

# Measured on pasted LFW faces and face-free crops (see tests/curation/test_faces.py).
DEFAULT_CASCADES = ("frontalface_alt2",)


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces in an RGB PIL image and returns pixel boxes."""

    def detect(self, image: Image.Image) -> list[Box]:
        """Return ``(x0, y0, x1, y1)`` boxes of the faces in ``image``."""
        ...


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_overlapping(boxes: list[Box], iou_threshold: float) -> list[Box]:
    """Keep the larger of any two boxes overlapping by more than ``iou_threshold``."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b)):
        if all(box_iou(box, k) <= iou_threshold for k in kept):
            kept.append(box)
    return kept


@dataclass
class _Frame:
    """An image prepared for detection: upscaled by ``scale``, then padded by ``pad`` px."""

    array: np.ndarray
    scale: float
    pad: int
    size: tuple[int, int]

    def to_image_boxes(self, rects: list[tuple[float, float, float, float]]) -> list[Box]:
        """Map ``(x, y, w, h)`` rects in the frame back to clipped boxes of the original image."""
        width, height = self.size
        out: list[Box] = []
        for x, y, w, h in rects:
            x0 = max(0, math.floor((x - self.pad) / self.scale))
            y0 = max(0, math.floor((y - self.pad) / self.scale))
            x1 = min(width, math.ceil((x + w - self.pad) / self.scale))
            y1 = min(height, math.ceil((y + h - self.pad) / self.scale))
            if x1 > x0 and y1 > y0:
                out.append((x0, y0, x1, y1))
        return out


def make_frame(array: np.ndarray, scale: float, pad: float, size: tuple[int, int]) -> _Frame:
    """Resize ``array`` (an image of ``size`` (w, h)) by ``scale`` and pad its edges by ``pad``
    x the resized shorter side (edge pixels repeated)."""
    width, height = size
    if scale != 1.0:
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
        array = cv2.resize(array, new, interpolation=interp)
    pad_px = round(pad * min(array.shape[:2]))
    if pad_px:
        array = cv2.copyMakeBorder(array, pad_px, pad_px, pad_px, pad_px, cv2.BORDER_REPLICATE)
    return _Frame(array=np.ascontiguousarray(array), scale=scale, pad=pad_px, size=size)


def _prepare(
    image: Image.Image, detect_size: int, pad: float, max_detect_size: int | None, gray: bool
) -> _Frame:
    """Resize so the shorter side lies in [detect_size, max_detect_size], then pad the edges."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    shorter = min(width, height)
    scale = 1.0
    if shorter < detect_size:
        scale = detect_size / shorter
    elif max_detect_size is not None and shorter > max_detect_size:
        scale = max_detect_size / shorter
    array = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY if gray else cv2.COLOR_RGB2BGR)
    return make_frame(array, scale, pad, (width, height))


def rotated(array: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """``array`` rotated by ``angle`` degrees (counter-clockwise) on a canvas that holds all of
    it (edges repeated), and the 2x3 affine that maps the rotated canvas back."""
    if angle == 0:
        return array, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), float(angle), 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w = math.ceil(height * sin + width * cos)
    new_h = math.ceil(height * cos + width * sin)
    matrix[0, 2] += new_w / 2 - width / 2
    matrix[1, 2] += new_h / 2 - height / 2
    out = cv2.warpAffine(array, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out), cv2.invertAffineTransform(matrix)


def unrotate(
    rects: list[tuple[float, float, float, float]], inverse: np.ndarray
) -> list[tuple[float, float, float, float]]:
    """``(x, y, w, h)`` rects of a rotated canvas -> the ``(x, y, w, h)`` rects, upright, that
    bound their corners in the canvas before rotation (``rotated``'s inverse affine)."""
    out = []
    for x, y, w, h in rects:
        corners = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1]], float)
        back = corners @ inverse.T
        x0, y0 = back.min(axis=0)
        x1, y1 = back.max(axis=0)
        out.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    return out


def _cascade_path(name: str) -> str:
    """A cascade name (``frontalface_alt2``) or an XML path -> an existing XML file path."""
    if os.path.isfile(name):
        return name
    path = os.path.join(cv2.data.haarcascades, f"haarcascade_{name}.xml")
    if not os.path.isfile(path):
        shipped = sorted(
            f[len("haarcascade_") : -len(".xml")]
            for f in os.listdir(cv2.data.haarcascades)
            if f.startswith("haarcascade_") and "face" in f
        )
        raise ValueError(
            f"cascades: {name!r} is neither an XML file nor a cascade shipped with OpenCV; "
            f"use one of {shipped} or a path to a cascade XML"
        )
    return path


class LazyModel:
    """Base of detectors whose model (the attribute ``MODEL`` names) loads on first use and is
    left out when pickled, so the detector ships to a worker and loads it there."""

    MODEL = "_model"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state[self.MODEL] = None
        return state


@dataclass
class HaarCascadeDetector(LazyModel):
    """OpenCV Haar cascades; several cascades are merged by suppressing overlapping boxes.

    A cascade whose name contains ``profile`` is run on the mirrored image too (it only knows one
    side). ``min_size`` is in pixels of the upscaled, padded frame.
    """

    cascades: tuple[str, ...] = DEFAULT_CASCADES
    scale_factor: float = 1.1
    min_neighbors: int = 3
    min_size: int = 20
    detect_size: int = 128
    max_detect_size: int | None = None
    pad: float = 0.1
    iou_threshold: float = 0.3
    MODEL = "_classifiers"
    _classifiers: list[cv2.CascadeClassifier] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.cascades, str):
            self.cascades = (self.cascades,)
        self.cascades = tuple(self.cascades)
        if not self.cascades:
            raise ValueError("cascades must name at least one cascade, e.g. ['frontalface_alt2']")
        if self.scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1 (e.g. 1.1), got {self.scale_factor}")
        if self.min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0, got {self.min_neighbors}")
        _check_sizes(self.detect_size, self.max_detect_size, self.pad)
        for name in self.cascades:
            _cascade_path(name)

    def _load(self) -> list[cv2.CascadeClassifier]:
        if self._classifiers is None:
            classifiers = []
            for name in self.cascades:
                path = _cascade_path(name)
                classifier = cv2.CascadeClassifier(path)
                if classifier.empty():
                    raise ValueError(f"cascades: OpenCV could not load a cascade from {path}")
                classifiers.append(classifier)
            self._classifiers = classifiers
        return self._classifiers

    def detect(self, image: Image.Image) -> list[Box]:
        """Return the face boxes of ``image`` in its own pixel coordinates."""
        frame = _prepare(image, self.detect_size, self.pad, self.max_detect_size, gray=True)
        gray = frame.array
        min_size = (self.min_size, self.min_size)
        rects: list[tuple[float, float, float, float]] = []
        for name, classifier in zip(self.cascades, self._load(), strict=True):
            found = classifier.detectMultiScale(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=min_size,
            )
            rects.extend(tuple(r) for r in found)
            if "profile" in name:
                mirrored = np.ascontiguousarray(gray[:, ::-1])
                found = classifier.detectMultiScale(
                    mirrored, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                    minSize=min_size,
                )
                frame_w = gray.shape[1]
                rects.extend((frame_w - x - w, y, w, h) for x, y, w, h in found)
        # Sorted: OpenCV returns the boxes in an order that depends on its thread count.
        boxes = sorted(frame.to_image_boxes(rects))
        return merge_overlapping(boxes, self.iou_threshold) if len(self.cascades) > 1 else boxes


@dataclass
class YuNetOnnxDetector(LazyModel):
    """A YuNet ONNX face detector at a local ``path``, run by ``cv2.FaceDetectorYN``."""

    path: str
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    top_k: int = 5000
    detect_size: int = 128
    max_detect_size: int | None = 640
    pad: float = 0.1
    MODEL = "_net"
    _net: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"onnx face detector: option 'path' points to {self.path!r}, which does not exist; "
                "set faces.detector.path to a local YuNet .onnx file "
                "(e.g. face_detection_yunet_2023mar.onnx) or use kind 'opencv_haar'"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        _check_sizes(self.detect_size, self.max_detect_size, self.pad)

    def _rects(self, array: np.ndarray) -> list[tuple[float, float, float, float]]:
        """The network's face rectangles ``(x, y, w, h)`` in a prepared BGR frame."""
        height, width = array.shape[:2]
        if self._net is None:
            self._net = cv2.FaceDetectorYN.create(
                self.path, "", (width, height), self.score_threshold, self.nms_threshold,
                self.top_k,
            )
        self._net.setInputSize((width, height))
        _, faces = self._net.detect(array)
        return [] if faces is None else [tuple(float(v) for v in f[:4]) for f in faces]

    def detect(self, image: Image.Image) -> list[Box]:
        """Return the face boxes of ``image`` in its own pixel coordinates."""
        frame = _prepare(image, self.detect_size, self.pad, self.max_detect_size, gray=False)
        return frame.to_image_boxes(self._rects(frame.array))


@dataclass
class NoFaceDetector:
    """Finds no faces; for pools known to be face-free."""

    def detect(self, image: Image.Image) -> list[Box]:
        """Return no boxes."""
        return []


@dataclass
class UnionDetector:
    """Several detectors on the same image, their boxes merged (``kind: union``): a face any of
    them finds is blurred. ``detectors`` holds each one's ``make_detector`` options; the image
    is unchecked when any member cannot check it."""

    detectors: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("union needs 'detectors': a list of detector options, e.g. "
                             "[{kind: dlib_cnn}, {kind: opencv_haar}]")
        members = []
        for i, options in enumerate(self.detectors):
            if isinstance(options, Mapping):
                if options.get("kind") == "union":
                    raise ValueError("union: a member cannot be a union itself")
                try:
                    options = make_detector(**options)
                except (ValueError, FileNotFoundError) as exc:
                    raise type(exc)(f"detectors[{i}]: {exc}") from exc
            members.append(options)
        self.detectors = tuple(members)

    def detect(self, image: Image.Image) -> list[Box]:
        """The boxes of every member, the larger of two overlapping ones kept."""
        boxes = [box for detector in self.detectors for box in detector.detect(image)]
        return merge_overlapping(sorted(boxes), 0.3)

    def unchecked(self, size: tuple[int, int]) -> str | None:
        """The first member's reason for not checking an image of ``size``, or None."""
        for detector in self.detectors:
            check = getattr(detector, "unchecked", None)
            reason = check(size) if check is not None else None
            if reason is not None:
                return reason
        return None


def _check_sizes(detect_size: int, max_detect_size: int | None, pad: float) -> None:
    if detect_size < 1:
        raise ValueError(f"detect_size must be >= 1 (e.g. 128), got {detect_size}")
    if max_detect_size is not None and max_detect_size < detect_size:
        raise ValueError(
            f"max_detect_size ({max_detect_size}) must be >= detect_size ({detect_size}) or null"
        )
    if not 0.0 <= pad <= 1.0:
        raise ValueError(f"pad must be in [0, 1] (a fraction of the shorter side), got {pad}")


_KINDS: dict[str, type] = {
    "opencv_haar": HaarCascadeDetector,
    "onnx": YuNetOnnxDetector,
    "none": NoFaceDetector,
    "union": UnionDetector,
}


def detector_kinds() -> dict[str, type]:
    """Every detector kind by name (the dlib ones are imported here, not at module import)."""
    from aim_kedro.curation.faces_dlib import DlibCnnDetector, DlibHogDetector

    return {**_KINDS, "dlib_cnn": DlibCnnDetector, "dlib_hog": DlibHogDetector}


def make_detector(kind: str = "dlib_cnn", **options: Any) -> FaceDetector:
    """Build a face detector from a params dict: ``make_detector(**params)``.

    Raises ValueError naming an unknown ``kind`` or option, FileNotFoundError for a missing
    ``onnx`` model ``path`` or dlib ``weights`` file.
    """
    kinds = detector_kinds()
    if kind not in kinds:
        raise ValueError(f"face detector kind {kind!r} is unknown; use one of {sorted(kinds)}")
    cls = kinds[kind]
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"face detector kind {kind!r} has no option(s) {unknown}; allowed: {sorted(allowed)}"
        )
    if kind == "onnx" and "path" not in options:
        raise ValueError("face detector kind 'onnx' needs option 'path' (a local YuNet .onnx file)")
    return cls(**options)


SIDECAR_COLUMN = "face_bboxes"
"""The column of a DataComp-style parquet sidecar (and of ``pool_index`` when it carries one)
with face boxes ``[x0, y0, x1, y1]`` as fractions of the image's width and height."""


def sidecar_boxes(values: Any, size: tuple[int, int]) -> list[Box]:
    """DataComp's normalised ``face_bboxes`` of one image -> pixel boxes of an image of ``size``
    (w, h), rounded outwards and clipped; a box that is not 4 numbers in [0, 1] raises."""
    width, height = size
    out: list[Box] = []
    for box in values or []:
        coords = [float(v) for v in box]
        if len(coords) != 4 or not all(-0.01 <= v <= 1.01 for v in coords):
            raise ValueError(
                f"{SIDECAR_COLUMN}: {list(box)} is not a box [x0, y0, x1, y1] in fractions of "
                "the image (DataComp's convention)"
            )
        x0, y0, x1, y1 = coords
        bx0, by0 = max(0, math.floor(x0 * width)), max(0, math.floor(y0 * height))
        bx1, by1 = min(width, math.ceil(x1 * width)), min(height, math.ceil(y1 * height))
        if bx1 > bx0 and by1 > by0:
            out.append((bx0, by0, bx1, by1))
    return out


def face_check(detector: FaceDetector, image: Image.Image) -> tuple[list[Box], str | None]:
    """The face boxes of ``image`` and, when the detector cannot check it for faces as small as
    it was asked to (its working resolution is bounded), why not; else None."""
    unchecked = getattr(detector, "unchecked", None)
    reason = unchecked(image.size) if unchecked is not None else None
    return detector.detect(image), reason


def for_face_size(detector: FaceDetector, side: float) -> FaceDetector:
    """The same detector set to find faces down to ``side`` px (a detector with ``min_face``),
    e.g. to look again for a blurred face of a known size; others are returned as they are."""
    if isinstance(detector, UnionDetector):
        return UnionDetector(tuple(for_face_size(d, side) for d in detector.detectors))
    if dataclasses.is_dataclass(detector) and hasattr(detector, "min_face"):
        wanted = max(1, min(detector.min_face, int(side)))
        if wanted == detector.min_face:
            return detector
        clone = dataclasses.replace(detector, min_face=wanted)
        clone._model = detector._model  # the loaded model is shared, not loaded again
        return clone
    return detector
