"""Presets as data and config validation errors."""

import pytest

from aim_kedro.aim.presets import PRESETS, AIMConfig, config_from_checkpoint, get_config


def test_published_presets():
    expected = {
        "aim_600M": (1536, 24, 12, tuple(range(14, 20))),
        "aim_1B": (2048, 24, 16, tuple(range(12, 18))),
        "aim_3B": (3072, 24, 24, tuple(range(12, 18))),
        "aim_7B": (4096, 32, 32, tuple(range(14, 20))),
    }
    for name, (width, depth, heads, layers) in expected.items():
        cfg = PRESETS[name]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.probe_layers) == (
            width, depth, heads, layers
        )
        assert (cfg.patch_size, cfg.img_size, cfg.num_patches, cfg.grid_size) == (14, 224, 256, 16)
        assert (cfg.head_depth, cfg.head_embed_dim) == (12, 2048)


def test_small_presets_and_default_probe_layers():
    assert PRESETS["aim_vitb"].probe_layers == tuple(range(6, 12))
    assert PRESETS["aim_sample"].probe_layers == (0, 1, 2, 3)
    assert PRESETS["aim_tiny"].probe_layers == (0, 1)
    assert PRESETS["aim_sample"].num_patches == 64
    assert get_config("aim_sample", depth=8).probe_layers == tuple(range(2, 8))
    assert get_config("aim_sample", probe_layers=2).probe_layers == (2, 3)


def test_dict_round_trip():
    cfg = get_config("aim_600M", attn_backend="flex")
    data = cfg.to_dict()
    assert data["probe_layers"] == list(range(14, 20))
    assert AIMConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="bogus"):
        AIMConfig.from_dict({**data, "bogus": 1})


def test_config_from_a_checkpoint_ignores_the_preset_name():
    cfg = get_config("aim_tiny")
    assert config_from_checkpoint({**cfg.to_dict(), "preset": "aim_tiny"}) == cfg


def test_unknown_preset_names_parameter_and_lists_known():
    with pytest.raises(ValueError, match="preset") as err:
        get_config("aim_huge")
    assert "aim_600M" in str(err.value) and "aim_tiny" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"img_size": 30}, ("img_size", "patch_size")),
        ({"embed_dim": 36, "num_heads": 5}, ("embed_dim", "num_heads")),
        ({"embed_dim": 30, "num_heads": 3}, ("embed_dim",)),
        ({"attn_backend": "xformers"}, ("attn_backend",)),
        ({"probe_layers": (0, 5)}, ("probe_layers",)),
        ({"depth": 0}, ("depth",)),
        ({"img_size": 4}, ("patch",)),
        ({"widht": 3}, ("widht",)),
    ],
)
def test_invalid_overrides_raise_naming_parameter(overrides, names):
    with pytest.raises(ValueError) as err:
        get_config("aim_tiny", **overrides)
    for name in names:
        assert name in str(err.value)


def test_preset_probe_layers_out_of_range_after_depth_override():
    with pytest.raises(ValueError, match="probe_layers"):
        get_config("aim_600M", depth=12)
