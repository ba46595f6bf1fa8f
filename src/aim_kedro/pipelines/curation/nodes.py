"""Nodes of the ``curation`` pipeline: thin glue between the catalog and ``aim_kedro.curation``.

Decision order, one reason per sample (the first that applies):
``corrupt``/``no_caption`` (index) -> ``basic_filter`` -> ``nsfw`` -> ``eval_leak`` ->
``duplicate`` -> ``low_clip_score``. Duplicate clusters are built over every decodable sample,
but each cluster's representative is chosen among the samples that survived the earlier stages
(the best clip_score wins), and the score cut then ranks the deduplicated survivors, as DFN
ranks a deduplicated pool: a duplicate never takes a slot of the kept fraction, and a filtered
sample never shadows a good copy of itself.

Every node validates the whole ``params:curation`` block first (cheap), so a bad value fails
before any work; the run hook calls ``validate_curation_params`` before the first node too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from aim_kedro.curation import ray_engine
from aim_kedro.curation.clip_score import (
    ClipScorer,
    ModelUnavailableError,
    NsfwConfig,
    load_clip_model,
    resolve_open_clip_source,
    score_index,
)
from aim_kedro.curation.dedup import EVAL_SCHEMA, DedupConfig, deduplicate, eval_records
from aim_kedro.curation.faces import make_detector
from aim_kedro.curation.filter_network import FilterNetworkConfig, train_filter_network
from aim_kedro.curation.filters import (
    LOW_CLIP_SCORE,
    FilterConfig,
    filter_decisions,
    select_by_score,
)
from aim_kedro.curation.index import IndexConfig, build_index, decode_selected
from aim_kedro.curation.ray_engine import ExecutorConfig
from aim_kedro.curation.report import (
    funnel,
    plot_funnel,
    plot_score_histogram,
    plot_thumbnails,
    truth_metrics,
)
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.curation.subset import SubsetConfig, detect_faces, iter_subset
from aim_kedro.io.shards import ERROR_KEY, ShardSet, image_bytes, sample_text

logger = logging.getLogger(__name__)

SCORING_MODELS = ("filter_network", "open_clip")

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "shard": pl.String(),
    "key": pl.String(),
    "position": pl.UInt32(),
    "clip_score": pl.Float32(),
    "kept": pl.Boolean(),
    "reject_reason": pl.String(),
    "reject_detail": pl.String(),
    "dedup_cluster": pl.Int64(),
    "eval_id": pl.String(),
}


def _from_dict(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} parameter(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class ScoringConfig:
    """Which model scores the pool (``curation.scoring``).

    ``model: filter_network`` uses the checkpoint that ``train_filter_network`` wrote;
    ``model: open_clip`` loads ``model_name`` (an open_clip architecture, ``hf-hub:org/repo`` or
    ``local-dir:/path``) with ``pretrained`` (a tag or a local weights file).
    """

    model: str = "filter_network"
    model_name: str | None = None
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 256
    nsfw_prompts: tuple[str, ...] | None = None
    safe_prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.model not in SCORING_MODELS:
            raise ValueError(
                f"curation.scoring.model must be one of {SCORING_MODELS}, got {self.model!r}"
            )
        if self.model == "open_clip" and not self.model_name:
            raise ValueError(
                "curation.scoring.model_name is required with curation.scoring.model: open_clip "
                "(e.g. ViT-L-14 with pretrained: dfn2b, or hf-hub:apple/DFN2B-CLIP-ViT-L-14)"
            )
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise ValueError(f"curation.scoring.batch_size must be >= 1, got {self.batch_size!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(
                f"curation.scoring.precision must be fp32, fp16 or bf16, got {self.precision!r}"
            )

    def nsfw(self, threshold: float | None) -> NsfwConfig:
        """The zero-shot NSFW prompts (defaults unless overridden) with the filter's threshold."""
        values: dict[str, Any] = {"threshold": 1.0 if threshold is None else float(threshold)}
        if self.nsfw_prompts:
            values["nsfw_prompts"] = tuple(self.nsfw_prompts)
        if self.safe_prompts:
            values["safe_prompts"] = tuple(self.safe_prompts)
        return NsfwConfig(**values)


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
    """The whole ``params:curation`` block, validated."""

    progress: bool
    index: IndexConfig
    filter_network: FilterNetworkConfig
    scoring: ScoringConfig
    filters: FilterConfig
    dedup: DedupConfig
    faces: dict[str, Any]
    subset: SubsetConfig
    report: ReportConfig
    executor: ExecutorConfig = ExecutorConfig()


