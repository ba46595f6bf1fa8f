"""Lineage a user can see: which versions an entry has, which node makes it, what a run read and
wrote (the ``run_manifest``), and which versions belong to one run.

Every versioned save of one ``kedro run`` carries that run's version (the UTC time it started),
so the outputs of one node always share a version. Everything here is derived from the
registered pipelines and the catalog, never from a fixed list of entries.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, MemoryDataset
from kedro.pipeline import Pipeline

MANIFEST = "run_manifest"
RUN_ENV = "AIM_KEDRO_RUN"  # the notebooks load the versions of this run (default: the newest)


def registered_pipelines() -> dict[str, Pipeline]:
    """Every registered pipeline (``__default__`` left out), whatever subset a run requested."""
    from kedro.framework.project import pipelines

    requested = pipelines._requested_pipelines
    pipelines.set_requested(None)
    try:
        return {name: pipe for name, pipe in pipelines.items() if name != "__default__"}
    finally:
        pipelines.set_requested(requested)


@dataclass(frozen=True)
class Producer:
    """A node that writes an entry, and the pipelines it belongs to (smallest first)."""

    node: str
    pipelines: tuple[str, ...]
    outputs: tuple[str, ...]

    def command(self) -> str:
        """The command that makes the entry: the smallest pipeline holding the node."""
        return f"kedro run --pipelines {self.pipelines[0]}" if self.pipelines else ""

    def describe(self) -> str:
        """``node build_raw_pool of pipeline sample``."""
        where = ", ".join(self.pipelines)
        noun = "pipeline" if len(self.pipelines) == 1 else "pipelines"
        return f"node {self.node} of {noun} {where}"


def producers(pipes: Mapping[str, Pipeline] | None = None,
              prefer: Iterable[str] = ()) -> dict[str, Producer]:
    """Entry -> the node that writes it, from the registered pipelines; its pipelines listed
    ``prefer`` (the run's own) first, then the smallest."""
    pipes = registered_pipelines() if pipes is None else pipes
    preferred = set(prefer)
    sizes = {name: (name not in preferred, len(p.nodes)) for name, p in pipes.items()}
    found: dict[str, tuple[str, set[str], tuple[str, ...]]] = {}
    for name, pipe in pipes.items():
        for node in pipe.nodes:
            for output in node.outputs:
                entry = found.setdefault(output, (node.name, set(), tuple(node.outputs)))
                entry[1].add(name)
    return {
        output: Producer(node, tuple(sorted(names, key=lambda n: (sizes[n], n))), outputs)
        for output, (node, names, outputs) in found.items()
    }


def dataset_of(catalog: Any, name: str) -> Any | None:
    """The catalog's dataset object for ``name`` (None when the catalog has no such entry)."""
    return catalog.get(name) if name in catalog else None


def is_memory(dataset: Any) -> bool:
    """Whether an entry only lives in memory during a run (no file behind it)."""
    return dataset is None or isinstance(dataset, MemoryDataset)


def is_versioned(dataset: Any) -> bool:
    """Whether a dataset writes a new version per run."""
    return isinstance(dataset, AbstractVersionedDataset) and bool(dataset._version)


def filepath_of(dataset: Any) -> str | None:
    """Where a dataset lives (its ``filepath``; relative to the working folder when inside it)."""
    path = getattr(dataset, "_filepath", None)
    if path is None:
        path = (dataset._describe() or {}).get("filepath") if dataset is not None else None
    if path is None:
        return None
    protocol = getattr(dataset, "_protocol", "file")
    if protocol not in ("file", "local", None):
        return f"{protocol}://{path}"
    relative = os.path.relpath(str(path))
    return str(path) if relative.startswith("..") else relative


def saved_versions(dataset: Any) -> list[str]:
    """The saved versions of a versioned dataset, newest first (empty when none, or unversioned)."""
    if not isinstance(dataset, AbstractVersionedDataset):
        return []
    try:
        return dataset.list_versions(full_path=False)
    except Exception:  # noqa: BLE001 - no folder yet, or one that cannot be listed
        return []


def load_version(dataset: Any) -> str | None:
    """The version a load of ``dataset`` reads now: the pinned one, else the newest (None when
    unversioned or when there is none)."""
    if not is_versioned(dataset):
        return None
    try:
        return dataset.resolve_load_version()
    except Exception:  # noqa: BLE001 - VersionNotFoundError: nothing saved yet
        return None


def pin(catalog: Any, name: str, version: str) -> None:
    """Make the run load ``name`` at ``version`` (as ``--load-versions name:version`` would)."""
    from kedro.io import Version

    dataset = catalog.get(name)
    catalog._datasets[name] = dataset._copy(_version=Version(version, dataset._version.save),
                                            _cached_load_version=None)
    catalog._load_versions[name] = version


# --- entries that belong together -------------------------------------------------------------


def align_groups(pipeline: Pipeline, catalog: Any, pinned: Mapping[str, str],
                 made_by: Mapping[str, Producer]) -> tuple[list[str], list[str]]:
    """Load the entries one node writes from one run: when a free input of the run is pinned,
    pin its unpinned siblings (outputs of the same node) to the same version where it exists.

    Returns ``(notes, warnings)``: what was pinned, and the siblings that still come from
    different runs (their newest versions differ, or the pinned version is missing for one).
    """
    free = {n for n in pipeline.inputs() if not n.startswith("params:") and n != "parameters"}
    groups: dict[str, list[str]] = {}
    for name in sorted(free):
        producer = made_by.get(name)
        dataset = dataset_of(catalog, name)
        if producer is not None and is_versioned(dataset):
            groups.setdefault(producer.node, []).append(name)
    notes, warnings = [], []
    for node, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        pins = {m: pinned[m] for m in members if m in pinned}
        if len(set(pins.values())) == 1:
            version = next(iter(pins.values()))
            aligned = []
            for member in members:
                if member in pins:
                    continue
                if version in saved_versions(dataset_of(catalog, member)):
                    pin(catalog, member, version)
                    aligned.append(member)
            if aligned:
                notes.append(f"loading {', '.join(aligned)} at version {version}, like "
                             f"{', '.join(sorted(pins))} (node {node} wrote them together)")
        versions = {m: load_version(dataset_of(catalog, m)) for m in members}
        if len({v for v in versions.values() if v is not None}) > 1:
            listed = ", ".join(f"{m} {v}" for m, v in versions.items())
            warnings.append(
                f"entries that node {node} writes together come from different runs: {listed}. "
                f"Pin one version for all of them (`--load-versions "
                f"{','.join(f'{m}:V' for m in members)}`) to read one run's data."
            )
    return notes, warnings


# --- the run manifest ------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """How this process was started, as the user typed it (``kedro run --pipelines sample``)."""
    argv = list(sys.argv)
    if not argv:
        return ""
    head = os.path.basename(argv[0])
    if head in ("__main__.py", "-c", "-m") or head.startswith("python"):
        return " ".join(argv)
    return " ".join([head, *argv[1:]])


@dataclass
class RunRecord:
    """What one run read and wrote, collected by the run hook and saved as ``run_manifest``."""

    version: str
    run_params: dict[str, Any]
    parameters: dict[str, Any]
    free_inputs: set[str]
    started: str = field(default_factory=_now)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def loaded(self, name: str, dataset: Any) -> None:
        """Record a load of a free input (a file entry) with the version it read."""
        if name not in self.free_inputs or is_memory(dataset) or name in self.inputs:
            return
        with self._lock:
            self.inputs[name] = {"version": load_version(dataset), "filepath": filepath_of(dataset)}

    def saved(self, name: str, dataset: Any) -> None:
        """Record a save of a file entry with the version it wrote."""
        if is_memory(dataset) or name == MANIFEST:
            return
        version = dataset.resolve_save_version() if is_versioned(dataset) else None
        with self._lock:
            self.outputs[name] = {"version": version, "filepath": filepath_of(dataset)}

    def ran(self, node: str) -> None:
        """Record a finished node."""
        with self._lock:
            self.nodes.append(node)

    def payload(self, status: str, error: BaseException | None = None) -> dict[str, Any]:
        """The manifest: command, run options, parameters, inputs and outputs with versions."""
        options = {k: v for k, v in self.run_params.items() if v not in (None, [], (), {}, "")}
        return {
            "version": self.version,
            "status": status,
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            "command": command_line(),
            "run_params": options,
            "parameters": self.parameters,
            "inputs": dict(sorted(self.inputs.items())),
            "outputs": dict(sorted(self.outputs.items())),
            "nodes": list(self.nodes),
            "notes": list(self.notes),
            "started": self.started,
            "finished": _now(),
            "host": socket.gethostname(),
            "user": _user(),
            "pid": os.getpid(),
        }

    def summary(self, where: str | None) -> list[str]:
        """The short log lines a run ends with: what it wrote and read, with versions, and where
        its manifest is."""
        wrote = ", ".join(sorted(self.outputs)) or "nothing"
        read = ", ".join(f"{n}@{i['version'] or 'unversioned'}"
                         for n, i in sorted(self.inputs.items())) or "no saved entry"
        lines = [f"run {self.version}: {len(self.nodes)} node(s) ran, {len(self.outputs)} "
                 f"entries written ({wrote})", f"run {self.version} read {read}"]
        if where:
            lines.append(f"run {self.version} manifest: {where}")
        return lines


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return ""


# --- the versions of one run, for notebooks ---------------------------------------------------


def manifests(catalog: Any) -> list[dict[str, Any]]:
    """Every saved ``run_manifest``, newest first."""
    from kedro.io import Version

    found = []
    for version in saved_versions(dataset_of(catalog, MANIFEST)):
        found.append(catalog.get(MANIFEST, version=Version(version, None)).load())
    return found


def run_entries(manifest: Mapping[str, Any]) -> dict[str, str | None]:
    """Entry -> version for everything a run read or wrote (what it wrote wins)."""
    entries = {name: info.get("version") for name, info in manifest.get("inputs", {}).items()}
    entries.update({name: info.get("version") for name, info in manifest.get("outputs", {}).items()})
    return entries


@dataclass
class RunVersions:
    """The versions of one run's entries, for reading one run's data side by side.

    ``RunVersions.find(catalog, needs=[...])`` picks the newest completed run whose manifest read
    or wrote every entry of ``needs`` (or the run named by ``run=``, or by ``AIM_KEDRO_RUN``);
    ``load(name)`` reads the entry at that run's version.
    """

    catalog: Any
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        """The run's version."""
        return self.manifest["version"]

    @property
    def versions(self) -> dict[str, str | None]:
        """Entry -> version of everything the run read or wrote."""
        return run_entries(self.manifest)

    @classmethod
    def find(cls, catalog: Any, needs: Iterable[str] = (), run: str | None = None) -> RunVersions:
        """The run to read (see the class docstring); ValueError says what exists when none fits."""
        run = run or os.environ.get(RUN_ENV) or None
        needs = list(needs)
        found = manifests(catalog)
        if run is not None:
            for manifest in found:
                if manifest["version"] == run:
                    return cls(catalog, manifest)
            raise ValueError(f"no run_manifest of version {run}; saved runs, newest first: "
                             f"{[m['version'] for m in found]}")
        for manifest in found:
            if manifest.get("status") == "completed" and set(needs) <= set(run_entries(manifest)):
                return cls(catalog, manifest)
        raise ValueError(
            f"no completed run read or wrote all of {needs}: run `kedro run` (or `make run`) "
            f"first; saved runs, newest first: {[m['version'] for m in found]}"
        )

    def load(self, name: str) -> Any:
        """``name`` at this run's version (the catalog's own choice for entries the run did not
        touch or that are unversioned)."""
        version = self.versions.get(name)
        return self.catalog.load(name, version=version) if version else self.catalog.load(name)

    def __repr__(self) -> str:
        return (f"RunVersions({self.version}: {self.manifest.get('command')!r}, "
                f"{len(self.versions)} entries)")


def entry_folder(dataset: Any) -> PurePosixPath | None:
    """The folder that holds an entry's versions (or its file), when local."""
    path = getattr(dataset, "_filepath", None)
    if path is None or getattr(dataset, "_protocol", "file") not in ("file", "local"):
        return None
    return PurePosixPath(str(path))
