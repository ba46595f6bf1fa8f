"""``aim-kedro`` and ``python -m aim_kedro``: the project's commands without the ``kedro`` CLI.

``aim-kedro versions raw_pool`` (any command of ``aim_kedro.cli``) runs that command; anything
else is the options of a run, as ``kedro run`` takes them (``aim-kedro --pipelines sample``).
"""

import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs) -> None:
    """Run a project command, or the pipelines as `kedro run` would."""
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    from aim_kedro.cli import cli

    argv = list(args[0]) if args else sys.argv[1:]
    if argv and argv[0] in cli.commands:
        return cli(argv, prog_name="aim-kedro", **kwargs)
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
