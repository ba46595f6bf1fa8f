"""The checks a run passes before any node runs: every parameter key is known (at every depth,
the top level included), and every input can be loaded; each failure says what to do.

Valid top-level keys are the blocks of the parameter files (conf/base, plus the run
environment); each block is then checked by its pipeline's validator (typed configs built with
``common.config.from_mapping``). A missing input is named with the version or path that was asked
for, the versions that exist (newest first), and the node and pipeline that make it, found in
the registered pipelines.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from kedro.pipeline import Pipeline

from aim_kedro.common.config import unknown_keys_message
from aim_kedro.lineage import (
    Producer,
    dataset_of,
    filepath_of,
    is_memory,
    is_versioned,
    saved_versions,
)

MAX_LISTED_VERSIONS = 8


class RunRefused(Exception):
    """Marker base: the run stopped before any node ran, for a reason its message gives.

    ``expected_error`` tells the CLI to print the message alone (the traceback behind
    ``--verbose``).
    """

    expected_error = True


def expected(exc: BaseException) -> BaseException:
    """Mark ``exc`` as an expected error (a bad config or input), whatever its type."""
    try:
        exc.expected_error = True  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass
    return exc


def parameter_blocks(pipeline: Pipeline) -> set[str]:
    """Top-level parameter keys a pipeline reads (``params:curation.filters`` -> ``curation``)."""
    blocks = set()
    for name in pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}:
        if name.startswith("params:"):
            blocks.add(name[len("params:") :].split(".")[0])
    return blocks


def file_parameters(config_loader: Any) -> dict[str, Any]:
    """The parameters the config files define, without the run's ``--params``."""
    loader = copy.copy(config_loader)
    loader.runtime_params = {}
    try:
        return dict(loader["parameters"] or {})
    except Exception:  # noqa: BLE001 - no parameter files: nothing is known
        return {}


def check_top_level(parameters: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Every top-level key is a block of the parameter files (``curaton`` -> ``curation``)."""
    unknown = set(parameters) - set(known)
    if unknown:
        raise ValueError(
            unknown_keys_message(unknown, known, "top-level")
            + ". Each top-level key is a block of conf/base/parameters_<pipeline>.yml."
        )


def runtime_paths(runtime: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted leaf paths of ``--params`` (``{"a": {"b": 1}}`` -> ``["a.b"]``)."""
    paths = []
    for key, value in runtime.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            paths.extend(runtime_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


# --- inputs ----------------------------------------------------------------------------------


def catalog_sources(conf_source: str | Path, envs: list[str], name: str) -> list[str]:
    """The catalog files (under ``conf_source``/<env>) that define entry ``name``, base first."""
    found = []
    for env in envs:
        folder = Path(conf_source) / env
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix not in (".yml", ".yaml", ".json"):
                continue
            if not (path.name.startswith("catalog") or any(p.startswith("catalog")
                                                           for p in path.relative_to(folder).parts)):
                continue
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict) and name in data:
                found.append(str(Path(conf_source).name / path.relative_to(conf_source)))
    return found


def _versions_text(versions: list[str]) -> str:
    shown = ", ".join(versions[:MAX_LISTED_VERSIONS])
    more = f" (and {len(versions) - MAX_LISTED_VERSIONS} older)" if len(versions) > MAX_LISTED_VERSIONS else ""
    return f"{shown}{more}"


def _maker_text(name: str, producer: Producer | None, defined_in: list[str]) -> str:
    where = defined_in[-1] if defined_in else "conf/local/catalog.yml"
    if producer is None:
        return (f"No pipeline makes it: point its filepath at your data in {where} "
                "(or in conf/local/catalog.yml).")
    return (f"It is made by {producer.describe()}: `{producer.command()}` (or `kedro run "
            f"--to-outputs {name}`), or point the entry at your data in conf/local/catalog.yml.")


def _holds_data(dataset: Any) -> bool:
    try:
        return dataset is not None and bool(dataset.exists())
    except Exception:  # noqa: BLE001
        return False


def _memory_problem(names: list[str], producer: Producer | None, pipeline: Pipeline) -> str:
    listed = ", ".join(f"`{n}`" for n in names)
    if producer is None:
        return f"{listed}: no catalog entry, and no node of a registered pipeline makes it."
    nodes = [n.name for n in pipeline.nodes]
    verb = ("is", "it") if len(names) == 1 else ("are", "them")
    return (f"{listed} {verb[0]} handed over in memory within one run (no catalog entry saves "
            f"{verb[1]}); {producer.describe()} makes {verb[1]}. Add that node to the run, e.g. "
            f"`--nodes {','.join([producer.node, *nodes])}`.")


def input_problem(name: str, catalog: Any, pipeline: Pipeline, made_by: Mapping[str, Producer],
                  pinned: Mapping[str, str], sources_of: Callable[[str], list[str]]) -> str | None:
    """Why free input ``name`` of the run cannot be loaded (None when it can); ``sources_of``
    names the catalog files that define an entry."""
    dataset = dataset_of(catalog, name)
    producer = made_by.get(name)
    if is_memory(dataset):
        return None if _holds_data(dataset) else _memory_problem([name], producer, pipeline)
    try:
        if dataset.exists():
            return None
    except Exception as exc:  # noqa: BLE001 - report any dataset that cannot be reached
        return f"`{name}` ({filepath_of(dataset)}) cannot be reached: {exc}"
    path = filepath_of(dataset)
    sources = sources_of(name)
    defined = f" (set in {sources[-1]})" if sources else ""
    if is_versioned(dataset):
        versions = saved_versions(dataset)
        wanted = pinned.get(name) or dataset._version.load
        if wanted:
            there = (f"Versions there, newest first: {_versions_text(versions)}. Pin one of them, "
                     "or drop the pin to load the newest." if versions
                     else "It has no saved version at all. " + _maker_text(name, producer, sources))
            return (f"`{name}`: version {wanted} (asked for with --load-versions) does not exist "
                    f"under {path}{defined}. {there}")
        return f"`{name}`: no saved version under {path}{defined}. " + _maker_text(name, producer, sources)
    return f"`{name}`: {path}{defined} does not exist. " + _maker_text(name, producer, sources)


def check_inputs(pipeline: Pipeline, catalog: Any, made_by: Mapping[str, Producer],
                 pinned: Mapping[str, str], sources_of: Callable[[str], list[str]]) -> None:
    """Raise FileNotFoundError listing every free input of the run that cannot be loaded."""
    problems, in_memory = [], {}
    for name in sorted(pipeline.inputs()):
        if name.startswith("params:") or name == "parameters":
            continue
        dataset = dataset_of(catalog, name)
        if is_memory(dataset):
            if not _holds_data(dataset):
                producer = made_by.get(name)
                in_memory.setdefault(producer.node if producer else name, []).append(name)
            continue
        problem = input_problem(name, catalog, pipeline, made_by, pinned, sources_of)
        if problem is not None:
            problems.append(problem)
    for names in in_memory.values():
        problems.append(_memory_problem(names, made_by.get(names[0]), pipeline))
    if problems:
        head = "this input of the run cannot be loaded" if len(problems) == 1 else \
            f"these {len(problems)} inputs of the run cannot be loaded"
        raise expected(FileNotFoundError(f"{head}:\n" + "\n".join(f"- {p}" for p in problems)))

