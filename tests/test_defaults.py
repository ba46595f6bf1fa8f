"""One source of truth for defaults: every config dataclass default equals conf/base."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from aim_kedro.aim.configs import EvaluationConfig, PretrainingConfig
from aim_kedro.curation.config import CurationConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "base"

# Blocks whose dataclass has fields that conf/base leaves to another environment on purpose.
ELSEWHERE = {
    "curation.executor": "conf/ray sets the Ray knobs; conf/base only says where stages run",
}

ROOTS = [
    ("curation", CurationConfig),
    ("pretraining", PretrainingConfig),
    ("evaluation", EvaluationConfig),
]


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so a dataclass default compares with its YAML form."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _drift(yaml_block: dict[str, Any], default: Any, where: str) -> list[str]:
    """Every place where conf/base and the dataclass defaults disagree, or a field is missing."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(default) if f.init}
    for name in sorted(set(fields) - set(yaml_block)):
        if where not in ELSEWHERE:
            problems.append(f"{where}.{name}: in {type(default).__name__} but not in conf/base")
    for name, value in yaml_block.items():
        if name not in fields:
            problems.append(f"{where}.{name}: in conf/base but not a field of {type(default).__name__}")
            continue
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            problems.extend(_drift(value, current, f"{where}.{name}"))
        elif dataclasses.is_dataclass(current):
            problems.append(f"{where}.{name}: conf/base has {value!r}, the default is a block")
        elif _plain(current) != _plain(value):
            problems.append(f"{where}.{name}: conf/base has {value!r}, the dataclass {current!r}")
    return problems


@pytest.mark.parametrize(("root", "config"), ROOTS, ids=[r for r, _ in ROOTS])
def test_dataclass_defaults_equal_conf_base(root: str, config: type) -> None:
    block = yaml.safe_load((CONF / f"parameters_{root}.yml").read_text())[root]
    assert _drift(block, config(), root) == []


def test_the_drift_check_sees_a_changed_default() -> None:
    block = yaml.safe_load((CONF / "parameters_curation.yml").read_text())["curation"]
    block["subset"]["blur_grow"] = 0.1234
    del block["dedup"]["exact"]
    problems = _drift(block, CurationConfig(), "curation")
    assert any(p.startswith("curation.subset.blur_grow: conf/base has 0.1234") for p in problems)
    assert "curation.dedup.exact: in DedupConfig but not in conf/base" in problems
