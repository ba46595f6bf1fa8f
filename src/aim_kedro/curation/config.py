"""The typed ``curation`` parameters: one config dataclass per block of
``conf/base/parameters_curation.yml``, with the same field names and defaults.

Each block is built by ``block(cls, values)`` (``common.config.from_mapping``), so an unknown
key fails naming ``curation.<block>`` and the closest valid key. A node builds the configs of the blocks it
takes (cheap); ``validate_curation_params`` checks the whole tree once, before the run, and
builds the face detector to prove its options (which no node pays for twice).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aim_kedro.common.config import check_keys, from_mapping
from aim_kedro.curation.clip_models import (
    PRECISIONS,
    ModelUnavailableError,
    load_clip_model,
    resolve_open_clip_source,
)
from aim_kedro.curation.dedup import DedupConfig
from aim_kedro.curation.executors import ExecutorConfig
from aim_kedro.curation.face_stage import FacePolicy
from aim_kedro.curation.faces import FaceDetector, make_detector
from aim_kedro.curation.filter_network import FilterNetworkConfig
from aim_kedro.curation.filters import FilterConfig
from aim_kedro.curation.index import IndexConfig
from aim_kedro.curation.nsfw import NsfwClassifierConfig
from aim_kedro.curation.scoring import ClipScorer, NsfwConfig
from aim_kedro.curation.subset import SubsetConfig

SCORING_MODELS = ("filter_network", "open_clip", "precomputed")

C = TypeVar("C")


@dataclass(frozen=True)
class ScoringConfig:
    """Which model scores the pool (``curation.scoring``).

    ``model: filter_network`` uses the checkpoint that ``train_filter_network`` wrote;
    ``model: open_clip`` loads ``model_name`` (an open_clip architecture, ``hf-hub:org/repo`` or
    ``local-dir:/path``) with ``pretrained`` (a tag or a local weights file). ``num_threads``
    pins the torch threads of every scoring op, in this process and in each Ray actor alike
    (null: each process's default), so both executors compute the same scores; a decision
    never hangs on a last bit anyway (``dedup.score_tolerance``). ``model: precomputed`` scores
    nothing: ``score_column`` names a column of the pool's parquet sidecars (DataComp's
    ``clip_l14_similarity_score``) that becomes ``clip_score``. ``decode_min_side`` (the
    scorer's input size) decodes JPEGs for scoring at the smallest DCT scale that keeps both
    sides at least that (``io.decode.decode_image``); null decodes them at full size.
    """

    model: str = "filter_network"
    model_name: str | None = None
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 256
    num_threads: int | None = 1
    nsfw_prompts: tuple[str, ...] | None = None
    safe_prompts: tuple[str, ...] | None = None
    score_column: str | None = None
    decode_min_side: int | None = None

    def __post_init__(self) -> None:
        if self.model not in SCORING_MODELS:
            raise ValueError(
                f"curation.scoring.model must be one of {SCORING_MODELS}, got {self.model!r}"
            )
        if (self.model == "precomputed") != (self.score_column is not None):
            raise ValueError(
                "curation.scoring.score_column names the sidecar column of precomputed scores and "
                f"goes with curation.scoring.model: precomputed (got model {self.model!r}, "
                f"score_column {self.score_column!r}); e.g. clip_l14_similarity_score for DataComp"
            )
        if self.model == "open_clip" and not self.model_name:
            raise ValueError(
                "curation.scoring.model_name is required with curation.scoring.model: open_clip "
                "(e.g. ViT-L-14 with pretrained: dfn2b, or hf-hub:apple/DFN2B-CLIP-ViT-L-14)"
            )
        if self.decode_min_side is not None and (
            isinstance(self.decode_min_side, bool) or not isinstance(self.decode_min_side, int)
            or self.decode_min_side < 1
        ):
            raise ValueError(
                f"curation.scoring.decode_min_side must be a size in pixels >= 1 or null, got "
                f"{self.decode_min_side!r}; e.g. the scorer's input size, 224 for ViT-L-14"
            )
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise ValueError(f"curation.scoring.batch_size must be >= 1, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"curation.scoring.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        threads = self.num_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(
                f"curation.scoring.num_threads must be a thread count >= 1 or null, got "
                f"{threads!r}; e.g. 1 (the same in the Kedro process and every Ray actor)"
            )

    def nsfw(self, threshold: float | None) -> NsfwConfig:
        """The zero-shot NSFW prompts (defaults unless overridden) with the filter's threshold."""
        values: dict[str, Any] = {"threshold": 1.0 if threshold is None else float(threshold)}
        if self.nsfw_prompts:
            values["nsfw_prompts"] = tuple(self.nsfw_prompts)
        if self.safe_prompts:
            values["safe_prompts"] = tuple(self.safe_prompts)
        return NsfwConfig(**values)

    def loader(self, filter_network: Mapping[str, Any] | None) -> functools.partial[ClipScorer]:
        """``load_clip_model`` bound to the model this block names, not yet called: an executor
        calls it where the scoring runs (each Ray actor builds its own)."""
        common = {"device": self.device, "precision": self.precision,
                  "batch_size": self.batch_size, "num_threads": self.num_threads}
        if self.model == "filter_network":
            if not filter_network or not filter_network.get("state_dict"):
                raise ValueError(
                    "curation.scoring.model is filter_network but the filter_network checkpoint "
                    "is empty; run the train_filter_network node with that setting first"
                )
            return functools.partial(load_clip_model, "", checkpoint=filter_network, **common)
        return functools.partial(
            load_clip_model, str(self.model_name), pretrained=self.pretrained, **common
        )

    def check_source(self) -> None:
        """An open_clip model must be loadable from local files or the Hub: a missing path, an
        unknown name, or a download while offline raises here, naming the parameters. Loads no
        weights; nothing to check for the filter network."""
        if self.model != "open_clip":
            return
        try:
            resolve_open_clip_source(str(self.model_name), self.pretrained)
        except (FileNotFoundError, ValueError, ModelUnavailableError) as exc:
            raise type(exc)(
                f"curation.scoring.model_name={self.model_name!r} / curation.scoring.pretrained="
                f"{self.pretrained!r} cannot be used: {exc}"
            ) from exc


DEFAULT_FACE_DETECTOR: dict[str, Any] = {"kind": "union", "detectors": [
    {"kind": "dlib_cnn", "min_face": 32, "max_detect_size": 1024, "angles": [],
     "threshold": 0.0, "backend": "torch"},
    {"kind": "opencv_haar"},
]}


@dataclass(frozen=True)
class FacesConfig:
    """The face stage (``curation.faces``): ``detector`` holds ``make_detector``'s options
    (``kind`` and that kind's settings); ``unchecked`` says what happens to an image the
    detector cannot check for faces of ``min_face`` px (blur | drop | keep); ``sidecar`` how
    DataComp-style ``face_bboxes`` of the pool are used (union | replace | ignore)."""

    detector: Mapping[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_FACE_DETECTOR))
    unchecked: str = "blur"
    sidecar: str = "union"

    def __post_init__(self) -> None:
        if not isinstance(self.detector, Mapping):
            raise ValueError(
                f"curation.faces.detector must be a mapping such as {{kind: dlib_cnn}}, got "
                f"{type(self.detector).__name__}"
            )
        object.__setattr__(self, "detector", dict(self.detector))
        self.policy()

    def policy(self) -> FacePolicy:
        """The unchecked-image and sidecar policy of this block."""
        return FacePolicy(unchecked=self.unchecked, sidecar=self.sidecar)

    def make_detector(self) -> FaceDetector:
        """The detector ``detector`` describes; a bad kind, option or model path raises a
        ValueError naming ``curation.faces.detector``."""
        try:
            return make_detector(**self.detector)
        except (ValueError, FileNotFoundError, TypeError, ImportError) as exc:
            raise ValueError(f"curation.faces.detector: {exc}") from exc


