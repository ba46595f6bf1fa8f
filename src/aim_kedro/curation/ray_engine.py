"""The per-shard curation stages on Ray Data: the same library functions, run shard-parallel.

The local path runs ``index.index_shard``, ``clip_score.score_shard``, ``subset.detect_faces`` and
``subset.iter_subset`` one shard after another in one process. This module runs exactly those
functions as Ray Data stages, one shard (or one scoring batch) per task, so a pool of billions of
pairs spreads over a cluster while a laptop runs the same code with a local Ray:

- index, faces, subset: CPU tasks, one per shard; each calls the library function on a
  one-shard ``ShardSet`` and returns its result (table and summary) or, for the subset, its
  samples, in shard order;
- scoring: CPU tasks decode each shard into batches of ``batch_size`` records (the batches
  ``score_shard`` forms locally, so every score is bit-identical to the local path), and an actor
  pool holding the CLIP scorer (one GPU per actor when the cluster has GPUs) scores them.

The global steps (threshold, dedup) stay on the driver over compact arrays; this module never
sees them. Shards are read by the workers through fsspec, so a pool at ``s3://`` or ``gs://``
needs the filesystem package and credentials on every node, not only on the driver.
``ray`` is an optional dependency, imported only when a Ray stage runs; torch and open_clip are
imported only where scoring runs, so the CPU workers of the other stages start faster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from aim_kedro.common.config import from_mapping
from aim_kedro.curation import subset
from aim_kedro.curation.faces import FaceDetector
from aim_kedro.curation.index import (
    IndexConfig,
    decode_selected,
    empty_index,
    index_shard,
    mark_duplicate_uids,
    shard_name,
)
from aim_kedro.curation.subset import SubsetConfig
from aim_kedro.io.shards import Sample, ShardSet, read_shard

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from aim_kedro.curation.clip_score import ClipScorer, NsfwConfig

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
SUBSET_ROWS_PER_BLOCK = 64


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the per-shard stages run (``curation.executor``).

    ``kind: local`` runs them in the Kedro process; ``kind: ray`` on Ray Data: the cluster at
    ``address`` (else ``RAY_ADDRESS``, else a local Ray of ``num_cpus`` CPUs). Scoring runs in
    ``scoring_actors`` actors of ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs (``auto``:
    1 when the cluster has GPUs, else 0), on batches of ``scoring_batch_size`` records (None:
    ``curation.scoring.batch_size``, which keeps scores bit-identical to the local path).
    """

    kind: str = "local"
    address: str | None = None
    num_cpus: int | None = None
    scoring_actors: int = 1
    scoring_batch_size: int | None = None
    gpus_per_actor: float | str = "auto"
    cpus_per_actor: float = 1.0
    cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(
                f"curation.executor.kind must be one of {list(EXECUTORS)}, got {self.kind!r}; "
                "use local (one process) or ray (`kedro run -e ray --pipeline curation`)"
            )
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError(
                "curation.executor.kind is ray but Ray is not installed: "
                "pip install -e '.[ray]', or set curation.executor.kind: local"
            )
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ValueError(
                f"curation.executor.address must be a Ray address (auto, host:6379, "
                f"ray://host:10001) or null, got {self.address!r}"
            )
        if self.num_cpus is not None and (_not_int(self.num_cpus) or int(self.num_cpus) < 1):
            raise ValueError(
                f"curation.executor.num_cpus must be a CPU count >= 1 or null (all cores), "
                f"got {self.num_cpus!r}"
            )
        if _not_int(self.scoring_actors) or int(self.scoring_actors) < 1:
            raise ValueError(
                f"curation.executor.scoring_actors must be >= 1, got {self.scoring_actors!r}; "
                "e.g. one per GPU"
            )
        if self.scoring_batch_size is not None and (
            _not_int(self.scoring_batch_size) or int(self.scoring_batch_size) < 1
        ):
            raise ValueError(
                f"curation.executor.scoring_batch_size must be >= 1 or null (use "
                f"curation.scoring.batch_size), got {self.scoring_batch_size!r}"
            )
        if self.gpus_per_actor != "auto" and (
            not isinstance(self.gpus_per_actor, int | float)
            or isinstance(self.gpus_per_actor, bool)
            or self.gpus_per_actor < 0
        ):
            raise ValueError(
                f"curation.executor.gpus_per_actor must be auto or a number >= 0 (0.5 packs "
                f"two actors on a GPU), got {self.gpus_per_actor!r}"
            )
        for name in ("cpus_per_actor", "cpus_per_task"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"curation.executor.{name} must be a number > 0, got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ExecutorConfig:
        """Build from ``curation.executor``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.executor")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# --- Ray session and Ray Data plumbing ------------------------------------------------------


def ensure_ray(cfg: ExecutorConfig) -> None:
    """Connect to the cluster the config names (or ``RAY_ADDRESS``), else start a fresh local
    Ray; reuse a Ray this process already started (a test's, or an earlier stage's)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        if cfg.num_cpus is not None:
            logger.warning("curation.executor.num_cpus is ignored: connecting to Ray at %s", address)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    logger.info(
        "ray: %s with %g CPUs, %g GPUs", address or "local Ray", resources.get("CPU", 0),
        resources.get("GPU", 0),
    )


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Ray Data keeps input order (results come back in shard order) and shows its progress
    bars when ``progress``; the previous settings come back afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = bool(progress)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before


def _shard_items(
    shards: ShardSet, table: pl.DataFrame | None, order: str = "shards"
) -> list[dict[str, Any]]:
    """One work item per shard: its position, path and (pickled) rows of ``table``.

    ``order`` is ``shards`` (the pool's shard order, as ``decode_selected`` walks it) or
    ``table`` (the order shards first appear in ``table``, as ``score_index`` walks it).
    """
    if table is None:
        return [{"order": i, "path": p, "rows": b""} for i, p in enumerate(shards.shards)]
    if table.height == 0:
        return []
    groups = table.partition_by("shard", as_dict=True, maintain_order=True)
    by_name = {shard_name(path): path for path in shards.shards}
    missing = sorted({key[0] for key in groups} - set(by_name))
    if missing:
        raise ValueError(
            f"shards {missing[:3]} of the index are not in {shards.path}; the pool changed "
            "since pool_index was built: re-run build_pool_index"
        )
    names = [key[0] for key in groups] if order == "table" else list(by_name)
    return [
        {"order": i, "path": by_name[name], "rows": pickle.dumps(groups[(name,)])}
        for i, name in enumerate(n for n in names if (n,) in groups)
    ]


def _dataset(items: list[dict[str, Any]]) -> ray.data.Dataset:
    """A dataset of one block per work item, so every shard is its own task."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _one_shard(item: Mapping[str, Any], shards_path: str) -> tuple[ShardSet, pl.DataFrame | None]:
    """The one-shard ``ShardSet`` and the rows of a work item."""
    rows = pickle.loads(item["rows"]) if item["rows"] else None
    return ShardSet(path=shards_path, shards=[item["path"]]), rows


def _run_per_shard(
    batch: pa.Table,
    work: Callable[..., tuple[pl.DataFrame, dict[str, Any]]],
    shards_path: str,
    kwargs: Mapping[str, Any],
) -> pa.Table:
    """Ray task body: ``work(shard_set, rows, **kwargs)`` for each item, pickled per row."""
    import pyarrow as pa

    out = []
    for item in batch.to_pylist():
        shard_set, rows = _one_shard(item, shards_path)
        result = work(shard_set, rows, **kwargs)
        out.append({"order": item["order"], "result": pickle.dumps(result)})
    return pa.Table.from_pylist(out, schema=pa.schema([("order", pa.int64()), ("result", pa.large_binary())]))


def _per_shard(
    items: list[dict[str, Any]],
    work: Callable[..., tuple[pl.DataFrame, dict[str, Any]]],
    shards_path: str,
    executor: ExecutorConfig,
    progress: bool,
    **kwargs: Any,
) -> list[tuple[pl.DataFrame, dict[str, Any]]]:
    """``work(shard_set, rows, **kwargs)`` on every shard as Ray CPU tasks; results in item
    order."""
    ensure_ray(executor)
    with _data_context(progress):
        ds = _dataset(items).map_batches(
            _run_per_shard,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"work": work, "shards_path": shards_path, "kwargs": kwargs},
            num_cpus=executor.cpus_per_task,
        )
        rows = sorted(ds.iter_rows(), key=lambda r: r["order"])
    if [r["order"] for r in rows] != list(range(len(items))):
        raise RuntimeError(f"ray returned {len(rows)} results for {len(items)} shards")
    return [pickle.loads(r["result"]) for r in rows]


# --- the stages -----------------------------------------------------------------------------


def _index_work(
    shard_set: ShardSet, rows: pl.DataFrame | None, cfg: IndexConfig
) -> tuple[pl.DataFrame, dict[str, Any]]:
    path = shard_set.shards[0]
    return index_shard(read_shard(path), shard_name(path), cfg), {}


def build_index(
    shards: ShardSet, cfg: IndexConfig, executor: ExecutorConfig, progress: bool = True
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``index.build_index`` with one Ray task per shard: the same table and summary."""
    start = time.perf_counter()
    items = _shard_items(shards, None)
    frames = [t for t, _ in _per_shard(items, _index_work, shards.path, executor, progress,
                                        cfg=cfg)] if items else []
    index = pl.concat(frames, how="vertical") if frames else empty_index()
    index = mark_duplicate_uids(index)
    reasons = dict(index.group_by("reject_reason").len().drop_nulls("reject_reason").iter_rows())
    summary = {
        "shards": len(shards.shards),
        "samples": index.height,
        "valid": index.height - sum(reasons.values()),
        "rejected": reasons,
        "executor": "ray",
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("ray index: %d samples of %d shards in %.1f s", index.height, len(items),
                summary["seconds"])
    return index, summary


def _faces_work(
    shard_set: ShardSet, rows: pl.DataFrame, detector: FaceDetector, index_cfg: IndexConfig
) -> tuple[pl.DataFrame, dict[str, Any]]:
    return subset.detect_faces(detector, shard_set, rows, index_cfg, progress=False)


def detect_faces(
    detector: FaceDetector,
    shards: ShardSet,
    rows: pl.DataFrame,
    index_cfg: IndexConfig,
    executor: ExecutorConfig,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``subset.detect_faces`` with one Ray task per shard (the detector is shipped to each, its
    model loaded there): the same face table, in the same order, and summary."""
    start = time.perf_counter()
    items = _shard_items(shards, rows)
    if not items:
        return subset.detect_faces(detector, shards, rows, index_cfg, progress=False)
    parts = _per_shard(items, _faces_work, shards.path, executor, progress, detector=detector,
                       index_cfg=index_cfg)
    table = pl.concat([t for t, _ in parts], how="vertical")
    summary = {
        "images": table.height,
        "images_with_faces": int((table["face_count"] > 0).sum()),
        "faces": int(table["face_count"].sum()),
        "undecodable": sum(int(s["undecodable"]) for _, s in parts),
        "executor": "ray",
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("ray faces: %d faces in %d of %d images in %.1f s", summary["faces"],
                summary["images_with_faces"], summary["images"], summary["seconds"])
    return table, summary


def _decode_batches(
    batch: pa.Table, shards_path: str, index_cfg: IndexConfig, batch_size: int
) -> Iterator[pa.Table]:
    """Ray task body: decode one shard's rows into pickled ``(uid, image, caption)`` batches of
    ``batch_size`` records, the batches ``score_shard`` would form for that shard."""
    import pyarrow as pa

    schema = pa.schema([("order", pa.int64()), ("chunk", pa.int64()), ("records", pa.large_binary())])
    for item in batch.to_pylist():
        shard_set, rows = _one_shard(item, shards_path)
        records: list[tuple[str, Any, str | None]] = []
        chunk = 0
        for row, image in decode_selected(shard_set, rows, index_cfg):
            records.append((row["uid"], image, row["caption"]))
            if len(records) == batch_size:
                yield pa.table([[item["order"]], [chunk], [pickle.dumps(records)]], schema=schema)
                records, chunk = [], chunk + 1
        if records:
            yield pa.table([[item["order"]], [chunk], [pickle.dumps(records)]], schema=schema)


class _ScoringActor:
    """Ray actor: holds one CLIP scorer and scores decoded batches with ``score_shard``."""

    def __init__(self, make_scorer: Callable[[], ClipScorer], batch_size: int, nsfw: NsfwConfig) -> None:
        from aim_kedro.curation.clip_score import SCORE_FIELDS, score_shard

        self.fields, self.score_shard = SCORE_FIELDS, score_shard
        self.scorer = make_scorer()
        self.batch_size = batch_size
        self.nsfw = nsfw

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score every decoded batch of ``batch``; one pickled result per input row."""
        import pyarrow as pa

        out = []
        for row in batch.to_pylist():
            records = pickle.loads(row["records"])
            result = self.score_shard(
                self.scorer, records, self.batch_size, self.nsfw, progress=False
            )
            out.append({
                "order": row["order"], "chunk": row["chunk"], "model": self.scorer.model_name,
                "result": pickle.dumps({name: result[name] for name in self.fields}),
            })
        return pa.Table.from_pylist(out, schema=pa.schema([
            ("order", pa.int64()), ("chunk", pa.int64()), ("model", pa.string()),
            ("result", pa.large_binary()),
        ]))


def resolve_gpus(cfg: ExecutorConfig, want_gpu: bool = True) -> float:
    """GPUs per scoring actor: the configured number, or (``auto``) 1 when the cluster has a GPU
    and the scorer may use one."""
    import ray

    if cfg.gpus_per_actor != "auto":
        return float(cfg.gpus_per_actor)
    return 1.0 if want_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def score_index(
    make_scorer: Callable[[], ClipScorer],
    shards: ShardSet,
    index: pl.DataFrame,
    index_cfg: IndexConfig,
    batch_size: int,
    nsfw: NsfwConfig,
    executor: ExecutorConfig,
    want_gpu: bool = True,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``clip_score.score_index`` on Ray: CPU tasks decode, an actor pool of ``make_scorer()``
    scorers runs ``score_shard``; the ``SCORE_FIELDS`` arrays in index order, and counts.

    ``make_scorer`` must pickle (it runs in each actor). With ``executor.scoring_batch_size``
    unset the batches are those of the local path, so the arrays are bit-identical to it.
    """
    from aim_kedro.curation.clip_score import concat_score_parts

    start = time.perf_counter()
    chunk = int(executor.scoring_batch_size or batch_size)
    items = _shard_items(shards, index, order="table")
    counts: dict[str, Any] = {"shards": len(items), "scored_shards": len(items),
                              "resumed_shards": 0}
    if not items:
        scorer = make_scorer()
        return concat_score_parts([], scorer.embed_dim), {**counts, "model": scorer.model_name}
    ensure_ray(executor)
    import ray.data

    gpus = resolve_gpus(executor, want_gpu)
    with _data_context(progress):
        ds = _dataset(items).map_batches(
            _decode_batches,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"shards_path": shards.path, "index_cfg": index_cfg, "batch_size": chunk},
            num_cpus=executor.cpus_per_task,
        ).map_batches(
            _ScoringActor,
            batch_size=1,
            batch_format="pyarrow",
            fn_constructor_kwargs={"make_scorer": make_scorer, "batch_size": chunk, "nsfw": nsfw},
            compute=ray.data.ActorPoolStrategy(size=int(executor.scoring_actors)),
            num_cpus=executor.cpus_per_actor,
            num_gpus=gpus,
        )
        rows = sorted(ds.iter_rows(), key=lambda r: (r["order"], r["chunk"]))
    parts = [pickle.loads(r["result"]) for r in rows]
    out = concat_score_parts(parts, int(np.asarray(parts[0]["image_emb"]).shape[1]))
    if len(out["uid"]) != index.height:
        raise RuntimeError(f"ray scored {len(out['uid'])} samples for {index.height} index rows")
    counts.update(model=rows[0]["model"], scoring_actors=int(executor.scoring_actors),
                  gpus_per_actor=gpus, scoring_batch_size=chunk)
    logger.info("ray score: %d samples of %d shards, %d actor(s) with %g GPU each, in %.1f s",
                index.height, len(items), executor.scoring_actors, gpus,
                time.perf_counter() - start)
    return out, counts


def _subset_samples(
    batch: pa.Table, shards_path: str, cfg: SubsetConfig, index_cfg: IndexConfig
) -> Iterator[pa.Table]:
    """Ray task body: one shard's subset samples (``iter_subset``: faces blurred, resized,
    encoded), pickled in small blocks, then one row with the shard's stats."""
    import pyarrow as pa

    schema = pa.schema([("order", pa.int64()), ("sample", pa.large_binary()),
                        ("stats", pa.string())])
    for item in batch.to_pylist():
        shard_set, rows = _one_shard(item, shards_path)
        stats: dict[str, Any] = {}
        block: list[bytes] = []
        for sample in subset.iter_subset(shard_set, rows, cfg, index_cfg, stats, progress=False):
            block.append(pickle.dumps(sample))
            if len(block) == SUBSET_ROWS_PER_BLOCK:
                yield pa.table([[item["order"]] * len(block), block, [None] * len(block)],
                               schema=schema)
                block = []
        summary = json.dumps({k: stats[k] for k in ("written", "images_blurred", "undecodable")})
        yield pa.table([[item["order"]] * (len(block) + 1), block + [None],
                        [None] * len(block) + [summary]], schema=schema)


def iter_subset(
    shards: ShardSet,
    rows: pl.DataFrame,
    cfg: SubsetConfig,
    index_cfg: IndexConfig,
    executor: ExecutorConfig,
    stats: dict[str, Any] | None = None,
    progress: bool = True,
) -> Iterator[Sample]:
    """``subset.iter_subset`` with one Ray task per shard doing the decode, blur, resize and
    encode; the samples stream back in the local order for the shard writer, and ``stats`` is
    filled as the stream is consumed (written, images_blurred, undecodable, seconds)."""
    stats = stats if stats is not None else {}
    stats.update(written=0, images_blurred=0, undecodable=0, seconds=0.0)
    start = time.perf_counter()
    items = _shard_items(shards, rows)
    last = -1
    try:
        if not items:
            return
        ensure_ray(executor)
        with _data_context(progress):
            ds = _dataset(items).map_batches(
                _subset_samples,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"shards_path": shards.path, "cfg": cfg, "index_cfg": index_cfg},
                num_cpus=executor.cpus_per_task,
            )
            for row in ds.iter_rows():
                if row["order"] < last:
                    raise RuntimeError("ray returned subset samples out of shard order")
                last = row["order"]
                if row["stats"] is not None:
                    for key, value in json.loads(row["stats"]).items():
                        stats[key] += int(value)
                    continue
                yield pickle.loads(row["sample"])
    finally:
        stats["seconds"] = round(time.perf_counter() - start, 3)
        logger.info(
            "ray subset: %d samples written (%d with blurred faces, %d undecodable) in %.1f s",
            stats["written"], stats["images_blurred"], stats["undecodable"], stats["seconds"],
        )


__all__ = [
    "EXECUTORS",
    "ExecutorConfig",
    "build_index",
    "detect_faces",
    "ensure_ray",
    "iter_subset",
    "resolve_gpus",
    "score_index",
]