SECTIONS = (
    "progress", "index", "filter_network", "scoring", "filters", "dedup", "faces", "subset",
    "report", "executor",
)


def validate_curation_params(params: Mapping[str, Any]) -> CurationConfig:
    """Check every value of ``params:curation`` and return it typed; raise ValueError naming the
    parameter and the fix. Cheap: builds no model and reads no data."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params:curation must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown curation parameter(s) {unknown}; valid keys: {list(SECTIONS)}")
    try:
        filter_network = FilterNetworkConfig.from_dict(params.get("filter_network"))
    except ValueError as exc:
        raise ValueError(f"curation.{exc}") from exc
    faces = dict(params.get("faces") or {})
    detector = dict(faces.get("detector") or {})
    extra = sorted(set(faces) - {"detector"})
    if extra:
        raise ValueError(f"unknown curation.faces parameter(s) {extra}; valid keys: ['detector']")
    try:
        make_detector(**detector)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise ValueError(f"curation.faces.detector: {exc}") from exc
    return CurationConfig(
        progress=bool(params.get("progress", True)),
        index=_from_dict(IndexConfig, params.get("index"), "curation.index"),
        filter_network=filter_network,
        scoring=_from_dict(ScoringConfig, params.get("scoring"), "curation.scoring"),
        filters=FilterConfig.from_dict(params.get("filters")),
        dedup=DedupConfig.from_dict(params.get("dedup")),
        faces=detector,
        subset=SubsetConfig.from_dict(params.get("subset")),
        report=_from_dict(ReportConfig, params.get("report"), "curation.report"),
        executor=ExecutorConfig.from_dict(params.get("executor")),
    )


def _done(node: str, start: float, message: str, *args: Any) -> float:
    seconds = time.perf_counter() - start
    logger.info(f"{node}: {message} in %.1f s", *args, seconds)
    return round(seconds, 3)


def build_pool_index(raw_pool: ShardSet, params: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
    """Decode every pool sample safely and index it (sizes, hashes, caption, reject reason)."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    if cfg.executor.kind == "ray":
        index, summary = ray_engine.build_index(raw_pool, cfg.index, cfg.executor, cfg.progress)
    else:
        index, summary = build_index(raw_pool, cfg.index, progress=cfg.progress)
    summary["seconds"] = _done(
        "build_pool_index", start, "%d samples in %d shards, %d valid, rejected %s",
        index.height, summary["shards"], summary["valid"], summary["rejected"],
    )
    return index, summary