@dataclass(frozen=True)
class ReportConfig:
    """What the report measures and shows (``curation.report``)."""

    face_iou: float = 0.3
    thumbnails: int = 16
    histogram_bins: int = 40

    def __post_init__(self) -> None:
        if not 0.0 < float(self.face_iou) <= 1.0:
            raise ValueError(f"curation.report.face_iou must be in (0, 1], got {self.face_iou}")
        if int(self.thumbnails) < 0 or int(self.histogram_bins) < 1:
            raise ValueError(
                "curation.report.thumbnails must be >= 0 and curation.report.histogram_bins >= 1"
            )


@dataclass(frozen=True)
class CurationConfig:
    """The whole ``params:curation`` block, typed (``validate_curation_params`` builds it)."""

    progress: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)
    filter_network: FilterNetworkConfig = field(default_factory=FilterNetworkConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    nsfw: NsfwClassifierConfig = field(default_factory=NsfwClassifierConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


BLOCKS: dict[str, Any] = {
    "index": IndexConfig,
    "filter_network": FilterNetworkConfig,
    "scoring": ScoringConfig,
    "filters": FilterConfig,
    "nsfw": NsfwClassifierConfig,
    "dedup": DedupConfig,
    "faces": FacesConfig,
    "subset": SubsetConfig,
    "report": ReportConfig,
    "executor": ExecutorConfig,
}
BLOCK_NAMES = {cls: name for name, cls in BLOCKS.items()}
SECTIONS = ("progress", *BLOCKS)


def block(cls: type[C], values: Mapping[str, Any] | None) -> C:
    """The config of one ``curation.<block>`` mapping (``block(DedupConfig, params)``): the one
    way nodes and the whole-tree check build them; an unknown key fails naming
    ``curation.<block>`` and the closest valid key."""
    return from_mapping(cls, values, f"curation.{BLOCK_NAMES[cls]}")


def check_progress(value: Any) -> bool:
    """``curation.progress`` (tqdm bars on the per-shard loops) must be true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"curation.progress must be true or false, got {value!r}")
    return value


def validate_curation_params(params: Mapping[str, Any]) -> CurationConfig:
    """Check every value of ``params:curation`` and return it typed; raise ValueError naming the
    parameter and the fix. Reads no data and loads no model; builds the face detector and
    the NSFW classifier once, so a bad option or a missing weights file fails here rather
    than in ``detect_faces`` or ``score_nsfw``."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params:curation must be a mapping, got {type(params).__name__}")
    check_keys(params, SECTIONS, "curation")
    blocks = {name: block(cls, params.get(name)) for name, cls in BLOCKS.items()}
    blocks["faces"].make_detector()
    blocks["nsfw"].make_classifier()
    _check_precomputed(blocks["scoring"], blocks["filters"], blocks["dedup"])
    _check_subset_size(blocks["filters"], blocks["subset"])
    if blocks["index"].uid_list is not None:
        blocks["index"].load_uid_list()
    if blocks["dedup"].describes:
        blocks["dedup"].descriptor.check_path()  # a pretrained descriptor's file must exist
    return CurationConfig(progress=check_progress(params.get("progress", True)), **blocks)


def _check_precomputed(scoring: ScoringConfig, filters: FilterConfig, dedup: DedupConfig) -> None:
    """Precomputed scores come without embeddings or NSFW scores: the rules that need them fail
    here rather than comparing nothing."""
    if scoring.model != "precomputed":
        return
    needs = [name for name, value in (
        ("curation.dedup.embedding_threshold", dedup.embedding_threshold),
        ("curation.dedup.eval_embedding_threshold", dedup.eval_embedding_threshold),
        ("curation.filters.nsfw_threshold", filters.nsfw_threshold),
    ) if value is not None]
    if needs:
        raise ValueError(
            f"curation.scoring.model: precomputed gives clip_score only (from the sidecar column "
            f"{scoring.score_column!r}), no embeddings or NSFW score: set {', '.join(needs)} to "
            "null, or score with a model"
        )


def _check_subset_size(filters: FilterConfig, subset: SubsetConfig) -> None:
    """The resolution contract inside curation: the basic filter must not let through images
    smaller than the subset size, which would be upscaled (unless only_if_bigger keeps them)."""
    if subset.only_if_bigger or int(filters.min_shorter_side) >= int(subset.shorter_side):
        return
    raise ValueError(
        f"curation.subset.shorter_side={subset.shorter_side} would upscale the kept images of "
        f"{filters.min_shorter_side}-{int(subset.shorter_side) - 1} px that "
        f"curation.filters.min_shorter_side={filters.min_shorter_side} lets through: raise "
        f"min_shorter_side to {subset.shorter_side}, lower shorter_side, or set "
        "curation.subset.only_if_bigger: true (smaller images are then written as they are)"
    )


def check_scoring_model(params: Mapping[str, Any]) -> None:
    """Before a run that scores: ``ScoringConfig.check_source`` of ``params:curation``'s
    scoring block (the run hook calls it when score_pool is in the run)."""
    block(ScoringConfig, (params or {}).get("scoring")).check_source()


__all__ = [
    "BLOCKS",
    "SCORING_MODELS",
    "BLOCK_NAMES",
    "SECTIONS",
    "CurationConfig",
    "FacesConfig",
    "ReportConfig",
    "ScoringConfig",
    "block",
    "check_progress",
    "check_scoring_model",
    "validate_curation_params",
]
