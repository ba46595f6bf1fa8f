"""Experiment tracking is off for a plain run, and conf/local/mlflow.yml turns it on, offline."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import yaml
from kedro.framework.project import configure_project, settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from aim_kedro.tracking import MlflowTracking, is_tracked, metric_points

FAST_NODE = {"pipeline_names": ["sample"], "node_names": ["build_probe_sets"]}


@pytest.fixture
def project_copy(tmp_path: Path, make_project_copy) -> Path:
    """A temporary copy of the project (see tests/conftest.py)."""
    return make_project_copy(tmp_path / "project")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any socket connection other than to this machine fails, and is recorded."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network access in a test: {address}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def clean_mlflow_env(monkeypatch: pytest.MonkeyPatch):
    """No MLflow settings from the caller's shell; the global tracking URI is reset afterwards."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    yield
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _plugin_hooks(session: KedroSession) -> list[str]:
    return [type(plugin).__module__ for plugin in session._hook_manager.get_plugins()]


def test_settings_replace_kedro_mlflow_s_own_hook_with_the_opt_in_one() -> None:
    configure_project("aim_kedro")
    assert {"kedro_mlflow", "kedro-mlflow"} & set(settings.DISABLE_HOOKS_FOR_PLUGINS), (
        "settings.DISABLE_HOOKS_FOR_PLUGINS must name kedro-mlflow (its distribution is "
        "'kedro_mlflow'): its hook sets up a tracking store in every session"
    )
    assert any(isinstance(hook, MlflowTracking) for hook in settings.HOOKS)


def test_plain_run_tracks_nothing_and_touches_no_network(
    project_copy: Path, offline: list[object], clean_mlflow_env: None
) -> None:
    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy) as session:
        assert not any(m.startswith("kedro_mlflow") for m in _plugin_hooks(session))
        session.run(**FAST_NODE)
    assert list((project_copy / "data/01_raw/probe_test").iterdir()), "the node did not run"
    assert not (project_copy / "mlruns").exists()
    assert not (project_copy / "mlflow.db").exists()
    assert offline == []


def test_local_mlflow_yml_logs_params_and_metrics_to_a_file_store(
    project_copy: Path, offline: list[object], clean_mlflow_env: None
) -> None:
    base = yaml.safe_load((project_copy / "conf/base/mlflow.yml").read_text())
    base["tracking"]["disable_tracking"]["pipelines"] = ["curation"]
    (project_copy / "conf/local/mlflow.yml").write_text(yaml.safe_dump({"tracking": base["tracking"]}))
    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy) as session:
        session.run(**FAST_NODE)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(project_copy / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("aim_kedro")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "sample"
    assert run.data.params["sample.seed"] == "0"
    assert run.data.params["sample.image_size"] == "64"
    assert run.data.metrics["node_seconds.build_probe_sets"] > 0
    assert offline == []


def test_a_run_is_tracked_unless_all_its_pipelines_are_disabled() -> None:
    config = {"tracking": {"disable_tracking": {"pipelines": ["__default__", "sample"]}}}
    assert not is_tracked(["__default__"], config)
    assert not is_tracked(["sample"], config)
    assert is_tracked(["sample", "pretraining"], config)
    assert not is_tracked(["pretraining"], None)


def test_metrics_come_from_dict_leaves_and_step_indexed_tables() -> None:
    metrics = {"pretrained": {"attentive": {"top1": 0.5, "lr": 1e-3, "ok": True, "name": "x"},
                              "curve": [1, 2]}}
    assert sorted(metric_points("probe_metrics", metrics)) == [
        ("probe_metrics.pretrained.attentive.lr", 1e-3, 0),
        ("probe_metrics.pretrained.attentive.top1", 0.5, 0),
    ]
    history = pl.DataFrame({"step": [10, 20], "train_loss": [0.9, None], "val_loss": [None, 0.7]})
    assert list(metric_points("training_history", history)) == [
        ("training_history.train_loss", 0.9, 10),
        ("training_history.val_loss", 0.7, 20),
    ]
    assert list(metric_points("training_history", pl.DataFrame({"x": [1.0]}))) == []


def test_node_outputs_are_logged_to_the_open_run(tmp_path: Path, clean_mlflow_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("t")).info.run_id
    tracking = MlflowTracking()
    tracking._hook = SimpleNamespace(run_id=run_id)
    history = pl.DataFrame({"step": [0, 5], "train_loss": [2.0, 1.5]})
    tracking.after_node_run(node=SimpleNamespace(name="pretrain_aim"),
                            outputs={"training_history": history, "aim_checkpoint": {"loss": 9.0}})
    client = mlflow.MlflowClient()
    points = client.get_metric_history(run_id, "training_history.train_loss")
    assert [(p.step, p.value) for p in sorted(points, key=lambda p: p.step)] == [(0, 2.0), (5, 1.5)]
    assert "aim_checkpoint.loss" not in client.get_run(run_id).data.metrics


def test_conf_base_tracks_no_registered_pipeline() -> None:
    """Every registered pipeline (and a bare `kedro run`) is in conf/base's disabled list, so no
    run reaches MLflow (nor makes mlruns/) unless conf/local asks."""
    from aim_kedro.lineage import registered_pipelines

    project = Path(__file__).resolve().parents[1]
    bootstrap_project(project)
    config = yaml.safe_load((project / "conf/base/mlflow.yml").read_text())
    disabled = set(config["tracking"]["disable_tracking"]["pipelines"])
    missing = sorted({"__default__", *registered_pipelines()} - disabled)
    assert not missing, f"conf/base/mlflow.yml tracks {missing}: list them under disable_tracking"
