"""Verification of candidate copy pairs: local features, a geometric model, and the pixels.

A descriptor proposes pairs; this module decides which of them are copies, so that distinct
images stay distinct. Each image is cut to its ``border_box`` (letterbox bars and padding go)
and scaled to ``image_size``. Keypoints (OpenCV SIFT or ORB) are matched with Lowe's ratio
test and an affine model is fitted with RANSAC: a copy has enough inliers, a plausible
transform (no extreme scale or shear), one image lying (mostly) inside the other, and aligned
luminance that correlates in most cells of a 4x4 grid (an overlay may hide a few); two crops of
one photo that overlap a little share keypoints but neither lies inside the other. Images with
too few matches (small, blurred, flat) are compared densely instead: their luminance
thumbnails, and the detail in them, must correlate strongly. Colour is compared only when both
sides have colour (a greyscale copy is judged on luminance alone), as the direction of the
chroma per cell, so brightness, contrast and saturation edits pass and a recoloured
look-alike does not. ``verify_pair`` returns a ``Verdict`` naming the kind of match;
``verify_candidates`` runs it over candidate pairs in chunks of images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.borders import trim_borders

FEATURES = ("sift", "orb")
DENSE_SIZE = 32
COLOUR_SCALE = 0.25  # chroma is compared at a quarter of the verification size
GRID = 4
MAX_UPSCALE = 2.0
TEXTURE = 4.0  # grey-level std below which a cell is flat

ImageLoader = Callable[[Sequence[int]], Iterable[tuple[int, Image.Image | None]]]
"""Decoded images of the given rows, as ``(row, image or None)`` in any order."""


@dataclass(frozen=True)
class VerifyConfig:
    """How candidate pairs are verified (``curation.dedup.verify``).

    Images are verified at ``image_size`` px (longer side; a smaller image is enlarged at most
    twice) with up to ``max_features``
    ``features`` keypoints. A pair is a copy when at least ``min_inliers`` ratio-test matches
    (``ratio``) fit one affine transform within ``reprojection`` px, the aligned images overlap
    so that one lies at least ``contain`` inside the other and the other is at least
    ``min_coverage`` covered, and the aligned luminance correlates at least ``min_correlation``
    in 3 of 4 of the textured cells of a 4x4 grid. With fewer matches, and when either image
    has fewer than ``dense_keypoints`` keypoints (flat, small or blurred: a detailed pair that
    shares no keypoints is no copy), the pair is a copy when its border-trimmed 32 px luminance
    thumbnails correlate at least ``dense_correlation`` and
    at most ``dense_changed`` of their pixels differ by more than half a standard deviation
    (a different picture in the same layout differs in a region). When both images have colour
    (some cell's mean chroma above ``grey_chroma``, 0-255 scale), their per-cell chroma must
    agree in direction to a cosine of ``min_chroma_cosine``. ``try_flip`` also tries the mirror
    image (flipped copies; symmetric pictures then match their mirror), ``trim_borders`` cuts
    uniform borders first. ``chunk_images`` bounds the images prepared at a time.
    """

    features: str = "orb"
    image_size: int = 256
    max_features: int = 400
    ratio: float = 0.8
    min_inliers: int = 12
    reprojection: float = 5.0
    contain: float = 0.8
    min_coverage: float = 0.5
    min_correlation: float = 0.98
    dense_correlation: float = 0.9
    dense_changed: float = 0.05
    dense_keypoints: int = 50
    grey_chroma: float = 8.0
    min_chroma_cosine: float = 0.5
    try_flip: bool = False
    trim_borders: bool = True
    chunk_images: int = 2000

    def __post_init__(self) -> None:
        where = "curation.dedup.verify"
        if self.features not in FEATURES:
            raise ValueError(f"{where}.features must be one of {list(FEATURES)}, got {self.features!r}")
        for name, low in (("image_size", 32), ("max_features", 16), ("min_inliers", 3),
                          ("dense_keypoints", 0), ("chunk_images", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name} must be an integer >= {low}, got {value!r}")
        for name in ("ratio", "contain"):
            if not 0.0 < float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{where}.{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("min_coverage", "min_correlation", "dense_correlation", "dense_changed",
                     "min_chroma_cosine"):
            if not -1.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{where}.{name} must be in [-1, 1], got {getattr(self, name)!r}")
        for name in ("reprojection", "grey_chroma"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{where}.{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> VerifyConfig:
        """Build from ``curation.dedup.verify``; an unknown key raises naming the valid ones."""
        return from_mapping(cls, values, "curation.dedup.verify")


@dataclass
class Prepared:
    """What verification needs of one image: its trimmed luminance at the verification size,
    its chroma at a quarter of that, the dense thumbnail, and the keypoints (of the mirror
    image too, computed when first needed)."""

    grey: np.ndarray
    chroma: np.ndarray
    thumb: np.ndarray
    points: np.ndarray
    descriptors: np.ndarray | None
    mirrored: tuple[np.ndarray, np.ndarray | None] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the verification image."""
        return self.grey.shape[:2]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one pair: copy or not, the kind of evidence, and its figures."""

    copy: bool
    kind: str
    inliers: int = 0
    coverage: tuple[float, float] = (0.0, 0.0)
    correlation: float = float("nan")


def make_detector(cfg: VerifyConfig) -> Any:
    """The OpenCV keypoint detector ``cfg.features`` names."""
    if cfg.features == "orb":
        return cv2.ORB_create(nfeatures=cfg.max_features, fastThreshold=5, edgeThreshold=15)
    return cv2.SIFT_create(nfeatures=cfg.max_features, contrastThreshold=0.02)


def _keypoints(detector: Any, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    found, descriptors = detector.detectAndCompute(grey, None)
    points = np.array([k.pt for k in found], dtype=np.float32).reshape(-1, 2)
    return points, descriptors


def prepare(image: Image.Image, cfg: VerifyConfig, detector: Any | None = None) -> Prepared:
    """The ``Prepared`` form of a decoded image (``detector`` from ``make_detector`` to reuse)."""
    detector = detector or make_detector(cfg)
    rgb = (trim_borders(image) if cfg.trim_borders else image).convert("RGB")
    scale = min(cfg.image_size / max(rgb.size), MAX_UPSCALE)  # upscaling invents no keypoints
    size = (max(8, round(rgb.width * scale)), max(8, round(rgb.height * scale)))
    big = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR))
    grey = cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)
    small = (max(2, round(size[0] * COLOUR_SCALE)), max(2, round(size[1] * COLOUR_SCALE)))
    chroma = cv2.cvtColor(cv2.resize(big, small, interpolation=cv2.INTER_AREA),
                          cv2.COLOR_RGB2YCrCb)[..., 1:]
    thumb = cv2.resize(grey, (DENSE_SIZE, DENSE_SIZE), interpolation=cv2.INTER_AREA)
    points, descriptors = _keypoints(detector, grey)
    return Prepared(grey, chroma, thumb, points, descriptors)


def _mirror(p: Prepared, detector: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if p.mirrored is None:
        p.mirrored = _keypoints(detector, np.ascontiguousarray(p.grey[:, ::-1]))
    return p.mirrored


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float32).ravel()
    b = b.astype(np.float32).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-6 else float("nan")


def _cells(mask: np.ndarray) -> list[tuple[slice, slice]]:
    """The cells of a ``GRID`` x ``GRID`` grid over the bounding box of ``mask``."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return []
    yb = np.linspace(ys.min(), ys.max() + 1, GRID + 1).astype(int)
    xb = np.linspace(xs.min(), xs.max() + 1, GRID + 1).astype(int)
    return [(slice(yb[i], yb[i + 1]), slice(xb[j], xb[j + 1]))
            for i in range(GRID) for j in range(GRID)]


def chroma_agree(a: np.ndarray, b: np.ndarray, mask: np.ndarray, cfg: VerifyConfig) -> bool:
    """Per-cell mean chroma (Cr, Cb around 128) of two aligned images point the same way, or
    either side is greyscale (no cell above ``grey_chroma``): then only luminance counts."""
    va, vb = [], []
    for ys, xs in _cells(mask):
        m = mask[ys, xs]
        if m.sum() < 2:
            continue
        va.append(a[ys, xs][m].astype(np.float32).mean(0) - 128)
        vb.append(b[ys, xs][m].astype(np.float32).mean(0) - 128)
    if not va:
        return True
    ca, cb = np.stack(va), np.stack(vb)
    if min(np.linalg.norm(ca, axis=1).max(), np.linalg.norm(cb, axis=1).max()) < cfg.grey_chroma:
        return True
    ca, cb = ca.ravel(), cb.ravel()
    return float(ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb))) >= cfg.min_chroma_cosine