def train_filter_network_node(trusted_pairs: ShardSet, params: dict[str, Any]) -> dict[str, Any]:
    """Train the DFN filtering network on the trusted pairs (skipped when an open_clip model
    scores the pool: the checkpoint then records why it is empty)."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    if cfg.scoring.model != "filter_network":
        logger.info("train_filter_network: skipped, curation.scoring.model is %s", cfg.scoring.model)
        return {
            "config": {"skipped": True, "scoring_model": cfg.scoring.model},
            "state_dict": {},
            "metadata": {"skipped": True, "seconds": 0.0},
        }
    pairs = (
        (found[1], sample_text(sample) or "")
        for sample in trusted_pairs
        if ERROR_KEY not in sample and (found := image_bytes(sample)) is not None
    )
    checkpoint = train_filter_network(pairs, cfg.filter_network)
    meta = checkpoint["metadata"]
    _done(
        "train_filter_network", start, "%d pairs, %d steps, loss %.3f -> %.3f",
        meta.get("pairs", 0), meta.get("steps", 0), meta.get("initial_loss", float("nan")),
        meta.get("final_loss", float("nan")),
    )
    return checkpoint


def scorer_loader(
    cfg: CurationConfig, filter_network: Mapping[str, Any] | None
) -> functools.partial[ClipScorer]:
    """``load_clip_model`` bound to the model ``curation.scoring`` names, not yet called: Ray
    ships it to each scoring actor, which then imports only the scoring library."""
    s = cfg.scoring
    if s.model == "filter_network":
        if not filter_network or not filter_network.get("state_dict"):
            raise ValueError(
                "curation.scoring.model is filter_network but the filter_network checkpoint is "
                "empty; run the train_filter_network node with that setting first"
            )
        return functools.partial(
            load_clip_model, "", checkpoint=filter_network, device=s.device,
            precision=s.precision, batch_size=s.batch_size,
        )
    return functools.partial(
        load_clip_model, str(s.model_name), pretrained=s.pretrained, device=s.device,
        precision=s.precision, batch_size=s.batch_size,
    )


def load_scorer(cfg: CurationConfig, filter_network: Mapping[str, Any] | None) -> ClipScorer:
    """The scoring model that ``curation.scoring`` names."""
    return scorer_loader(cfg, filter_network)()


def check_scoring_model(params: dict[str, Any]) -> None:
    """Before a run that scores: an open_clip model must be loadable from local files or the
    Hub (a missing path, an unknown name, or a download while offline fails here, naming the
    parameter and the fix). Loads no weights."""
    s = validate_curation_params(params).scoring
    if s.model != "open_clip":
        return
    try:
        resolve_open_clip_source(str(s.model_name), s.pretrained)
    except (FileNotFoundError, ValueError, ModelUnavailableError) as exc:
        raise type(exc)(
            f"curation.scoring.model_name={s.model_name!r} / curation.scoring.pretrained="
            f"{s.pretrained!r} cannot be used: {exc}"
        ) from exc


def _score_tables(
    result: Mapping[str, np.ndarray], summary: dict[str, Any], start: float, where: str
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """``clip_scores`` and ``clip_embeddings`` from scoring arrays, and the node's summary."""
    uids = pl.Series(result["uid"].tolist(), dtype=pl.String)
    scores = pl.DataFrame({
        "uid": uids,
        "clip_score": pl.Series(result["clip_score"], dtype=pl.Float32),
        "nsfw_score": pl.Series(result["nsfw_score"], dtype=pl.Float32),
    })
    embeddings = pl.DataFrame({
        "uid": uids,
        "image_emb": pl.Series(result["image_emb"].astype(np.float16)),
        "text_emb": pl.Series(result["text_emb"].astype(np.float16)),
    })
    summary = {
        **summary,
        "scored": scores.height,
        "embed_dim": int(result["image_emb"].shape[1]),
        "nan_scores": int(scores["clip_score"].is_nan().sum()),
    }
    summary["seconds"] = _done(
        "score_pool", start, "%d samples scored with %s%s", scores.height, summary["model"], where
    )
    return scores, embeddings, summary


