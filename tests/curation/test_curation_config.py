"""curation/config.py (named apart from tests/common/test_config.py): the typed curation parameters,
defaults equal conf/base, and every bad value fails early."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from conftest import PROJECT

from aim_kedro.curation.clip_models import ModelUnavailableError
from aim_kedro.curation.config import (
    BLOCKS,
    CurationConfig,
    FacesConfig,
    ScoringConfig,
    block,
    check_scoring_model,
    validate_curation_params,
)
from aim_kedro.curation.face_stage import FacePolicy
from aim_kedro.curation.faces import HaarCascadeDetector, UnionDetector
from aim_kedro.curation.faces_dlib import DlibCnnDetector
from aim_kedro.curation.nsfw import NudeNetClassifier

BASE = yaml.safe_load((PROJECT / "conf/base/parameters_curation.yml").read_text())["curation"]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_defaults_are_those_of_conf_base() -> None:
    assert set(BASE) == {"progress", *BLOCKS}
    defaults = CurationConfig()
    assert defaults.progress == BASE["progress"]
    for name, cls in BLOCKS.items():
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        values = BASE[name]
        if name != "executor":  # conf/base names only the kind; conf/ray the rest
            assert set(values) == fields, name
        for key, value in values.items():
            default = getattr(getattr(defaults, name), key)
            if dataclasses.is_dataclass(default):  # a nested block: curation.dedup.verify
                assert set(value) == {f.name for f in dataclasses.fields(default)}, key
                for sub, subvalue in value.items():
                    assert _plain(getattr(default, sub)) == subvalue, f"{name}.{key}.{sub}"
            else:
                assert _plain(default) == value, f"{name}.{key}"
    assert validate_curation_params(BASE) == defaults


def test_unknown_keys_name_the_block_and_the_closest_key() -> None:
    with pytest.raises(ValueError, match=r"unknown curation parameter.*'filtres' -> 'filters'"):
        validate_curation_params({**BASE, "filtres": {}})
    bad = copy.deepcopy(BASE)
    bad["subset"]["blur_grown"] = 0.2
    with pytest.raises(ValueError, match=r"unknown curation\.subset parameter.*-> 'blur_grow'"):
        validate_curation_params(bad)
    with pytest.raises(ValueError, match=r"unknown curation\.faces parameter"):
        block(FacesConfig, {"detectors": {}})


def test_bad_values_fail_naming_the_parameter() -> None:
    cases = {
        ("progress",): ("yes", r"curation\.progress must be true or false"),
        ("scoring", "num_threads"): (0, r"curation\.scoring\.num_threads must be a thread count"),
        ("scoring", "precision"): ("fp8", r"curation\.scoring\.precision"),
        ("faces", "detector"): ({"kind": "magic"}, r"curation\.faces\.detector: .*magic"),
        ("faces", "unchecked"): ("blank", r"curation\.faces\.unchecked must be one of"),
        ("faces", "sidecar"): ("merge", r"curation\.faces\.sidecar must be one of"),
        ("nsfw", "classifier"): ("clip", r"curation\.nsfw\.classifier must be one of"),
        ("filters", "nsfw_classifier_threshold"): (0, r"nsfw_classifier_threshold must be in"),
        ("dedup", "score_tolerance"): (2.0, r"curation\.dedup\.score_tolerance"),
        ("filter_network", "epochs"): (0, r"curation\.filter_network\.epochs must be >= 1"),
    }
    for path, (value, message) in cases.items():
        bad = copy.deepcopy(BASE)
        target = bad
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            validate_curation_params(bad)


def test_the_whole_tree_check_builds_the_face_detector_and_nsfw_classifier() -> None:
    cfg = validate_curation_params(BASE)
    detector = cfg.faces.make_detector()
    assert isinstance(detector, UnionDetector)
    assert [type(d) for d in detector.detectors] == [DlibCnnDetector, HaarCascadeDetector]
    assert cfg.faces.policy() == FacePolicy("blur", "union")
    assert isinstance(FacesConfig(detector={"kind": "opencv_haar"}).make_detector(),
                      HaarCascadeDetector)
    with pytest.raises(ValueError, match=r"curation\.faces\.detector: .*no option"):
        FacesConfig(detector={"kind": "opencv_haar", "scale": 2}).make_detector()
    with pytest.raises(ValueError, match=r"curation\.faces\.detector: .*weights"):
        FacesConfig(detector={"kind": "dlib_cnn", "weights": "/no/mmod.dat"}).make_detector()
    assert isinstance(cfg.nsfw.make_classifier(), NudeNetClassifier)
    bad = copy.deepcopy(BASE)
    bad["nsfw"]["model_path"] = "/no/nudenet.onnx"
    with pytest.raises(FileNotFoundError, match="curation.nsfw.model_path"):
        validate_curation_params(bad)


def test_scoring_block_binds_its_model_and_prompts(checkpoint: dict) -> None:
    scoring = ScoringConfig(device="cpu", batch_size=4, num_threads=2)
    scorer = scoring.loader(checkpoint)()
    assert scorer.batch_size == 4 and scorer.num_threads == 2 and scorer.device.type == "cpu"
    with pytest.raises(ValueError, match="filter_network checkpoint is empty"):
        scoring.loader({"state_dict": {}})
    assert scoring.nsfw(None).threshold == 1.0 and scoring.nsfw(0.4).threshold == 0.4
    assert ScoringConfig(nsfw_prompts=("nsfw",)).nsfw(0.5).nsfw_prompts == ("nsfw",)
    with pytest.raises(ValueError, match="model_name is required"):
        ScoringConfig(model="open_clip")


def test_an_open_clip_model_that_needs_a_download_offline_fails_before_the_run(
    monkeypatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_scoring_model(BASE)  # the filter network: nothing to fetch
    params = {**BASE, "scoring": {"model": "open_clip", "model_name": "hf-hub:org/none"}}
    with pytest.raises(ModelUnavailableError, match=r"curation\.scoring\.model_name='hf-hub:"):
        check_scoring_model(params)


def test_precomputed_scores_name_their_column_and_refuse_what_needs_a_model() -> None:
    base = yaml.safe_load((PROJECT / "conf/base/parameters_curation.yml").read_text())["curation"]
    params = copy.deepcopy(base)
    params["scoring"].update(model="precomputed", score_column="clip_l14_similarity_score")
    validate_curation_params(params)
    with pytest.raises(ValueError, match="curation.scoring.score_column"):
        validate_curation_params({**params, "scoring": {"model": "precomputed"}})
    params["dedup"]["embedding_threshold"] = 0.95
    with pytest.raises(ValueError, match="set curation.dedup.embedding_threshold to null"):
        validate_curation_params(params)


def test_read_retries_and_the_uid_list_are_checked_before_the_run(tmp_path) -> None:
    base = yaml.safe_load((PROJECT / "conf/base/parameters_curation.yml").read_text())["curation"]
    with pytest.raises(ValueError, match="curation.index.read_retries"):
        validate_curation_params({**base, "index": {**base["index"], "read_retries": -1}})
    with pytest.raises(FileNotFoundError, match="curation.index.uid_list: uid list .* does not exist"):
        validate_curation_params({**base, "index": {**base["index"],
                                                     "uid_list": str(tmp_path / "nope.npy")}})