def _overlap(m: np.ndarray, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> tuple[float, float]:
    """Fractions of A and of B (mapped into A by ``m``) that the aligned images share."""
    ha, wa = shape_a
    hb, wb = shape_b
    corners = np.array([[0, 0], [wb, 0], [wb, hb], [0, hb]], dtype=np.float32)
    quad = (corners @ m[:, :2].T + m[:, 2]).astype(np.float32)
    area_b = abs(cv2.contourArea(quad))
    if area_b < 1:
        return 0.0, 0.0
    rect = np.array([[0, 0], [wa, 0], [wa, ha], [0, ha]], dtype=np.float32)
    inter, _ = cv2.intersectConvexConvex(rect, quad)
    return float(inter / (wa * ha)), float(inter / area_b)


def _plausible(m: np.ndarray) -> bool:
    """An affine map a copy can have: scale within 1/6..6, aspect change under 3x, no mirror."""
    singular = np.linalg.svd(m[:, :2], compute_uv=False)
    if singular[1] < 1e-6 or np.linalg.det(m[:, :2]) <= 0:
        return False
    return 1 / 6 <= singular[1] and singular[0] <= 6 and singular[0] / singular[1] <= 3


def _match(pa: np.ndarray, da: np.ndarray | None, pb: np.ndarray, db: np.ndarray | None,
           cfg: VerifyConfig, size_a: int) -> tuple[np.ndarray | None, int]:
    """The affine map from B to A that RANSAC fits to the ratio-test matches, and its inliers
    (the reprojection limit scaled from ``image_size`` to A's longer side ``size_a``)."""
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return None, 0
    norm = cv2.NORM_HAMMING if cfg.features == "orb" else cv2.NORM_L2
    pairs = cv2.BFMatcher(norm).knnMatch(db, da, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance]
    if len(good) < cfg.min_inliers:
        return None, len(good)
    src = pb[[g.queryIdx for g in good]]
    dst = pa[[g.trainIdx for g in good]]
    m, inliers = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                      ransacReprojThreshold=cfg.reprojection * size_a / cfg.image_size,
                                      maxIters=1000,
                                      confidence=0.99)
    if m is None or inliers is None:
        return None, 0
    return m, int(inliers.sum())


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels of two standardised thumbnails that differ by > 0.5 std."""
    za, zb = (cv2.GaussianBlur(t.astype(np.float32), (0, 0), 1.0) for t in (a, b))
    za = (za - za.mean()) / (za.std() + 1e-6)
    zb = (zb - zb.mean()) / (zb.std() + 1e-6)
    return float((np.abs(za - zb) > 0.5).mean())


def _dense(a: Prepared, b: Prepared, cfg: VerifyConfig) -> Verdict:
    corr = _ncc(a.thumb, b.thumb)
    changed = _changed(a.thumb, b.thumb)
    side = (DENSE_SIZE // 4, DENSE_SIZE // 4)
    ca = cv2.resize(a.chroma, side, interpolation=cv2.INTER_AREA)
    cb = cv2.resize(b.chroma, side, interpolation=cv2.INTER_AREA)
    agree = chroma_agree(ca, cb, np.ones(side, bool), cfg)
    copy = bool(corr >= cfg.dense_correlation and changed <= cfg.dense_changed and agree)
    return Verdict(copy, "dense pixels" if copy else "no match", correlation=corr)


def _aligned(a: Prepared, b: Prepared, m: np.ndarray, flip: bool, inliers: int,
             cfg: VerifyConfig) -> Verdict:
    cov_a, cov_b = _overlap(m, a.shape, b.shape)
    kind = "local features" + (" (mirrored)" if flip else "")
    if max(cov_a, cov_b) < cfg.contain or min(cov_a, cov_b) < cfg.min_coverage:
        return Verdict(False, "partial overlap", inliers, (cov_a, cov_b))
    grey_b = np.ascontiguousarray(b.grey[:, ::-1] if flip else b.grey)
    h, w = a.shape
    warped = cv2.warpAffine(grey_b, m, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
    sigma = max(1.0, max(h, w) / 64)  # coarse structure: tolerant of a pixel of misfit
    ga = cv2.GaussianBlur(a.grey, (0, 0), sigma)
    gb = cv2.GaussianBlur(warped, (0, 0), sigma)
    edge = 2 * int(2 * sigma) + 1  # B's edge, where the blur mixes in replicated pixels
    mask = cv2.erode(cv2.warpAffine(np.full(grey_b.shape, 255, np.uint8), m, (w, h),
                                    flags=cv2.INTER_NEAREST), np.ones((edge, edge), np.uint8)) > 0
    scores = []
    for ys, xs in _cells(mask):
        inside = mask[ys, xs]
        va, vb = ga[ys, xs][inside], gb[ys, xs][inside]
        if inside.sum() >= 16 and min(va.std(), vb.std()) > TEXTURE:  # flat cells tell nothing
            scores.append(_ncc(va, vb))
    corr = float(np.quantile(scores, 0.25)) if scores else float("nan")
    if not corr >= cfg.min_correlation:
        return Verdict(False, "pixels disagree", inliers, (cov_a, cov_b), corr)
    chroma_b = np.ascontiguousarray(b.chroma[:, ::-1] if flip else b.chroma)
    small = m.copy()
    small[:, 2] *= COLOUR_SCALE
    ch, cw = a.chroma.shape[:2]
    warped_chroma = cv2.warpAffine(chroma_b, small, (cw, ch), flags=cv2.INTER_LINEAR)
    small_mask = cv2.warpAffine(np.full(chroma_b.shape[:2], 255, np.uint8), small, (cw, ch),
                                flags=cv2.INTER_NEAREST) > 0
    if not chroma_agree(a.chroma, warped_chroma, small_mask, cfg):
        return Verdict(False, "colours disagree", inliers, (cov_a, cov_b), corr)
    return Verdict(True, kind, inliers, (cov_a, cov_b), corr)


def verify_pair(a: Prepared, b: Prepared, cfg: VerifyConfig, detector: Any | None = None) -> Verdict:
    """Whether ``b`` is a copy of ``a`` (or the reverse): aligned local features, else (too
    few matches) the dense thumbnails; the mirror image of ``b`` is tried when ``try_flip``."""
    verdict = None
    m, inliers = _match(a.points, a.descriptors, b.points, b.descriptors, cfg, max(a.shape))
    if m is not None and inliers >= cfg.min_inliers and _plausible(m):
        verdict = _aligned(a, b, m, False, inliers, cfg)
        if verdict.copy:
            return verdict
    if cfg.try_flip:
        fm, finl = _match(a.points, a.descriptors, *_mirror(b, detector or make_detector(cfg)),
                          cfg, max(a.shape))
        if fm is not None and finl >= cfg.min_inliers and _plausible(fm):
            flipped = _aligned(a, b, fm, True, finl, cfg)
            if flipped.copy:
                return flipped
            verdict = verdict or flipped
    if verdict is not None:
        return verdict
    if min(len(a.points), len(b.points)) < cfg.dense_keypoints:
        return _dense(a, b, cfg)
    return Verdict(False, "no match", inliers)


@dataclass
class VerifyStats:
    """What ``verify_candidates`` did: pairs verified, skipped (already joined), copies by kind,
    rejections by reason, images prepared and undecodable, seconds."""

    pairs: int = 0
    skipped: int = 0
    copies: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    images_prepared: int = 0
    images_missing: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {"pairs_verified": self.pairs, "pairs_skipped_already_joined": self.skipped,
                "copies": dict(self.copies), "rejected": dict(self.rejected),
                "images_prepared": self.images_prepared, "images_missing": self.images_missing,
                "seconds": round(self.seconds, 3)}


def _chunks(i: np.ndarray, j: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of pairs touching at most ``limit`` distinct images each."""
    start, seen = 0, set()
    for k, (a, b) in enumerate(zip(i.tolist(), j.tolist(), strict=True)):
        new = {("a", a), ("b", b)} - seen
        if len(seen) + len(new) > limit and k > start:
            yield start, k
            start, seen = k, set()
            new = {("a", a), ("b", b)}
        seen |= new
    if start < len(i):
        yield start, len(i)


