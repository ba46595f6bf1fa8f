"""AIM v1 (apple/ml-aim) checkpoint interop: golden outputs, round trip, 600M layout."""

import json

import pytest
import torch
from conftest import REFERENCE
from safetensors.torch import load_file, save_file

from aim_kedro.aim.interop import from_ml_aim, load_aim_v1_checkpoint, to_ml_aim
from aim_kedro.aim.model import AIM, AIMProbeModel
from aim_kedro.aim.presets import get_config

REF = REFERENCE
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason="reference checkpoint files not present")


@pytest.fixture(scope="module")
def golden():
    config = json.loads((REF / "tiny_aim_v1_config.json").read_text())
    return (
        load_file(str(REF / "tiny_aim_v1.safetensors")),
        load_file(str(REF / "tiny_aim_v1_io.safetensors")),
        config,
    )


def test_golden_outputs(golden):
    state, io, config = golden
    model = from_ml_aim(state, **config).eval()
    assert isinstance(model, AIMProbeModel)
    assert model.probe_layers == (2, 3)
    with torch.no_grad():
        logits = model(io["input"])
        blocks = model.extract_features(io["input"])
    assert len(blocks) == config["num_blocks"]
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=0)
    for i, block in enumerate(blocks):
        torch.testing.assert_close(block, io[f"block_{i}"], atol=1e-5, rtol=0)


def test_probe_layers_as_list_equals_int(golden):
    state, io, config = golden
    a = from_ml_aim(state, **{**config, "probe_layers": [2, 3]}).eval()
    b = from_ml_aim(state, **config).eval()
    c = from_ml_aim(state, **{**config, "probe_layers": [0]}).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(io["input"]), b(io["input"]))
        assert not torch.allclose(c(io["input"]), b(io["input"]))


def test_round_trip_is_exact(golden):
    state, _, config = golden
    back = to_ml_aim(from_ml_aim(state, **config))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_600m_layout_names_and_shapes():
    layout = json.loads((REF / "aim_600M_state_dict_layout.json").read_text())
    state = {
        name: torch.empty(
            shape,
            device="meta",
            dtype=torch.long if name.endswith("num_batches_tracked") else torch.float32,
        )
        for name, shape in layout.items()
    }
    cfg = get_config("aim_600M")
    model = from_ml_aim(
        state, img_size=224, patch_size=14, embed_dim=1536, num_blocks=24, num_heads=12,
        probe_layers=list(cfg.probe_layers), num_classes=1000,
    )
    assert model.trunk.cfg.num_patches == 256 and model.probe_layers == tuple(range(14, 20))
    back = to_ml_aim(model)
    assert set(back) == set(layout)
    assert all(list(back[name].shape) == shape for name, shape in layout.items())
    with torch.device("meta"):
        ours = AIM(cfg)
    trunk_names = {n for n in layout if not n.startswith("head.")}
    assert set(to_ml_aim(ours)) == trunk_names
    assert all(list(t.shape) == layout[n] for n, t in to_ml_aim(ours).items())


def test_mismatched_checkpoints_raise(golden):
    state, _, config = golden
    missing = {k: v for k, v in state.items() if k != "trunk.blocks.1.norm_2.bias"}
    with pytest.raises(ValueError, match="trunk.blocks.1.norm_2.bias"):
        from_ml_aim(missing, **config)
    with pytest.raises(ValueError, match="shape"):
        from_ml_aim(state, **{**config, "num_classes": 7})
    with pytest.raises(ValueError):
        from_ml_aim(state, **{**config, "num_blocks": 3})


def test_trunk_only_checkpoint_gets_fresh_head(golden):
    state, io, config = golden
    trunk_only = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = from_ml_aim(trunk_only, **config).eval()
    with torch.no_grad():
        assert model(io["input"]).shape == (3, 10)
        torch.testing.assert_close(model.extract_features(io["input"])[3], io["block_3"],
                                   atol=1e-5, rtol=0)
    assert set(to_ml_aim(model.trunk)) == set(trunk_only)


def test_load_checkpoint_files(golden, tmp_path):
    state, io, config = golden
    st_path = tmp_path / "aim.safetensors"
    save_file(state, str(st_path))
    pth_path = tmp_path / "aim.pth"
    torch.save({"model": state}, pth_path)
    for path in (st_path, pth_path):
        model = load_aim_v1_checkpoint(path, **config).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(io["input"]), io["logits"], atol=1e-5, rtol=0)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_aim_v1_checkpoint(missing, **config)
