"""The scaling study over a results table: power-law fits, Spearman's rho, findings, figures."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure

from aim_kedro.aim.scaling_plots import plot_loss_curves, plot_loss_vs_params, plot_probes_vs_params
from aim_kedro.aim.studies import joint_power_law_fit, power_law_fit, scaling_summary

PARAMS = {"s": 50_000, "m": 110_000, "l": 200_000, "xl": 450_000}
IMAGES = {"d06": 70, "d25": 279, "d100": 1117}


def test_power_law_fit_recovers_the_exponent():
    x = [1e4, 3e4, 1e5, 3e5]
    fit = power_law_fit(x, [3.0 * v ** -0.2 for v in x])
    assert fit["exponent"] == pytest.approx(0.2) and fit["coefficient"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 4
    noisy = power_law_fit(x, [3.0 * v ** -0.2 * f for v, f in zip(x, (1.1, 0.9, 1.05, 0.97),
                                                                   strict=True)])
    assert 0.0 < noisy["r2"] < 1.0 and noisy["exponent"] == pytest.approx(0.2, abs=0.05)
    assert power_law_fit([1e4, 1e4], [0.5, 0.4])["exponent"] is None
    assert power_law_fit([1e4, 2e4], [0.5, None])["n"] == 1


def test_joint_fit_recovers_both_exponents():
    params, data = np.meshgrid([1e4, 1e5, 1e6], [100, 1000, 10000])
    loss = 2.0 * params ** -0.1 * data ** -0.05
    fit = joint_power_law_fit(params.ravel(), data.ravel(), loss.ravel())
    assert fit["params_exponent"] == pytest.approx(0.1) and fit["data_exponent"] == pytest.approx(0.05)
    assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 9
    assert joint_power_law_fit([1e4, 1e5], [100, 100], [0.5, 0.4])["data_exponent"] is None


def results(loss_of=None, top1_of=None) -> pl.DataFrame:
    """A grid whose loss follows a known power law (seed noise of +-1%) and whose probe top-1
    rises as the loss falls."""
    loss_of = loss_of or (lambda p, d: 2.0 * p ** -0.1 * d ** -0.02)
    top1_of = top1_of or (lambda loss: 1.5 - 2.0 * loss)
    rows = []
    for capacity, p in PARAMS.items():
        for data, d in IMAGES.items():
            for seed, noise in ((0, 1.01), (1, 0.99)):
                loss = loss_of(p, d) * noise
                top1 = top1_of(loss)
                rows.append({"point": f"{capacity}/{data}/s{seed}", "capacity": capacity,
                             "data": data, "seed": seed, "trunk_params": p, "train_images": d,
                             "steps": 300, "final_val_loss": loss,
                             "attentive_10shot_top1": top1, "attentive_top1": top1 + 0.2,
                             "linear_top1": top1 / 2, "random_attentive_10shot_top1": 0.3,
                             "random_attentive_top1": 0.5, "random_linear_top1": 0.2})
    return pl.DataFrame(rows)


def test_summary_fits_each_data_size_and_capacity_and_checks_the_findings():
    summary = scaling_summary(results(), "equal_steps")
    assert summary["grid"]["capacities"] == PARAMS and summary["grid"]["data_sizes"] == IMAGES
    assert summary["grid"]["runs"] == 24 and summary["steps"] == [300]
    for data in IMAGES:
        assert summary["loss_vs_params"][data]["exponent"] == pytest.approx(0.1)
        assert summary["loss_vs_params"][data]["n"] == 4
    for capacity in PARAMS:
        assert summary["loss_vs_data"][capacity]["exponent"] == pytest.approx(0.02)
    assert summary["loss_joint"]["params_exponent"] == pytest.approx(0.1)
    assert summary["loss_joint"]["data_exponent"] == pytest.approx(0.02)
    headline = summary["spearman"]["attentive_10shot_top1"]
    assert headline["rho"] == pytest.approx(-1.0) and headline["n"] == 24
    assert summary["headline_probe"] == "attentive_10shot_top1"
    findings = summary["findings"]
    assert findings["largest_data"] == "d100" and findings["loss_falls_with_capacity"]
    assert findings["exceptions"] == [] and findings["largest_beats_smallest"]
    assert findings["spearman_negative"]
    assert list(findings["val_loss_by_capacity"]) == list(PARAMS)
    assert findings["attentive_10shot_top1_largest"] > findings["attentive_10shot_top1_smallest"]


def test_an_exception_to_the_trend_is_named():
    bumped = results(loss_of=lambda p, d: 2.0 * p ** -0.1 * (1.2 if p == PARAMS["l"] else 1.0))
    findings = scaling_summary(bumped, "equal_steps")["findings"]
    assert not findings["loss_falls_with_capacity"]
    assert len(findings["exceptions"]) == 1 and findings["exceptions"][0].startswith("m -> l")
    flat = results(top1_of=lambda loss: 0.5)
    summary = scaling_summary(flat, "equal_steps")
    assert summary["spearman"]["attentive_10shot_top1"]["rho"] is None
    assert not summary["findings"]["spearman_negative"]
    assert not summary["findings"]["largest_beats_smallest"]


def _curves(table: pl.DataFrame) -> pl.DataFrame:
    rows = [{"point": r["point"], "capacity": r["capacity"], "data": r["data"],
             "seed": r["seed"], "step": step, "val_loss": r["final_val_loss"] * math.exp(-step / 300 + 1)}
            for r in table.iter_rows(named=True) for step in (0, 150, 300)]
    return pl.DataFrame(rows)


def test_the_figures_draw_a_line_per_data_size_and_per_capacity():
    table = results()
    summary = scaling_summary(table, "equal_steps")
    loss = plot_loss_vs_params(table, summary)
    assert isinstance(loss, Figure) and loss.axes[0].get_xscale() == "log"
    labels = [line.get_label() for line in loss.axes[0].get_lines()]
    assert sum(label.startswith(tuple(IMAGES)) for label in labels) == 3
    assert any("N^-0.100" in label for label in labels)
    probes = plot_probes_vs_params(table)
    assert [ax.get_title() for ax in probes.axes] == ["attentive 10-shot", "attentive", "linear"]
    assert any(line.get_label() == "random-init trunk" for line in probes.axes[0].get_lines())
    curves = plot_loss_curves(_curves(table), table)
    assert len(curves.axes) == 3 and curves.axes[0].get_ylim()[1] < _curves(table)["val_loss"].max()
    assert [line.get_label() for line in curves.axes[0].get_lines()] == [
        "s (50k)", "m (110k)", "l (200k)", "xl (450k)"]
    assert [t.get_text() for t in loss.axes[0].get_xticklabels()] == ["50k", "110k", "200k", "450k"]
