"""The resolution contract: an upscale anywhere in the chain fails before the run, naming the
parameters; downscales are logged once."""

from __future__ import annotations

import copy
import logging

import pytest
import yaml
from conftest import PROJECT

from aim_kedro.curation.config import validate_curation_params
from aim_kedro.resolution import check_resolution, resolution_chain

PARAMS = {name: yaml.safe_load((PROJECT / f"conf/base/parameters_{name}.yml").read_text())[name]
          for name in ("curation", "pretraining")}


def _params(**changes: dict) -> dict:
    params = copy.deepcopy(PARAMS)
    for path, value in changes.items():
        block, *keys = path.split("__")
        target = params[block]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return params


def test_the_default_chain_only_downscales_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    chain = resolution_chain(PARAMS, {"curation", "pretraining"})
    assert [(s.name, s.size) for s in chain] == [("dfn_subset", 48), ("pre-training", 32)]
    with caplog.at_level(logging.INFO, logger="aim_kedro.resolution"):
        check_resolution(PARAMS, {"curation", "pretraining"})
    # only this logger's records: an object of an earlier test may log while collected here
    assert [r.getMessage() for r in caplog.records if r.name == "aim_kedro.resolution"] == [
        "resolution: dfn_subset 48 px -> pre-training 32 px (downscaled: pretraining.train.preset "
        "(aim_sample))"
    ]


def test_a_preset_larger_than_the_subset_fails_naming_both() -> None:
    params = _params(pretraining__train__model_overrides={"img_size": 64, "patch_size": 4})
    with pytest.raises(ValueError, match=r"model_overrides.img_size: pre-training at 64 px would "
                                         r"upscale the 48 px of dfn_subset \(curation.subset"):
        check_resolution(params, {"pretraining"})
    check_resolution(params, {"curation"})  # a curation-only run does not train


def test_only_if_bigger_hands_on_the_filters_minimum() -> None:
    params = _params(curation__subset__only_if_bigger=True, curation__filters__min_shorter_side=24)
    with pytest.raises(ValueError, match="curation.filters.min_shorter_side"):
        check_resolution(params, {"curation", "pretraining"})


def test_a_subset_larger_than_the_filters_minimum_would_upscale() -> None:
    params = _params(curation__filters__min_shorter_side=32)
    with pytest.raises(ValueError, match="curation.subset.shorter_side=48 would upscale the kept "
                                         "images of 32-47 px"):
        validate_curation_params(params["curation"])
    params["curation"]["subset"]["only_if_bigger"] = True
    validate_curation_params(params["curation"])


def test_the_run_hook_refuses_an_upscale_before_any_node() -> None:
    from kedro.io import DataCatalog, MemoryDataset

    from aim_kedro.hooks import ValidateBeforeRunHooks
    from aim_kedro.pipelines.pretraining import create_pipeline

    params = _params(pretraining__train__model_overrides={"img_size": 64, "patch_size": 4})
    catalog = DataCatalog({"parameters": MemoryDataset(params)})
    with pytest.raises(ValueError, match="would upscale the 48 px of dfn_subset"):
        ValidateBeforeRunHooks().before_pipeline_run({}, create_pipeline(), catalog)
