"""Two `kedro run` at once in one project: the second fails at once saying why (or waits, when
asked), versions never collide, and nothing either run wrote is lost.

Run A is a real `kedro run --pipelines sample`; it is held still with SIGSTOP while it holds its
locks, so the second run certainly meets it, then let go with SIGCONT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kedro_cli, small_project
from kedro.io import Version

from aim_kedro.datasets import WebDatasetShards

pytestmark = pytest.mark.slow

WAIT_S = 300


def _popen(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "kedro"), *args], cwd=project,
                            env={**os.environ, "COLUMNS": "240", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f} s"
        time.sleep(0.1)


def _holder(project: Path) -> dict:
    lock = project / "data/01_raw/.lock-raw_pool"
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_second_run_fails_at_once_and_a_waiting_one_runs_after(tmp_path: Path) -> None:
    project = small_project(tmp_path / "project")
    first = _popen(project, "run", "--pipelines", "sample")
    try:
        _wait_for(lambda: _holder(project).get("pid") == first.pid, "run A holding its locks", first)
        os.kill(first.pid, signal.SIGSTOP)
        second = kedro_cli(project, "run", "--pipelines", "sample", timeout=WAIT_S)
        out = second.stdout
        assert second.returncode == 1, out[-3000:]
        assert "another kedro run is writing" in out and f"pid {first.pid}" in out, out[-3000:]
        assert "raw_pool" in out and "AIM_KEDRO_LOCK_WAIT" in out and "Traceback" not in out
        assert "Running node" not in out
        third = _popen(project, "run", "--pipelines", "sample", env={"AIM_KEDRO_LOCK_WAIT": "600"})
        log: list[str] = []

        def waiting() -> bool:
            line = third.stdout.readline()
            log.append(line)
            return "waiting up to 600 s for" in line

        _wait_for(waiting, "run C waiting for run A", third)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=WAIT_S) == 0, first.stdout.read()[-3000:]
        rest = third.communicate(timeout=WAIT_S)[0]
        assert third.returncode == 0, "".join(log)[-2000:] + rest[-3000:]
    finally:
        for proc in (first,):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
    manifests = project / "data/08_reporting/run_manifest.json"
    runs = [json.loads((manifests / v / "run_manifest.json").read_text()) for v in _versions(manifests)]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert runs[0]["version"] != runs[1]["version"]
    pool = project / "data/01_raw/raw_pool"
    assert _versions(pool) == sorted(r["outputs"]["raw_pool"]["version"] for r in runs)
    planted = sum(runs[0]["parameters"]["sample"]["counts"].values())
    for version in _versions(pool):
        shards = WebDatasetShards(filepath=str(pool), version=Version(version, None)).load()
        assert shards.count() == planted, version
    assert not [p for p in (project / "data").rglob(".tmp-*")], "a save left its temporary files"


def test_runs_that_write_different_entries_go_on_side_by_side(tmp_path: Path) -> None:
    """Only what both would write blocks: the lock set of a run is its outputs and work folders."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from aim_kedro.lineage import registered_pipelines
    from aim_kedro.runguard import written_entries

    project = small_project(tmp_path / "project")
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog
    pipes = registered_pipelines()
    curation = written_entries(pipes["curation"], catalog)
    pretraining = written_entries(pipes["pretraining"], catalog)
    evaluation = written_entries(pipes["evaluation"], catalog)
    assert "clip_score_cache" in curation and "pool_index" in curation
    assert "pretraining_run" in pretraining and "aim_checkpoint" in pretraining
    assert "run_manifest" not in curation and "raw_pool" not in curation
    assert not set(curation) & set(evaluation)
    assert set(evaluation) == {n for n in pipes["evaluation"].all_outputs()
                               if n in catalog and not type(catalog.get(n)).__name__.startswith("Memory")}
