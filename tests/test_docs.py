"""The commands that README.md, docs/guide.md and the Makefile show cannot rot.

Every ``kedro ...`` / ``aim-kedro ...`` line of their fenced code blocks is parsed with the real
command-line parser (an unknown option fails), and what it names is checked against the
registry, the catalog and the parameter files: pipelines, nodes, tags, entries, versions,
parameter keys at every depth, environments. The commands a user most needs are run on the
small project copy of ``cli_project``. Nothing here lists pipelines, nodes or entries itself.
"""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import PROJECT, kedro_cli, kedro_cli_all
from kedro.config import OmegaConfigLoader

DOCS = ("README.md", "docs/guide.md")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = ("", "bash", "sh", "shell", "console")
PROGRAMS = ("kedro", "aim-kedro")
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    """One command line of a doc: where it is, the program and its arguments."""

    doc: str
    line: int
    program: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.program} {' '.join(self.args)}"


def doc_commands(doc: str, text: str) -> Iterator[DocCommand]:
    """The kedro / aim-kedro commands of the shell blocks of ``text``."""
    in_block = False
    for number, raw in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(raw.strip())
        if fence:
            in_block = not in_block and fence.group(1) in SHELL
            continue
        if in_block:
            yield from _commands(doc, number, raw.strip().removeprefix("$ "))


def _commands(doc: str, number: int, line: str) -> Iterator[DocCommand]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if tokens and Path(tokens[0]).name in PROGRAMS:
        yield DocCommand(doc, number, Path(tokens[0]).name, tuple(tokens[1:]))


def makefile_commands() -> Iterator[DocCommand]:
    """``$(BIN)/kedro ...`` lines of the Makefile."""
    for number, line in enumerate((PROJECT / "Makefile").read_text().splitlines(), start=1):
        line = line.strip().replace("$(BIN)/", "")
        yield from _commands("Makefile", number, line)


def all_commands() -> list[DocCommand]:
    found = []
    for doc in DOCS:
        path = PROJECT / doc
        if path.exists():
            found.extend(doc_commands(doc, path.read_text()))
    return found + list(makefile_commands())


# --- what the project knows ------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    """The registry, catalog names, CLI and parameter files of this project."""
    from kedro.framework.cli.cli import KedroCLI

    from aim_kedro.lineage import registered_pipelines

    cli = KedroCLI(PROJECT)
    pipes = registered_pipelines()
    catalog = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="local")
    return {"cli": cli, "pipelines": pipes, "entries": set(catalog["catalog"]),
            "envs": {p.name for p in (PROJECT / "conf").iterdir() if p.is_dir()}}


def _parameters(env: str | None) -> dict[str, Any]:
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base",
                               default_run_env=env or "local",
                               merge_strategy={"parameters": "soft"})
    return dict(loader["parameters"])


def _known_path(tree: Mapping[str, Any], path: list[str]) -> bool:
    """``path`` exists in the parameter tree, or goes into a free-form mapping (empty or null)."""
    node: Any = tree
    for key in path:
        if node is None or (isinstance(node, Mapping) and not node):
            return True  # e.g. pretraining.train.model_overrides: {} takes any model field
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _parse(project: dict[str, Any], command: DocCommand) -> tuple[str, click.Context]:
    """The (sub)command a doc line runs and its parsed context; fails on an unknown option."""
    from aim_kedro.cli import cli as project_cli

    args = list(command.args)
    if command.program == "aim-kedro":
        name = args[0] if args and args[0] in project_cli.commands else "run"
        args = args[1:] if name != "run" or (args and args[0] == "run") else args
        sub = project_cli.commands[name]
        return name, sub.make_context(name, args)
    group: click.Command = project["cli"]
    ctx = group.make_context("kedro", list(args), resilient_parsing=True)
    path = []
    while isinstance(group, click.Group) and args:
        name, sub, args = group.resolve_command(ctx, args)
        assert sub is not None, f"{command}: no such command {name!r}"
        path.append(name)
        group = sub
        if isinstance(sub, click.Group):
            ctx = sub.make_context(name, list(args), parent=ctx, resilient_parsing=True)
    return " ".join(path), group.make_context(path[-1], list(args), parent=ctx)


