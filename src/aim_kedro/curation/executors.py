"""Where the per-shard curation stages run: one interface, a local and a Ray Data executor.

A stage is written once, as a function of one ``ShardTask`` (a one-shard ``ShardSet`` and the
rows of a table that fall in that shard): index a shard, detect faces in its kept rows, write
its subset samples, decode its rows for scoring. An executor runs such functions over all the
tasks and gives the results back in task order:

- ``map_shards(work, tasks)``: ``[work(task) for task in tasks]``;
- ``stream_shards(work, tasks)``: the items of every ``work(task)`` iterable, task after task,
  as a stream (the subset, consumed by the shard writer);
- ``map_model(stage, tasks)``: per task, ``[stage.apply(model, part) for part in
  stage.prepare(task)]`` with one ``stage.make_model()`` per worker (the CLIP scorer, a
  ``ModelStage``), streamed per task.

``LocalExecutor`` runs them in this process, one task after another; with ``workers`` > 1 its
``map_shards`` runs the tasks in that many spawned processes (single-threaded stages such as the
face detector then use every core), with the same results in the same order. ``RayExecutor``
(``ray_executor.py``) runs them on Ray Data: CPU tasks per shard and, for ``map_model``, an actor
pool that holds the model. ``make_executor`` picks one from ``curation.executor``, so the nodes
never ask which one they have.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import polars as pl
from tqdm.auto import tqdm

from aim_kedro.common.config import check_choice, from_mapping
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")

R = TypeVar("R")
T = TypeVar("T")
M = TypeVar("M")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the per-shard stages run (``curation.executor``).

    ``kind: local`` runs them in the Kedro process (``map_shards`` in ``workers`` processes:
    null, one per core); ``kind: ray`` on Ray Data: the cluster at
    ``address`` (else ``RAY_ADDRESS``, else a local Ray of ``num_cpus`` CPUs). Scoring runs in
    ``scoring_actors`` actors of ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs (``auto``:
    1 when the cluster has GPUs, else 0), on batches of ``scoring_batch_size`` records (None:
    ``curation.scoring.batch_size``: the batches of the local path).
    """

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    num_cpus: int | None = None
    scoring_actors: int = 1
    scoring_batch_size: int | None = None
    gpus_per_actor: float | str = "auto"
    cpus_per_actor: float = 1.0
    cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.kind, EXECUTORS, "curation.executor.kind",
                     "use local (one process) or ray (`kedro run -e ray --pipelines curation`)")
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
        if self.workers is not None and (_not_int(self.workers) or int(self.workers) < 1):
            raise ValueError(
                f"curation.executor.workers must be a process count >= 1 or null (one per "
                f"core), got {self.workers!r}"
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


@dataclass(frozen=True)
class ShardTask:
    """One shard's work: its position among the tasks, a one-shard ``ShardSet`` and the rows of
    the stage's table that fall in this shard (None for a stage that reads the whole shard)."""

    order: int
    shards: ShardSet
    rows: pl.DataFrame | None = None

    @property
    def path(self) -> str:
        """The shard's location (local path, fsspec URL or ``pipe:`` command)."""
        return self.shards.shards[0]

    @property
    def name(self) -> str:
        """The shard's id: its path relative to the pool's root (the index's ``shard`` column)."""
        return self.shards.names[0]


def shard_tasks(
    shards: ShardSet, table: pl.DataFrame | None = None, order: str = "shards"
) -> list[ShardTask]:
    """One task per shard: every shard of the pool (``table`` None), or each shard that holds
    rows of ``table`` (columns shard, position, key, ...).

    ``order`` is ``shards`` (the pool's shard order) or ``table`` (the order shards first appear
    in ``table``). Raises ValueError when ``table`` names a shard the pool does not have.
    """
    one = [shards.one(i) for i in range(len(shards.shards))]
    if table is None:
        return [ShardTask(i, s) for i, s in enumerate(one)]
    if table.height == 0:
        return []
    groups = table.partition_by("shard", as_dict=True, maintain_order=True)
    by_name = {s.names[0]: s for s in one}
    missing = sorted({key[0] for key in groups} - set(by_name))
    if missing:
        raise ValueError(
            f"shards {missing[:3]} of the index are not in {shards.path}; the pool changed "
            "since pool_index was built: re-run build_pool_index"
        )
    names = [key[0] for key in groups] if order == "table" else list(by_name)
    present = [name for name in names if (name,) in groups]
    return [ShardTask(i, by_name[name], groups[(name,)]) for i, name in enumerate(present)]


@dataclass(frozen=True)
class ModelStage:
    """A stage that needs a model (CLIP scoring): ``prepare(task)`` yields the parts of a shard
    (CPU work: decoded batches), ``apply(model, part)`` runs the model on one part, and
    ``make_model()`` builds the model once per worker that holds one; ``want_gpu`` lets a
    worker take a GPU. All three must pickle for Ray."""

    make_model: Callable[[], Any]
    prepare: Callable[[ShardTask], Iterable[Any]]
    apply: Callable[[Any, Any], Any]
    want_gpu: bool = False


class Executor(Protocol):
    """Runs per-shard stage functions over shard tasks, results in task order."""

    kind: str

    def map_shards(
        self, work: Callable[[ShardTask], R], tasks: Sequence[ShardTask], desc: str = ""
    ) -> list[R]:
        """``[work(task) for task in tasks]``."""
        ...

    def stream_shards(
        self, work: Callable[[ShardTask], Iterable[T]], tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[T]:
        """The items of ``work(task)`` for each task in turn, streamed."""
        ...

    def map_model(
        self, stage: ModelStage, tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[list[Any]]:
        """Per task, ``[stage.apply(model, part) for part in stage.prepare(task)]``, streamed
        in task order; ``stage.make_model()`` runs once per worker that holds a model."""
        ...

    def model_here(self, make_model: Callable[[], M]) -> M | None:
        """The model ``map_model`` uses when it runs in this process (built once), else None:
        a caller can then key a per-shard cache by the very model that scores."""
        ...

    def describe(self, want_gpu: bool | None = None) -> dict[str, Any]:
        """What a stage summary records about the executor (``want_gpu`` set: a model stage)."""
        ...


class LocalExecutor:
    """Runs every task on this machine (``curation.executor.kind: local``): ``map_shards`` in
    ``workers`` spawned processes when that is more than one and there are several tasks, the
    rest in this process, one task after another."""

    kind = "local"

    def __init__(self, progress: bool = True, workers: int | None = 1) -> None:
        self.progress = bool(progress)
        self.workers = max(1, int(workers if workers is not None else os.cpu_count() or 1))
        self._model: tuple[Callable[[], Any], Any] | None = None

    def _bar(self, tasks: Sequence[ShardTask], desc: str) -> tqdm:
        return tqdm(total=len(tasks), desc=desc or "shards", unit="shard",
                    disable=not self.progress)

    def map_shards(
        self, work: Callable[[ShardTask], R], tasks: Sequence[ShardTask], desc: str = ""
    ) -> list[R]:
        """``[work(task) for task in tasks]``, with a progress bar over shards; in ``workers``
        spawned processes (``work`` and the tasks pickled) when there are several tasks."""
        workers = min(self.workers, len(tasks))
        with self._bar(tasks, desc) as bar:
            if workers <= 1:
                out = []
                for task in tasks:
                    out.append(work(task))
                    bar.update(1)
                return out
            context = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(work, task) for task in tasks]
                for future in as_completed(futures):
                    future.result()  # a failed task raises here, as it would in this process
                    bar.update(1)
                return [future.result() for future in futures]

    def stream_shards(
        self, work: Callable[[ShardTask], Iterable[T]], tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[T]:
        """The items of ``work(task)`` for each task in turn."""
        with self._bar(tasks, desc) as bar:
            for task in tasks:
                yield from work(task)
                bar.update(1)

    def model_here(self, make_model: Callable[[], M]) -> M:
        """``make_model()``, built once per loader and kept for ``map_model``."""
        if self._model is None or self._model[0] is not make_model:
            self._model = (make_model, make_model())
        return self._model[1]

    def map_model(
        self, stage: ModelStage, tasks: Sequence[ShardTask], desc: str = ""
    ) -> Iterator[list[Any]]:
        """Per task, ``stage.apply`` on each part ``stage.prepare`` yields, one model for all."""
        model = self.model_here(stage.make_model) if tasks else None
        with self._bar(tasks, desc) as bar:
            for task in tasks:
                yield [stage.apply(model, part) for part in stage.prepare(task)]
                bar.update(1)

    def describe(self, want_gpu: bool | None = None) -> dict[str, Any]:
        """``{"executor": "local"}``."""
        return {"executor": self.kind}

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"


def make_executor(cfg: ExecutorConfig, progress: bool = True) -> Executor:
    """The executor ``curation.executor`` names (Ray is imported only for ``kind: ray``)."""
    if cfg.kind == "ray":
        from aim_kedro.curation.ray_executor import RayExecutor

        return RayExecutor(cfg, progress)
    return LocalExecutor(progress, cfg.workers)


__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorConfig",
    "LocalExecutor",
    "ModelStage",
    "ShardTask",
    "make_executor",
    "shard_tasks",
]
