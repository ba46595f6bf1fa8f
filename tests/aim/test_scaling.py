"""The scaling grid: points, per-point configs, nested data subsets, model sizes, result rows."""

from __future__ import annotations

import json

import polars as pl
import pytest

from aim_kedro.aim.data import val_bucket
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.scaling import (
    ScalingConfig,
    by_size,
    curves,
    data_size_count,
    data_subset,
    low_shot_column,
    merged,
    model_size,
    result_row,
    results_table,
    subset_rank,
)
from aim_kedro.io.shards import ShardSet, sample_json, write_shards
from aim_kedro.io.uids import sample_uid


def _samples(n: int, with_uid: bool = True) -> list[dict]:
    return [{"__key__": f"k{i:04d}", "png": b"not decoded here", "txt": f"caption {i}",
             "json": ({"uid": f"{i:032x}"} if with_uid else {"source": "test"})}
            for i in range(n)]


def test_points_cover_the_grid_in_order():
    grid = ScalingConfig.from_params({"grid": "g", "grids": {"g": {
        "capacities": {"a": {"preset": "aim_tiny"}, "b": {"preset": "aim_sample"}},
        "data_sizes": {"small": 0.5, "big": 100, "all": 1.0}, "seeds": [3, 1]}}})
    assert grid.where == "scaling.grids.g" and ScalingConfig.from_params({}) == ScalingConfig()
    assert [grid.whole(d) for d in grid.data_sizes] == [False, False, True]
    points = [p for p in grid.points() if p.data != "all"]
    assert [p.label for p in points] == ["a/small/s3", "a/small/s1", "a/big/s3", "a/big/s1",
                                         "b/small/s3", "b/small/s1", "b/big/s3", "b/big/s1"]
    assert points[0].run == "small_s3"
    assert grid.capacities["b"].model_config() == get_config("aim_sample")


def test_a_point_s_pretraining_is_the_block_with_the_overrides_and_the_point():
    grid = ScalingConfig.from_grid({
        "capacities": {"a": {"preset": "aim_tiny", "model_overrides": {"embed_dim": 16}}},
        "data_sizes": {"all": 1.0}, "seeds": [5], "steps": 40,
        "pretraining": {"val_percent": 20.0, "train": {"lr": 1.0e-3, "warmup_steps": 4}}}, "g")
    base = {"num_gpus": 1, "val_percent": 5.0,
            "train": {"preset": "aim_600M", "model_overrides": {"img_size": 224}, "lr": 2.0e-3,
                      "batch_size": 16, "warmup_steps": 30, "total_steps": 450}}
    settings = grid.point_pretraining(grid.points()[0], base)
    assert settings.val_percent == 20.0 and settings.train.batch_size == 16
    assert settings.train.lr == 1.0e-3 and settings.train.warmup_steps == 4
    assert settings.train.preset == "aim_tiny" and settings.train.model_overrides == {"embed_dim": 16}
    assert settings.train.seed == 5 and settings.train.total_steps == 40
    assert base["train"]["total_steps"] == 450, "the pretraining block is left as it was"


def test_merged_merges_nested_blocks_without_touching_the_base():
    base = {"a": 1, "b": {"c": 2, "d": {"e": 3}}}
    out = merged(base, {"b": {"d": {"f": 4}}, "g": 5})
    assert out == {"a": 1, "b": {"c": 2, "d": {"e": 3, "f": 4}}, "g": 5}
    assert base == {"a": 1, "b": {"c": 2, "d": {"e": 3}}}


def test_data_size_counts_are_checked():
    assert data_size_count(0.25, 100, "x") is None and data_size_count(40, 100, "x") == 40
    with pytest.raises(ValueError, match="x asks for 200 training images but dfn_subset holds 100"):
        data_size_count(200, 100, "x")
    for bad in (0.0, 1.5, 1, True, "half"):
        with pytest.raises(ValueError, match="x is"):
            data_size_count(bad, 100, "x")


def test_data_subsets_are_nested_and_keep_one_held_out_split(tmp_path):
    write_shards(_samples(400), str(tmp_path / "pool"), samples_per_shard=64)
    pool = ShardSet.open(str(tmp_path / "pool"))
    val = {sample_uid(s) for s in pool if val_bucket(sample_uid(s)) < 20.0}
    available = 400 - len(val)
    kept = {}
    for size in (0.1, 50, 0.5, 1.0):
        stream, info = data_subset(pool, size, 20.0, f"d{size}")
        kept[size] = [sample_uid(s) for s in stream]
        assert len(kept[size]) == len(set(kept[size])) == info["train_images"] + len(val)
        assert info["val_images"] == len(val) and val <= set(kept[size])
        assert info["available_train_images"] == available
        assert info["fraction"] == info["train_images"] / available
    assert len(kept[50]) - len(val) == 50  # a count is exact
    for fraction in (0.1, 0.5):  # a fraction takes the images ranked below it: about f * N
        assert abs(len(kept[fraction]) - len(val) - fraction * available) < 4 * available ** 0.5
    assert set(kept[0.1]) < set(kept[0.5]) < set(kept[1.0]) and set(kept[50]) < set(kept[0.5])
    assert len(set(kept[1.0])) == 400
    train_01 = set(kept[0.1]) - val  # not the first images of the pool: a hash order
    assert train_01 != {sample_uid(s) for s in list(pool)[:len(train_01)]}
    assert all(subset_rank(u) < 0.1 for u in train_01)
    assert max(subset_rank(u) for u in set(kept[50]) - val) < min(
        subset_rank(u) for u in set(kept[1.0]) - val - set(kept[50]))


