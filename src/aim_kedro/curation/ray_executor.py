"""The Ray Data executor of the per-shard curation stages (``curation.executor.kind: ray``).

It runs the very stage functions the local executor runs, one shard per Ray task, so a pool of
billions of pairs spreads over a cluster while a laptop runs the same code with a local Ray:

- ``map_shards`` / ``stream_shards``: CPU tasks of ``cpus_per_task`` CPUs, one per shard; the
  results (for a stream, the items in small pickled blocks) come back in shard order;
- ``map_model``: CPU tasks run the stage's ``prepare`` (decode a shard into scoring batches),
  and an actor pool of ``scoring_actors`` actors, each holding one ``make_model()`` (one GPU
  per actor when the cluster has GPUs), runs ``apply`` on the parts; results are regrouped per
  shard, in order.

The global steps (threshold, dedup) stay on the driver over compact arrays. Shards are read by
the workers through fsspec, so a pool at ``s3://`` or ``gs://`` needs the filesystem package
and credentials on every node, not only on the driver. ``ray`` is imported only here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aim_kedro.curation.executors import ExecutorConfig, ModelStage, ShardTask

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

logger = logging.getLogger(__name__)

ITEMS_PER_BLOCK = 64

R = TypeVar("R")
T = TypeVar("T")
M = TypeVar("M")


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


def resolve_gpus(cfg: ExecutorConfig, want_gpu: bool = True) -> float:
    """GPUs per scoring actor: the configured number, or (``auto``) 1 when the cluster has a GPU
    and the model may use one."""
    import ray

    if cfg.gpus_per_actor != "auto":
        return float(cfg.gpus_per_actor)
    return 1.0 if want_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


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


def _dataset(tasks: Sequence[ShardTask]) -> ray.data.Dataset:
    """A dataset of one block per (pickled) task, so every shard is its own Ray task."""
    import ray.data

    items = [{"order": t.order, "task": pickle.dumps(t)} for t in tasks]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _schema(*extra: tuple[str, Any]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("order", pa.int64()), ("part", pa.int64()), *extra])


def _run_tasks(batch: pa.Table, work: Callable[[ShardTask], Iterable[Any]]) -> Iterator[pa.Table]:
    """Ray task body: the items of ``work(task)`` for each task of ``batch``, pickled in blocks
    of ``ITEMS_PER_BLOCK``; ``part`` numbers the blocks of a task, and a last row of ``part``
    -1 marks the task done (so the driver knows every task answered, in order)."""
    import pyarrow as pa

    schema = _schema(("items", pa.large_binary()))
    for row in batch.to_pylist():
        task = pickle.loads(row["task"])
        block: list[Any] = []
        part = 0
        for item in work(task):
            block.append(item)
            if len(block) == ITEMS_PER_BLOCK:
                yield pa.table([[task.order], [part], [pickle.dumps(block)]], schema=schema)
                block, part = [], part + 1
        if block:
            yield pa.table([[task.order], [part], [pickle.dumps(block)]], schema=schema)
        yield pa.table([[task.order], [-1], [pickle.dumps([])]], schema=schema)


def _one(work: Callable[[ShardTask], R], task: ShardTask) -> Iterator[R]:
    yield work(task)


def _prepare_parts(
    batch: pa.Table, prepare: Callable[[ShardTask], Iterable[Any]]
) -> Iterator[pa.Table]:
    """Ray task body: each part ``prepare(task)`` yields, pickled, numbered within its task;
    a task of no parts answers with one empty row (``part`` -1)."""
    import pyarrow as pa

    schema = _schema(("payload", pa.large_binary()))
    for row in batch.to_pylist():
        task = pickle.loads(row["task"])
        count = 0
        for count, part in enumerate(prepare(task), start=1):
            yield pa.table([[task.order], [count - 1], [pickle.dumps(part)]], schema=schema)
        if not count:
            yield pa.table([[task.order], [-1], [b""]], schema=schema)


class _ModelActor:
    """Ray actor: holds one ``make_model()`` and runs ``apply`` on prepared parts."""

    def __init__(self, make_model: Callable[[], Any], apply: Callable[[Any, Any], Any]) -> None:
        self.model = make_model()
        self.apply = apply

    def __call__(self, batch: pa.Table) -> pa.Table:
        """``apply(model, part)`` for every part of ``batch``; one pickled result per row."""
        import pyarrow as pa

        out = []
        for row in batch.to_pylist():
            result = b"" if row["part"] < 0 else pickle.dumps(
                self.apply(self.model, pickle.loads(row["payload"]))
            )
            out.append({"order": row["order"], "part": row["part"], "payload": result})
        return pa.Table.from_pylist(out, schema=_schema(("payload", pa.large_binary())))


def _per_task(rows: Iterable[dict[str, Any]], tasks: Sequence[ShardTask]) -> Iterator[list[Any]]:
    """Rows ``(order, part, payload)`` sorted by task -> the payloads of each task, in order."""
    groups = {order: [r["payload"] for r in group if r["part"] >= 0]
              for order, group in itertools.groupby(rows, key=lambda r: r["order"])}
    if sorted(groups) != [t.order for t in tasks]:
        raise RuntimeError(f"ray returned results for {len(groups)} of {len(tasks)} shards")
    for task in tasks:
        yield groups[task.order]


class RayExecutor:
    """Runs the stage functions on Ray Data (see the module docstring)."""

    kind = "ray"

    def __init__(self, cfg: ExecutorConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = bool(progress)

    def _rows(self, build: Callable[[], ray.data.Dataset]) -> Iterator[dict[str, Any]]:
        """The rows of the dataset ``build()`` makes, built and run under this executor's data
        context (a dataset keeps the context of its creation)."""
        with _data_context(self.progress):
            yield from build().iter_rows()

    def stream_shards(
        self, work: Callable[[ShardTask], Iterable[T]], tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[T]:
        """The items of ``work(task)`` for each task in turn, one Ray CPU task per shard."""
        if not tasks:
            return
        ensure_ray(self.cfg)

        def build() -> ray.data.Dataset:
            return _dataset(tasks).map_batches(
                _run_tasks, batch_size=1, batch_format="pyarrow", fn_kwargs={"work": work},
                num_cpus=self.cfg.cpus_per_task,
            )

        orders = [t.order for t in tasks]
        done = 0
        for row in self._rows(build):
            if done >= len(orders) or row["order"] != orders[done]:
                raise RuntimeError(f"ray returned shard {row['order']} out of shard order")
            if row["part"] < 0:
                done += 1
                continue
            yield from pickle.loads(row["items"])
        if done != len(orders):
            raise RuntimeError(f"ray finished {done} of {len(orders)} shards")

    def map_shards(
        self, work: Callable[[ShardTask], R], tasks: Sequence[ShardTask], desc: str = ""
    ) -> list[R]:
        """``[work(task) for task in tasks]``, one Ray CPU task per shard."""
        import functools

        return list(self.stream_shards(functools.partial(_one, work), tasks, desc))

    def model_here(self, make_model: Callable[[], M]) -> None:
        """None: the models live in the Ray actors, maybe on other machines and devices."""
        return None

    def map_model(
        self, stage: ModelStage, tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[list[Any]]:
        """CPU tasks run ``stage.prepare`` on each shard, an actor pool of models runs
        ``stage.apply``; the results per shard, in order."""
        if not tasks:
            return
        ensure_ray(self.cfg)
        import ray.data

        def build() -> ray.data.Dataset:
            return _dataset(tasks).map_batches(
                _prepare_parts, batch_size=1, batch_format="pyarrow",
                fn_kwargs={"prepare": stage.prepare}, num_cpus=self.cfg.cpus_per_task,
            ).map_batches(
                _ModelActor,
                batch_size=1,
                batch_format="pyarrow",
                fn_constructor_kwargs={"make_model": stage.make_model, "apply": stage.apply},
                compute=ray.data.ActorPoolStrategy(size=int(self.cfg.scoring_actors)),
                num_cpus=self.cfg.cpus_per_actor,
                num_gpus=resolve_gpus(self.cfg, stage.want_gpu),
            )

        # Collected, then ordered by shard and part (whatever actor scored each part).
        rows = sorted(self._rows(build), key=lambda r: (r["order"], r["part"]))
        for payloads in _per_task(rows, tasks):
            yield [pickle.loads(p) for p in payloads]

    def describe(self, want_gpu: bool | None = None) -> dict[str, Any]:
        """``executor: ray`` and, for a model stage, the actors and GPUs per actor."""
        out: dict[str, Any] = {"executor": self.kind}
        if want_gpu is not None:
            out.update(scoring_actors=int(self.cfg.scoring_actors),
                       gpus_per_actor=resolve_gpus(self.cfg, want_gpu))
        return out

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.cfg.address!r}, num_cpus={self.cfg.num_cpus})"


__all__ = ["ITEMS_PER_BLOCK", "RayExecutor", "ensure_ray", "resolve_gpus"]