def _score_pool_on_ray(
    raw_pool: ShardSet,
    pool_index: pl.DataFrame,
    filter_network: dict[str, Any],
    cfg: CurationConfig,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """``score_pool`` on Ray Data: decode tasks and an actor pool of scorers (each loads the
    model itself), same tables; the per-shard cache is not used on this path."""
    start = time.perf_counter()
    result, counts = ray_engine.score_index(
        scorer_loader(cfg, filter_network), raw_pool,
        pool_index.filter(pl.col("reject_reason").is_null()), cfg.index,
        cfg.scoring.batch_size, cfg.scoring.nsfw(cfg.filters.nsfw_threshold), cfg.executor,
        want_gpu=cfg.scoring.device != "cpu", progress=cfg.progress,
    )
    model = counts.pop("model")
    return _score_tables(result, {"model": model, "executor": "ray", **counts}, start, " on Ray")


def score_pool(
    raw_pool: ShardSet,
    pool_index: pl.DataFrame,
    filter_network: dict[str, Any],
    clip_score_cache: ShardResultCache,
    params: dict[str, Any],
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """CLIP score, NSFW score and float16 embeddings of every decodable, captioned sample,
    shard by shard; each finished shard goes to ``clip_score_cache``, so a killed run resumes
    from the finished shards. Returns clip_scores, clip_embeddings and a summary."""
    cfg = validate_curation_params(params)
    if cfg.executor.kind == "ray":
        return _score_pool_on_ray(raw_pool, pool_index, filter_network, cfg)
    start = time.perf_counter()
    scorer = load_scorer(cfg, filter_network)
    nsfw = cfg.scoring.nsfw(cfg.filters.nsfw_threshold)
    valid = pool_index.filter(pl.col("reject_reason").is_null())
    result, counts = score_index(
        scorer, raw_pool, valid, cfg.index, cfg.scoring.batch_size, nsfw,
        cache=clip_score_cache, progress=cfg.progress,
    )
    return _score_tables(result, {"model": scorer.model_name, **counts}, start, "")


def apply_filters(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, params: dict[str, Any]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """DataComp basic filters and the NSFW cut for every sample the index accepted."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    decisions = filter_decisions(pool_index, clip_scores, cfg.filters)
    counts = dict(decisions.group_by("reject_reason").len().drop_nulls().iter_rows())
    summary: dict[str, Any] = {"checked": int(pool_index["reject_reason"].is_null().sum()), **counts}
    summary["seconds"] = _done("apply_filters", start, "rejected %s", counts)
    return decisions, summary


def _eval_index(
    probe_test: ShardSet, cfg: CurationConfig, scorer: ClipScorer | None
) -> tuple[pl.DataFrame, np.ndarray | None]:
    """Hashes (and embeddings when a rule needs them) of the evaluation test images."""
    rows: list[dict[str, Any]] = []
    embeddings: list[np.ndarray] = []
    for path in probe_test.shards:
        images = []
        for row, image in eval_records(probe_test.iter_shard(path), cfg.index):
            rows.append(row)
            images.append(image)
        if scorer is not None:
            present = [im for im in images if im is not None]
            emb = scorer.embed_images(present) if present else np.zeros((0, scorer.embed_dim))
            full = np.zeros((len(images), scorer.embed_dim), dtype=np.float16)
            full[[i for i, im in enumerate(images) if im is not None]] = emb
            embeddings.append(full)
    table = pl.DataFrame(rows, schema=EVAL_SCHEMA, orient="row") if rows else pl.DataFrame(
        schema=EVAL_SCHEMA
    )
    return table, (np.concatenate(embeddings) if embeddings else None)


def deduplicate_pool(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    clip_embeddings: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    probe_test: ShardSet,
    filter_network: dict[str, Any],
    params: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak and duplicate decisions: leaks of ``probe_test`` first, then one representative
    per duplicate cluster among the samples that passed the earlier stages."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    pool = (
        pool_index.select(
            "uid", "sha256_bytes", "sha256_pixels", "phash", "phash_crops", "color_grid",
            pl.col("reject_reason").alias("index_reason"),
        )
        .join(clip_scores.select("uid", "clip_score"), on="uid", how="left", maintain_order="left")
        .join(
            filter_decisions.select("uid", pl.col("reject_reason").alias("filter_reason")),
            on="uid", how="left", maintain_order="left",
        )
        .with_columns(
            candidate=pl.col("index_reason").is_null() & pl.col("filter_reason").is_null()
        )
    )
    embeddings = None
    scorer = None
    if cfg.dedup.needs_embeddings:
        aligned = pool.select("uid").join(
            clip_embeddings.select("uid", "image_emb"), on="uid", how="left", maintain_order="left"
        )
        dim = clip_embeddings["image_emb"].dtype.size if clip_embeddings.height else 1
        embeddings = np.zeros((pool.height, dim), dtype=np.float16)
        present = aligned["image_emb"].is_not_null().to_numpy()
        if present.any():
            embeddings[present] = aligned.filter(pl.col("image_emb").is_not_null())[
                "image_emb"
            ].to_numpy()
        if cfg.dedup.eval_embedding_threshold is not None:
            scorer = load_scorer(cfg, filter_network)
    eval_table, eval_embeddings = _eval_index(probe_test, cfg, scorer)
    decisions, summary = deduplicate(pool, embeddings, eval_table, eval_embeddings, cfg.dedup)
    summary["eval_images"] = eval_table.height
    summary["seconds"] = _done(
        "deduplicate", start, "%d clusters over %d samples, rejected %d eval leaks and %d "
        "duplicates (%d test images)", summary["clusters"], summary["samples_in_clusters"],
        summary["rejected_eval_leak"], summary["rejected_duplicate"], eval_table.height,
    )
    return decisions, summary


def build_pool_manifest(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    dedup_decisions: pl.DataFrame,
    params: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Combine every stage's decision, apply the score cut to the deduplicated survivors, and
    account for every pool sample: input = kept + rejected."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    table = (
        pool_index.select(
            "uid", "shard", "key", "position",
            pl.col("reject_reason").alias("r0"), pl.col("reject_detail").alias("d0"),
        )
        .join(clip_scores.select("uid", "clip_score"), on="uid", how="left", maintain_order="left")
        .join(
            filter_decisions.select(
                "uid", pl.col("reject_reason").alias("r1"), pl.col("reject_detail").alias("d1")
            ),
            on="uid", how="left", maintain_order="left",
        )
        .join(
            dedup_decisions.select(
                "uid", pl.col("reject_reason").alias("r2"), pl.col("reject_detail").alias("d2"),
                "dedup_cluster", "eval_id",
            ),
            on="uid", how="left", maintain_order="left",
        )
        .with_columns(
            reject_reason=pl.coalesce("r0", "r1", "r2"),
            reject_detail=pl.when(pl.col("r0").is_not_null()).then("d0")
            .when(pl.col("r1").is_not_null()).then("d1")
            .otherwise("d2"),
        )
    )
    if table.height != pool_index.height:
        raise AssertionError(
            f"manifest has {table.height} rows for {pool_index.height} indexed samples: "
            "uids repeat across the stage tables"
        )
    candidates = table["reject_reason"].is_null().to_numpy()
    scores = table["clip_score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    keep, threshold = select_by_score(scores[candidates], cfg.filters)
    kept = np.zeros(table.height, dtype=bool)
    kept[np.flatnonzero(candidates)[keep]] = True
    cut = candidates & ~kept
    rule = (
        f">= threshold {threshold:g}"
        if cfg.filters.threshold is not None
        else f"top {cfg.filters.keep_fraction:g} of {int(candidates.sum())}, cut {threshold:.4f}"
    )
    details = [
        f"clip_score {s:.4f} not in {rule}" if c else None for s, c in zip(scores, cut, strict=True)
    ]
    manifest = table.with_columns(
        kept=pl.Series(kept),
        reject_reason=pl.when(pl.Series(cut)).then(pl.lit(LOW_CLIP_SCORE)).otherwise("reject_reason"),
        reject_detail=pl.when(pl.Series(cut)).then(pl.Series(details)).otherwise("reject_detail"),
    ).select(list(MANIFEST_SCHEMA)).cast(MANIFEST_SCHEMA)
    n_kept = int(manifest["kept"].sum())
    n_rejected = int(manifest["reject_reason"].is_not_null().sum())
    if n_kept + n_rejected != pool_index.height or manifest["uid"].n_unique() != manifest.height:
        raise AssertionError(
            f"pool manifest does not add up: {n_kept} kept + {n_rejected} rejected != "
            f"{pool_index.height} input samples (or uids repeat)"
        )
    if manifest.filter(pl.col("kept") == pl.col("reject_reason").is_not_null()).height:
        raise AssertionError("pool manifest: a sample is both kept and rejected, or neither")
    summary = {
        "input": pool_index.height,
        "kept": n_kept,
        "rejected": n_rejected,
        "score_cut_candidates": int(candidates.sum()),
        "threshold": None if not np.isfinite(threshold) else round(float(threshold), 6),
        "threshold_rule": "absolute" if cfg.filters.threshold is not None else "keep_fraction",
        "keep_fraction": cfg.filters.keep_fraction,
    }
    summary["seconds"] = _done(
        "build_pool_manifest", start, "%d input = %d kept + %d rejected, score cut %s",
        pool_index.height, n_kept, n_rejected, summary["threshold"],
    )
    return manifest, summary


def detect_faces_node(
    raw_pool: ShardSet, pool_manifest: pl.DataFrame, params: dict[str, Any]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Face boxes of every kept sample, shard by shard."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    detector = make_detector(**cfg.faces)
    kept = pool_manifest.filter(pl.col("kept")).select("uid", "shard", "key", "position")
    if cfg.executor.kind == "ray":
        table, summary = ray_engine.detect_faces(
            detector, raw_pool, kept, cfg.index, cfg.executor, progress=cfg.progress
        )
    else:
        table, summary = detect_faces(detector, raw_pool, kept, cfg.index, progress=cfg.progress)
    summary["seconds"] = _done(
        "detect_faces", start, "%d faces in %d of %d kept images", summary["faces"],
        summary["images_with_faces"], summary["images"],
    )
    return table, summary


def write_dfn_subset(
    raw_pool: ShardSet,
    pool_manifest: pl.DataFrame,
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    face_boxes: pl.DataFrame,
    params: dict[str, Any],
) -> tuple[Any, pl.DataFrame, dict[str, Any]]:
    """The curated subset (faces blurred, resized; streamed to the shard writer), its manifest
    and stats. ``dfn_manifest.face_boxes`` are in raw-pool pixels; each subset sample's .json
    has them in its own pixels."""
    cfg = validate_curation_params(params)
    rows = (
        pool_manifest.filter(pl.col("kept"))
        .select("uid", "shard", "key", "position", "clip_score", "dedup_cluster")
        .join(pool_index.select("uid", "caption"), on="uid", how="left", maintain_order="left")
        .join(clip_scores.select("uid", "nsfw_score"), on="uid", how="left", maintain_order="left")
        .join(face_boxes.select("uid", "boxes", "face_count"), on="uid", how="left",
              maintain_order="left")
        .with_columns(
            pl.col("boxes").fill_null(pl.lit([], dtype=pl.List(pl.List(pl.Int32)))),
            pl.col("face_count").fill_null(0),
        )
    )
    missing = rows.filter(pl.col("caption").is_null()).height
    if missing:
        raise AssertionError(f"{missing} kept samples have no caption in pool_index")
    manifest = rows.select(
        "uid", "caption", "clip_score", "nsfw_score", "dedup_cluster", "face_count",
        pl.col("boxes").alias("face_boxes"), "shard", "key",
    )
    stats: dict[str, Any] = {
        "kept": rows.height,
        "with_faces": int((rows["face_count"] > 0).sum()),
        "shorter_side": cfg.subset.shorter_side,
        "image_format": cfg.subset.image_format,
    }
    if cfg.executor.kind == "ray":
        samples = ray_engine.iter_subset(
            raw_pool, rows, cfg.subset, cfg.index, cfg.executor, stats, progress=cfg.progress
        )
    else:
        samples = iter_subset(raw_pool, rows, cfg.subset, cfg.index, stats, progress=cfg.progress)
    logger.info(
        "write_dfn_subset: streaming %d samples (%d with faces) to the shard writer",
        rows.height, stats["with_faces"],
    )
    return samples, manifest, stats


def report_curation(
    pool_manifest: pl.DataFrame,
    face_boxes: pl.DataFrame,
    dfn_manifest: pl.DataFrame,
    sample_truth: pl.DataFrame | None,
    filter_network: dict[str, Any],
    index_stats: dict[str, Any],
    scoring_stats: dict[str, Any],
    filter_stats: dict[str, Any],
    dedup_stats: dict[str, Any],
    selection_stats: dict[str, Any],
    face_stats: dict[str, Any],
    subset_stats: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The funnel, the score cut, seconds per stage and, when a truth table is given, each
    stage's precision and recall against it."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    flow = funnel(pool_manifest)
    if flow["input"] != flow["kept"] + flow["rejected"]:
        raise AssertionError("curation report: input != kept + rejected")
    if dfn_manifest.height != flow["kept"]:
        raise AssertionError(
            f"dfn_manifest has {dfn_manifest.height} rows but the pool manifest keeps {flow['kept']}"
        )
    train_meta = dict(filter_network.get("metadata") or {})
    report: dict[str, Any] = {
        "funnel": flow,
        "score_cut": {
            "threshold": selection_stats.get("threshold"),
            "rule": selection_stats.get("threshold_rule"),
            "keep_fraction": selection_stats.get("keep_fraction"),
            "candidates": selection_stats.get("score_cut_candidates"),
            "scoring_model": scoring_stats.get("model"),
        },
        "seconds": {
            "build_pool_index": index_stats.get("seconds"),
            "train_filter_network": train_meta.get("seconds"),
            "score_pool": scoring_stats.get("seconds"),
            "apply_filters": filter_stats.get("seconds"),
            "deduplicate": dedup_stats.get("seconds"),
            "build_pool_manifest": selection_stats.get("seconds"),
            "detect_faces": face_stats.get("seconds"),
            "write_dfn_subset": subset_stats.get("seconds"),
        },
        "filter_network": train_meta,
        "dedup": {k: v for k, v in dedup_stats.items() if k != "seconds"},
        "faces": {k: v for k, v in face_stats.items() if k != "seconds"},
        "subset": {k: v for k, v in subset_stats.items() if k != "seconds"},
        "truth": None,
    }
    if sample_truth is not None and sample_truth.height:
        report["truth"] = truth_metrics(
            pool_manifest, sample_truth, face_boxes, face_iou=cfg.report.face_iou
        )
    truth = report["truth"] or {}
    _done(
        "report_curation", start, "%d input, %d kept; wrong-caption AUC %s, near-dup recall %s",
        flow["input"], flow["kept"],
        (truth.get("wrong_caption") or {}).get("roc_auc_clip_score_vs_clean"),
        (truth.get("near_duplicate") or {}).get("detection_recall"),
    )
    return report


def _thumbnail_rows(manifest: pl.DataFrame, n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Up to ``n`` kept rows (spread over the score range) and ``n`` rejected rows (round-robin
    over reasons), chosen deterministically."""
    kept = manifest.filter(pl.col("kept")).sort("clip_score", descending=True)
    if kept.height > n:
        picks = np.linspace(0, kept.height - 1, n).round().astype(int)
        kept = kept[np.unique(picks).tolist()]
    rejected = manifest.filter(~pl.col("kept")).sort("uid")
    by_reason = [g for _, g in sorted(rejected.partition_by("reject_reason", as_dict=True).items())]
    chosen: list[pl.DataFrame] = []
    for k in range(n):
        for group in by_reason:
            if len(chosen) < n and k < group.height:
                chosen.append(group[k : k + 1])
    rejected = pl.concat(chosen) if chosen else rejected.head(0)
    return kept, rejected


def plot_curation(
    pool_manifest: pl.DataFrame,
    curation_report: dict[str, Any],
    raw_pool: ShardSet,
    params: dict[str, Any],
) -> tuple[Figure, Figure, Figure]:
    """The funnel per reason, the score histogram with the cut, and kept/rejected thumbnails."""
    cfg = validate_curation_params(params)
    start = time.perf_counter()
    funnel_fig = plot_funnel(curation_report["funnel"])
    reached = pool_manifest.filter(
        pl.col("kept") | (pl.col("reject_reason") == LOW_CLIP_SCORE)
    )
    groups = {
        "kept": reached.filter(pl.col("kept"))["clip_score"].to_numpy(),
        "below the cut": reached.filter(~pl.col("kept"))["clip_score"].to_numpy(),
        "rejected earlier": pool_manifest.filter(
            ~pl.col("kept") & (pl.col("reject_reason") != LOW_CLIP_SCORE)
        )["clip_score"].drop_nulls().to_numpy(),
    }
    histogram = plot_score_histogram(
        pool_manifest["clip_score"].drop_nulls().to_numpy(),
        curation_report["score_cut"].get("threshold"),
        groups,
        bins=cfg.report.histogram_bins,
    )
    kept_rows, rejected_rows = _thumbnail_rows(pool_manifest, cfg.report.thumbnails)

    def images(rows: pl.DataFrame, label: Any) -> list:
        found = {}
        for row, image in decode_selected(raw_pool, rows, cfg.index):
            if image is not None:
                found[row["uid"]] = (image, label(row))
        return [found[u] for u in rows["uid"].to_list() if u in found]

    def score_text(row: dict[str, Any]) -> str:
        return "no score" if row["clip_score"] is None else f"{row['clip_score']:.3f}"

    thumbs = plot_thumbnails(
        images(kept_rows, score_text),
        images(rejected_rows, lambda r: f"{r['reject_reason']}\n{score_text(r)}"),
    )
    _done("plot_curation", start, "3 figures (%d+%d thumbnails)", kept_rows.height,
          rejected_rows.height)
    return funnel_fig, histogram, thumbs


__all__ = [
    "CurationConfig",
    "ReportConfig",
    "ScoringConfig",
    "apply_filters",
    "build_pool_index",
    "build_pool_manifest",
    "deduplicate_pool",
    "detect_faces_node",
    "load_scorer",
    "plot_curation",
    "report_curation",
    "score_pool",
    "train_filter_network_node",
    "validate_curation_params",
    "write_dfn_subset",
]
