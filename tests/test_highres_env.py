"""The `highres` Kedro environment (`kedro run -e highres`): its parameters merge over conf/base
into a 224 px run that every validator and the resolution contract accept."""

from __future__ import annotations

import pytest
import yaml
from conftest import PROJECT
from kedro.config import OmegaConfigLoader

from aim_kedro.aim.configs import EvaluationConfig, PretrainingConfig
from aim_kedro.curation.config import validate_curation_params
from aim_kedro.pipelines.sample.nodes import validate_sample_params
from aim_kedro.resolution import check_chain, resolution_chain
from aim_kedro.settings import CONFIG_LOADER_ARGS


def _parameters(env: str) -> dict:
    """The parameters ``kedro run -e env`` sees (the project's loader settings: soft merge)."""
    loader = OmegaConfigLoader(conf_source=str(PROJECT / "conf"),
                               **{**CONFIG_LOADER_ARGS, "default_run_env": env})
    return loader["parameters"]


@pytest.fixture(scope="module")
def highres() -> dict:
    return _parameters("highres")


def test_highres_runs_the_project_at_224_px(highres: dict) -> None:
    base = {name: yaml.safe_load((PROJECT / f"conf/base/parameters_{name}.yml").read_text())[name]
            for name in ("sample", "curation", "evaluation")}
    assert highres["sample"]["image_size"] == 224
    train = PretrainingConfig.from_params(highres["pretraining"]).train
    model = train.model_config()
    assert (model.img_size, model.patch_size, train.preset) == (224, 16, "aim_highres")
    chain = resolution_chain(highres, {"curation", "pretraining"})
    assert [(s.name, s.size) for s in chain] == [("dfn_subset", 224), ("pre-training", 224)]
    assert check_chain(chain) == []  # 224 px all the way: no upscale, no downscale
    # only the keys the environment sets differ: the rest is conf/base's, merged key by key
    assert highres["sample"]["counts"] == base["sample"]["counts"]
    assert highres["curation"]["dedup"] == base["curation"]["dedup"]
    assert highres["evaluation"] == base["evaluation"]


def test_every_validator_accepts_the_highres_parameters(highres: dict) -> None:
    validate_sample_params(highres["sample"])
    validate_curation_params(highres["curation"])
    train = PretrainingConfig.from_params(highres["pretraining"]).train
    train.validate()
    assert train.peak_lr() == 1e-3 and train.warmup() == pytest.approx(0.025 * train.total_steps)
    EvaluationConfig.from_params(highres["evaluation"])