def verify_candidates(
    i: np.ndarray, j: np.ndarray, load_a: ImageLoader, load_b: ImageLoader | None,
    cfg: VerifyConfig, joined: Callable[[int, int], bool] | None = None,
    stats: VerifyStats | None = None,
) -> Iterator[tuple[int, int, Verdict]]:
    """Verdicts of the pairs ``(i[k], j[k])`` in the given order (row ``i`` from ``load_a``,
    ``j`` from ``load_b``, or from ``load_a`` too when None: a self-join). A pair for which
    ``joined(i, j)`` is true when its turn comes is skipped (its images are already in one
    cluster). Images are decoded and prepared once per chunk of ``cfg.chunk_images``."""
    stats = stats if stats is not None else VerifyStats()
    start = time.perf_counter()
    detector = make_detector(cfg)
    same = load_b is None
    for lo, hi in _chunks(i, j, cfg.chunk_images):
        ci, cj = i[lo:hi], j[lo:hi]
        rows_a = sorted(set(ci.tolist()) | (set(cj.tolist()) if same else set()))
        ready_a = _prepare_all(load_a, rows_a, cfg, detector, stats)
        ready_b = ready_a if same else _prepare_all(load_b, sorted(set(cj.tolist())), cfg,
                                                    detector, stats)
        for a, b in zip(ci.tolist(), cj.tolist(), strict=True):
            if joined is not None and joined(a, b):
                stats.skipped += 1
                continue
            pa, pb = ready_a.get(a), ready_b.get(b)
            verdict = (verify_pair(pa, pb, cfg, detector) if pa is not None and pb is not None
                       else Verdict(False, "undecodable"))
            stats.pairs += 1
            tally = stats.copies if verdict.copy else stats.rejected
            tally[verdict.kind] = tally.get(verdict.kind, 0) + 1
            yield a, b, verdict
    stats.seconds += time.perf_counter() - start


def _prepare_all(load: ImageLoader, rows: Sequence[int], cfg: VerifyConfig, detector: Any,
                 stats: VerifyStats) -> dict[int, Prepared]:
    ready: dict[int, Prepared] = {}
    for row, image in load(rows):
        if image is None:
            stats.images_missing += 1
            continue
        ready[int(row)] = prepare(image, cfg, detector)
    stats.images_prepared += len(ready)
    return ready


__all__ = [
    "FEATURES",
    "ImageLoader",
    "Prepared",
    "Verdict",
    "VerifyConfig",
    "VerifyStats",
    "chroma_agree",
    "make_detector",
    "prepare",
    "verify_candidates",
    "verify_pair",
]
