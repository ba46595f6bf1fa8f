"""The project's commands, as ``kedro <command>`` and ``aim-kedro <command>``.

- ``run``: Kedro's own ``kedro run`` (same options), except that a configuration error (a bad
  parameter, a missing input, a run that another run blocks, a full disk) prints its message
  alone; ``--verbose`` shows the traceback. ``--pipeline NAME`` is taken as ``--pipelines NAME``
  without Kedro's deprecation warning.
- ``versions [ENTRY]``: the saved versions of an entry, newest first, each with the command of
  the run that wrote it; without ENTRY, every versioned entry with its count and newest version.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.cli.utils import CONTEXT_SETTINGS, env_option
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.utils import find_kedro_project

from aim_kedro.common.config import closest
from aim_kedro.lineage import (
    dataset_of,
    filepath_of,
    is_versioned,
    manifests,
    producers,
    registered_pipelines,
    saved_versions,
)

# Built-in Kedro errors a run raises before any node when its options are wrong (an unknown
# pipeline or node name, a version string Kedro refuses).
OPTION_ERRORS = (ValueError, KeyError)


class RunError(click.ClickException):
    """An expected error of a run: shown as its message, the traceback behind ``--verbose``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error

    def show(self, file: IO[Any] | None = None) -> None:
        """``Error (NoSpaceError): <message>`` and how to see the traceback."""
        name = type(expected_cause(self.error) or self.error).__name__
        message = str(self.error).strip()
        if isinstance(self.error, KeyError) and message.startswith(("'", '"')):
            message = message[1:-1]
        click.secho(f"Error ({name}): {message}", fg="red", err=True, file=file)
        click.echo("(run again with --verbose for the traceback)", err=True, file=file)


def expected_cause(error: BaseException | None) -> BaseException | None:
    """The first error of ``error``'s chain that a check or a dataset marked as expected (Kedro
    wraps a dataset's error in its own ``DatasetError``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "expected_error", False):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_expected(error: BaseException) -> bool:
    """A configuration error: marked by the run's checks or a dataset, or one of Kedro's own
    option errors raised before any node started."""
    from aim_kedro.hooks import nodes_started

    if expected_cause(error) is not None:
        return True
    return isinstance(error, OPTION_ERRORS) and not nodes_started()


@click.group(context_settings=CONTEXT_SETTINGS, name=__file__)
def cli() -> None:
    """The project's commands (``kedro <command>``, ``aim-kedro <command>``)."""


def _run(verbose: bool, pipeline: str | None, pipelines: list[str], **options: Any) -> Any:
    if pipeline:
        pipelines = [*pipelines, pipeline] if pipeline not in pipelines else pipelines
    try:
        return kedro_run.callback(pipeline=None, pipelines=pipelines, **options)
    except Exception as error:
        if verbose or not is_expected(error):
            raise
        raise RunError(error) from error


run = click.Command(
    name="run",
    params=[
        *kedro_run.params,
        click.Option(["--verbose", "-v"], is_flag=True,
                     help="Show the full traceback of a configuration error."),
    ],
    callback=_run,
    help=kedro_run.help,
    short_help=kedro_run.short_help,
    context_settings=dict(kedro_run.context_settings),
)
cli.add_command(run)


def _project_path() -> Path:
    ctx = click.get_current_context(silent=True)
    metadata = getattr(ctx, "obj", None) if ctx is not None else None
    path = getattr(metadata, "project_path", None) or find_kedro_project(Path.cwd())
    if path is None:
        raise click.ClickException("no Kedro project here: run this from the project root")
    return Path(path)


def _catalog(env: str | None) -> Any:
    """The project's catalog, for commands that only read its entries' files: Kedro's typed
    validation of the parameters is scoped to no pipeline, so building it imports none of
    them (torch, timm: about 5 s)."""
    project = _project_path()
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        context = session.load_context()
        context._pipelines_to_validate = []  # as KedroSession.run scopes it to its pipelines
        return context.catalog


def _runs(catalog: Any) -> dict[str, str]:
    """Version -> the command of the run whose manifest has that version."""
    try:
        return {m["version"]: m.get("command", "") for m in manifests(catalog)}
    except Exception:  # noqa: BLE001 - an unreadable manifest: versions without commands
        return {}


@cli.command("versions")
@click.argument("entry", required=False)
@env_option
def versions(entry: str | None, env: str | None) -> None:
    """List the saved versions of ENTRY, newest first, with the run that wrote each (every
    versioned entry with its count and newest version when ENTRY is left out)."""
    catalog = _catalog(env)
    runs = _runs(catalog)
    if entry is None:
        for name in sorted(catalog.keys()):
            dataset = dataset_of(catalog, name)
            if is_versioned(dataset):
                found = saved_versions(dataset)
                newest = found[0] if found else "-"
                click.echo(f"{name:32s} {len(found):4d}  {newest}")
        return
    if entry not in catalog:
        hint = closest(entry, catalog.keys())
        raise click.BadParameter(f"no catalog entry {entry!r}"
                                 + (f" (did you mean {hint!r}?)" if hint else ""), param_hint="ENTRY")
    dataset = dataset_of(catalog, entry)
    where = filepath_of(dataset)
    if not is_versioned(dataset):
        click.echo(f"{entry} ({where}) is not versioned: it holds one copy")
        return
    found = saved_versions(dataset)
    if not found:
        maker = producers(registered_pipelines()).get(entry)
        hint = f"; {maker.describe()} makes it: `{maker.command()}`" if maker else ""
        click.echo(f"{entry} ({where}): no saved version yet{hint}")
        return
    click.echo(f"{entry} ({where}): {len(found)} version(s), newest first")
    for version in found:
        command = runs.get(version)
        click.echo(f"  {version}  {command}" if command else f"  {version}")