def test_a_subset_keeps_uids_of_samples_that_had_none(tmp_path):
    write_shards(_samples(30, with_uid=False), str(tmp_path / "pool"), samples_per_shard=10)
    pool = ShardSet.open(str(tmp_path / "pool"))
    before = {s["__key__"]: sample_uid(s) for s in pool}
    stream, _ = data_subset(pool, 1.0, 30.0, "all")
    write_shards(stream, str(tmp_path / "subset"), samples_per_shard=1000)
    after = list(ShardSet.open(str(tmp_path / "subset")))
    assert {s["__key__"]: sample_uid(s) for s in after} == before  # another shard, same uid
    assert all(sample_json(s)["source"] == "test" for s in after)


def test_model_size_counts_parameters_and_flops_of_the_real_model():
    cfg = get_config("aim_sample", embed_dim=48, num_heads=3, head_embed_dim=24)
    sizes = model_size(cfg)
    model = AIM(cfg)
    assert sizes["trunk_params"] == sum(p.numel() for p in model.trunk.parameters())
    assert sizes["params"] == sum(p.numel() for p in model.parameters())
    d, n, r = cfg.embed_dim, cfg.num_patches, cfg.mlp_ratio  # 2 FLOPs per multiply-add
    per_block = (4 + 2 * r) * d * d + 2 * n * d  # qkv + proj + mlp, and QK^T + AV
    assert sizes["trunk_flops_per_image"] == 2 * n * (cfg.patch_dim * d + cfg.depth * per_block)
    head = d * cfg.head_embed_dim + 2 * r * cfg.head_embed_dim ** 2 + cfg.head_embed_dim * cfg.patch_dim
    assert sizes["flops_per_image"] == sizes["trunk_flops_per_image"] + 2 * n * head
    assert model_size(get_config("aim_7B"))["trunk_params"] > 6e9  # the meta device: no memory


def _history(losses: list[float | None]) -> pl.DataFrame:
    steps = list(range(0, 10 * len(losses), 10))
    return pl.DataFrame({"step": steps, "train_loss": [None] + [1.0] * (len(losses) - 1),
                         "val_loss": losses, "lr": [1e-3] * len(losses),
                         "grad_norm": [1.0] * len(losses), "images_per_s": [1.0] * len(losses)},
                        schema_overrides={"train_loss": pl.Float64, "val_loss": pl.Float64})


def _metrics(top1: float) -> dict:
    entry = {"top1": top1, "top5": 1.0, "lr": 1e-2}
    return {"pretrained": {"attentive": entry, "attentive_10shot": {**entry, "std": 0.1},
                           "linear": entry, "trunk": "x"},
            "random_init": {"attentive_10shot": {"top1": top1 / 2}, "trunk": "y"},
            "pretraining_gain": {"attentive_10shot": top1 / 2}}


def test_a_result_row_reads_the_point_s_history_and_probes():
    grid = ScalingConfig.from_grid({"capacities": {"t": {"preset": "aim_tiny"}},
                                    "data_sizes": {"all": 1.0}, "seeds": [0], "steps": 30,
                                    "pretraining": {"train": {"warmup_steps": 2}}}, "g")
    point = grid.points()[0]
    settings = grid.point_pretraining(point, {"train": {"batch_size": 8}})
    data = {"train_images": 60, "fraction": 1.0, "val_images": 6}
    row = result_row(point, settings, data, _history([1.0, 0.8, None, 0.5]), _metrics(0.4))
    sizes = model_size(get_config("aim_tiny"))
    assert row["trunk_params"] == sizes["trunk_params"] and row["steps"] == 30
    assert row["images_seen"] == 240 and row["epochs"] == 4.0
    assert row["train_flops"] == 3 * sizes["flops_per_image"] * 240
    assert row["final_val_loss"] == 0.5 and row["final_train_loss"] == 1.0
    assert row["attentive_10shot_top1"] == 0.4 and row["random_attentive_10shot_top1"] == 0.2
    assert "trunk_top1" not in row and "pretraining_gain_top1" not in row
    table = results_table([row, {**row, "seed": 1, "point": "t/all/s1"}])
    assert table.height == 2 and low_shot_column(table) == "attentive_10shot_top1"
    assert by_size(table, "capacity", "trunk_params") == {"t": sizes["trunk_params"]}
    assert curves(point, _history([1.0, 0.8, None, 0.5]))["val_loss"].to_list() == [1.0, 0.8, 0.5]
    json.dumps(row)  # a plain row: the results are parquet and the summary JSON