def problems(project: dict[str, Any], command: DocCommand) -> list[str]:
    """What in a documented command does not exist (an empty list when all of it does)."""
    try:
        name, ctx = _parse(project, command)
    except click.ClickException as exc:
        return [f"does not parse: {exc.format_message()}"]
    params = ctx.params
    found = []
    if name == "versions" and params.get("entry") and params["entry"] not in project["entries"]:
        found.append(f"no catalog entry {params['entry']!r}")
    if name != "run":
        return found
    pipes = project["pipelines"]
    if params.get("pipeline"):
        found.append("uses --pipeline (write --pipelines: Kedro deprecates --pipeline)")
    names = [*params.get("pipelines", []), *([params["pipeline"]] if params.get("pipeline") else [])]
    found += [f"no pipeline {n!r}" for n in names if n not in pipes]
    chosen = [pipes[n] for n in names if n in pipes] or list(pipes.values())
    nodes = {n.name for p in chosen for n in p.nodes}
    tags = {t for p in chosen for n in p.nodes for t in n.tags}
    datasets = {d for p in chosen for d in p.datasets()}
    for option in ("node_names", "from_nodes", "to_nodes"):
        found += [f"no node {n!r} in {names or 'the project'}" for n in params.get(option) or []
                  if n not in nodes]
    found += [f"no tag {t!r}" for t in params.get("tags") or [] if t not in tags]
    for option in ("to_outputs", "from_inputs"):
        found += [f"no dataset {d!r}" for d in params.get(option) or [] if d not in datasets]
    for entry, version in (params.get("load_versions") or {}).items():
        if entry not in project["entries"]:
            found.append(f"--load-versions names no catalog entry {entry!r}")
        if not VERSION.match(version):
            found.append(f"--load-versions {entry}:{version} is not a version (YYYY-MM-DDThh.mm.ss.sssZ)")
    if params.get("env") and params["env"] not in project["envs"]:
        found.append(f"no environment conf/{params['env']}")
    tree = _parameters(params.get("env"))
    for path in _leaf_paths(params.get("params") or {}):
        if not _known_path(tree, path):
            found.append(f"--params {'.'.join(path)}: no such parameter")
    return found


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[list[str]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _leaf_paths(value, (*prefix, str(key)))
        else:
            yield [*prefix, str(key)]


# --- the tests -------------------------------------------------------------------------------


def test_the_docs_show_commands() -> None:
    by_doc = {c.doc for c in all_commands()}
    assert "docs/guide.md" in by_doc and "Makefile" in by_doc


# README.md is written by the lead from the README text of the branches' reports; until it uses
# `--pipelines` everywhere, its `--pipeline` lines are reported as a warning (the project's CLI
# takes `--pipeline NAME` as `--pipelines NAME`, without Kedro's deprecation), not as a failure.
DEPRECATION_WARNED = ("README.md",)


@pytest.mark.parametrize("doc", [*DOCS, "Makefile"])
def test_every_documented_command_names_what_exists(project, doc: str) -> None:
    broken, deprecated = [], []
    for command in all_commands():
        if command.doc != doc:
            continue
        for problem in problems(project, command):
            late = problem.startswith("uses --pipeline ") and doc in DEPRECATION_WARNED
            (deprecated if late else broken).append(f"{command}: {problem}")
    if deprecated:
        warnings.warn("\n".join(deprecated), UserWarning, stacklevel=1)
    assert not broken, "\n".join(broken)


def test_the_checker_catches_what_has_rotted(project) -> None:
    def check(line: str) -> list[str]:
        return problems(project, next(_commands("test", 1, line)))

    assert check("kedro run --pipelines curation --from-nodes deduplicate") == []
    assert any("no pipeline 'curaton'" in p for p in check("kedro run --pipelines curaton"))
    assert any("no node 'dedupe'" in p for p in check("kedro run --pipelines curation --nodes dedupe"))
    assert any("no such parameter" in p
               for p in check("kedro run --params curation.filters.keep_fractoin=0.1"))
    assert any("does not parse" in p for p in check("kedro run --pipelinez sample"))
    assert any("--pipeline " in p for p in check("kedro run --pipeline sample"))
    assert any("no catalog entry 'raw_pol'" in p for p in check("aim-kedro versions raw_pol"))
    assert check("kedro run --params pretraining.train.model_overrides.depth=2") == []


def _runnable(predicate) -> list[DocCommand]:
    return [c for c in all_commands() if c.doc in DOCS and predicate(c)]


def _pins_a_version(command: DocCommand) -> bool:
    return command.program == "kedro" and "run" in command.args[:1] and "--load-versions" in command.args


def _reruns_a_stage(command: DocCommand) -> bool:
    args = command.args
    return command.program == "kedro" and "--from-nodes" in args and "--params" in args


def _lists_versions(command: DocCommand) -> bool:
    return "versions" in command.args[:1]


def _run_all(project: Path, commands: list[DocCommand]) -> list[Any]:
    """Run ``commands`` in ``project`` side by side (they only read it, or fail before any
    node runs), results in the order given."""
    return kedro_cli_all(project, [(c.args, c.program) for c in commands])


@pytest.mark.slow
def test_documented_version_commands_run(cli_project) -> None:
    commands = _runnable(_lists_versions)
    assert any(c.doc == "docs/guide.md" for c in commands)
    for command, result in zip(commands, _run_all(cli_project["path"], commands), strict=True):
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}"
        assert re.search(r"\d{4}-\d{2}-\d{2}T", result.stdout), f"{command}: no version listed"


@pytest.mark.slow
def test_documented_pins_of_versions_that_are_not_there_say_which_exist(cli_project) -> None:
    commands = _runnable(_pins_a_version)
    assert any(c.doc == "docs/guide.md" for c in commands)
    for command, result in zip(commands, _run_all(cli_project["path"], commands), strict=True):
        out = result.stdout
        assert result.returncode == 1 and "Traceback" not in out, f"{command}:\n{out[-2000:]}"
        assert "(asked for with --load-versions) does not exist" in out, f"{command}:\n{out[-2000:]}"
        assert "Versions there, newest first: " in out, f"{command}:\n{out[-2000:]}"


@pytest.mark.slow
def test_documented_rerun_of_a_stage_with_a_parameter_runs(cli_project) -> None:
    import json

    commands = _runnable(_reruns_a_stage)
    assert any(c.doc == "docs/guide.md" for c in commands)
    for command in commands[:1]:
        result = kedro_cli(cli_project["path"], *command.args)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}"
        folder = cli_project["path"] / "data/08_reporting/run_manifest.json"
        newest = sorted(p.name for p in folder.iterdir() if VERSION.match(p.name))[-1]
        manifest = json.loads((folder / newest / "run_manifest.json").read_text())
        assert manifest["command"] == f"kedro {' '.join(command.args)}"
        assert manifest["status"] == "completed" and manifest["outputs"]
