"""Typed configs from mappings: unknown keys fail naming the path and the closest valid key."""

from dataclasses import dataclass

import pytest

from aim_kedro.common.config import closest, from_mapping


@dataclass(frozen=True)
class _Cfg:
    keep_fraction: float = 0.15
    threshold: float | None = None


def test_from_mapping_builds_the_dataclass_with_defaults() -> None:
    assert from_mapping(_Cfg, {"threshold": 0.3}, "curation.filters") == _Cfg(0.15, 0.3)
    assert from_mapping(_Cfg, None, "curation.filters") == _Cfg()


def test_unknown_key_names_the_path_and_the_closest_valid_key() -> None:
    with pytest.raises(ValueError, match=r"unknown curation\.filters parameter\(s\) \['keep_fractoin'\]"
                       r" \(did you mean 'keep_fractoin' -> 'keep_fraction'\?\)"):
        from_mapping(_Cfg, {"keep_fractoin": 0.2}, "curation.filters")


def test_a_non_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match="curation.filters must be a mapping"):
        from_mapping(_Cfg, [1, 2], "curation.filters")  # type: ignore[arg-type]


def test_closest_returns_none_when_nothing_is_alike() -> None:
    assert closest("zzz", ["keep_fraction", "threshold"]) is None
    assert closest("treshold", ["keep_fraction", "threshold"]) == "threshold"


@dataclass(frozen=True)
class _Inner:
    shots: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class _Outer:
    kind: str = "attentive"
    low_shot: _Inner = _Inner()
    extra: _Inner | None = None


@dataclass(frozen=True)
class _Required:
    img_size: int
    patch_size: int
    num_classes: int = 1000


def test_nested_blocks_are_built_and_checked_at_every_depth() -> None:
    built = from_mapping(_Outer, {"low_shot": {"shots": 2}, "extra": {"seeds": [0]}}, "evaluation.probes")
    assert built.low_shot == _Inner(shots=2) and built.extra == _Inner(seeds=[0])
    assert from_mapping(_Outer, {"extra": None}, "evaluation.probes").extra is None
    with pytest.raises(ValueError, match=r"unknown evaluation\.probes\.low_shot parameter\(s\) "
                                         r"\['shot'\] \(did you mean 'shot' -> 'shots'\?\)"):
        from_mapping(_Outer, {"low_shot": {"shot": 2}}, "evaluation.probes")


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ValueError, match=r"evaluation\.trunk\.config lacks \['patch_size'\]; "
                                         r"it needs \['img_size', 'patch_size'\]"):
        from_mapping(_Required, {"img_size": 224}, "evaluation.trunk.config")


def test_check_choice_names_the_parameter_the_choices_and_the_hint() -> None:
    from aim_kedro.common.config import check_choice

    check_choice("ray", ("local", "ray"), "curation.executor.kind")
    with pytest.raises(ValueError, match=r"^curation.executor.kind must be one of \['local', "
                                         r"'ray'\], got 'dask'; use local$"):
        check_choice("dask", ("local", "ray"), "curation.executor.kind", "use local")
    with pytest.raises(ValueError, match=r"got 'x'$"):
        check_choice("x", ("a",), "where")
