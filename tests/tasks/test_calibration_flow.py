"""flows/calibration.py: ε sensitivity beside every setting, and which split each number comes from
(tasks/report.py and tasks/describe.py show them)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import polars as pl
import pytest
import torch

from entcal.flows import calibration
from entcal.flows.executor import Executor
from entcal.tasks import describe, fronts, sections
from entcal.tasks.config import DecodingSpec, StudyConfig
from entcal.tasks.contracts import EPS_COLUMNS, CalibrationResult
from entcal.tasks.metrics import logloss_at_epsilon


def _prompts(lm, n=6, p=9, r=14):
    g = torch.Generator().manual_seed(5)
    V = lm.model.config.vocab_size
    return pl.DataFrame({
        "example_id": [f"e{i}" for i in range(n)], "dataset": ["d"] * n,
        "prompt_ids": [torch.randint(2, V, (p - i % 3,), generator=g).tolist() for i in range(n)],
        "reference_ids": [torch.randint(2, V, (r,), generator=g).tolist() for _ in range(n)],
    }, schema_overrides={"prompt_ids": pl.List(pl.Int32), "reference_ids": pl.List(pl.Int32)})


def _decoding(row: dict) -> DecodingSpec:
    return DecodingSpec(**{row["method"]: row["param"]})


@pytest.fixture(scope="module")
def calibrated(tiny_spec, tiny_lm, stack, prefect_harness, tmp_path_factory):
    """The calibration on a real executor (cached stages on the test stack's S3)."""
    cfg = StudyConfig.model_validate({
        "models": [tiny_spec.model_dump()], "num_examples": 6, "prompt_tokens": 8, "max_new_tokens": 10,
        "min_reference_tokens": 10, "horizon": 10, "batch_size": 6, "bootstrap": 30, "epsilon": 1e-4,
        "calibration": {"tau_bracket": [0.3, 3.0], "tau_rounds": 3, "top_k": [2, 8, 60], "top_p": [0.3, 0.9],
                        "min_p": [], "top_nsigma": [], "typical_p": [], "eta_cutoff": [], "epsilon_cutoff": [],
                        "lookahead": False, "future_entropy": False, "tau_schedule": False,
                        "entropy_feedback": False}})
    prompts = _prompts(tiny_lm)
    with Executor(cfg, stack, logging.getLogger("test")) as ex:
        result = calibration.calibrate(ex, tiny_spec, prompts)
        _, evaluate = calibration.split(prompts, cfg.calibration.fit_fraction)
        refs = {row["decoding"]: ex.score(tiny_spec, evaluate, [_decoding(row)]) for row in result.sweep}
    return cfg, result, refs


def test_every_setting_reports_logloss_at_other_epsilons(calibrated):
    cfg, result, refs = calibrated
    json.dumps(result.as_dict())
    assert result.epsilon == cfg.epsilon
    moved = 0
    for row in result.sweep:
        ref = refs[row["decoding"]]
        for col, eps in (("logloss_eps_x10", 1e-3), ("logloss_eps_div10", 1e-5)):
            want = logloss_at_epsilon(ref, horizon=cfg.horizon, epsilon=cfg.epsilon, new_epsilon=eps)
            assert row[col] == pytest.approx(want)
        assert {"truncated_share", "logloss_untruncated"} <= set(row)
        if row["method"] == "temperature":  # nothing truncated: ε does not enter
            assert row["logloss_eps_x10"] == pytest.approx(row["logloss"], abs=1e-4)
        elif row["truncated_share"] > 0:
            moved += 1  # each truncated token costs ≈ −log ε: ×10 on ε is ≈ −2.3 nats on it
            assert row["logloss_eps_x10"] < row["logloss"] < row["logloss_eps_div10"]
    assert moved >= 2
    base = result.sweep[0]  # τ = 1 itself: every other point is paired against it
    assert (base["method"], base["param"], base["delta_entce"], base["delta_entce_ci"]) == ("temperature", 1.0, 0.0,
                                                                                            [0.0, 0.0])
    for row in result.sweep[1:]:
        lo, hi = row["delta_entce_ci"]
        assert lo <= row["delta_entce"] <= hi and row["detectable"] == (lo > 0 or hi < 0)
        assert row["delta_entce"] == pytest.approx(row["entce"] - base["entce"])
    for t in result.truncation:
        assert set(EPS_COLUMNS) <= set(t)
        # the interpolation weight is truncation_front's: re-interpolating L̄ gives its zero_logloss
        assert calibration._eps_lerp(result.sweep, t["method"], t["param"], "logloss") == pytest.approx(t["logloss"])


def test_markdown_and_metrics_say_the_split_and_the_epsilon_columns(calibrated):
    cfg, result, _ = calibrated
    md = sections.calibration_markdown(result)
    ev = f"evaluation split, {result.eval_examples} prompts"
    assert result.eval_examples == 3 and result.fit_examples == 3
    assert f"root search on the {ev}" in md and f"EntCE-zeroing settings ({ev})" in md
    assert f"Sweeps ({ev};" in md and f"Pareto front of EntCE against L̄, {ev}" in md
    assert "paired bootstrap CI" in md and "no detectable effect" in md  # every Δ says how it is read
    assert "fit on 3 prompts" not in md  # the old claim: τ* was never fitted on the fit split
    assert "L̄ at ε×10 = 1e-03 | L̄ at ε/10 = 1e-05 |" in md
    sweep_lines = [line for line in md.splitlines() if line.startswith("| top_k | ")]
    assert len(sweep_lines) >= 3 and all(line.count("|") == 13 for line in sweep_lines)
    assert "![Pareto front of EntCE against L̄, evaluation split, 3 prompts](pareto__tiny__d.png)" in md
    assert result.label == "tiny__d"


def test_metrics_name_the_zeroing_epsilon_columns():
    result = CalibrationResult(
        label="m__d", tau_star=0.9, tau_star_ci=(0.8, None), tau_converged=True, logloss_at_tau_star=3.0,
        logloss_at_tau_1=3.1, truncation=[{"method": "top_k", "param": 12.5, "entce": 0.0, "logloss": 3.4,
                                          "logloss_untruncated": 3.2, "truncated_share": 0.02,
                                          "logloss_eps_x10": 3.2, "logloss_eps_div10": 3.6}],
        sweep=[], pareto_front=[], fit_examples=5, eval_examples=7, epsilon=1e-4)
    assert result.pareto_figure == "pareto__m__d.png"
    m = describe.calibration_metrics(result)
    assert m["top_k_zeroing_logloss_eps_x10"] == 3.2 and m["top_k_zeroing_logloss_eps_div10"] == 3.6
    assert m["top_k_zeroing_truncated_share"] == 0.02 and m["top_k_zeroing_logloss_untruncated"] == 3.2
    assert "tau_star_ci_high" not in m
    md = sections.calibration_markdown(result)
    assert "τ* = 0.900" in md and "root search on the evaluation split, 7 prompts" in md
    assert "| top_k | 12.500 | 3.400 | 0.020 | 3.200 | 3.200 | 3.600 |" in md


def test_eps_lerp_matches_truncation_front_interpolation():
    rows = [{"method": "top_p", "param": p, "entce": e, "logloss": l, "logloss_untruncated": 3.0,
             "truncated_share": s, "logloss_eps_x10": l - 2 * s} for p, e, l, s in
            [(0.5, -0.4, 3.9, 0.2), (0.8, -0.1, 3.5, 0.1), (0.95, 0.3, 3.2, 0.02), (1.0, 0.5, 3.1, 0.0)]]
    z = fronts.truncation_front(rows)["methods"]["top_p"]
    w = 0.1 / 0.4
    assert z["zero_param"] == pytest.approx(0.8 + w * 0.15)
    got = calibration._eps_lerp(rows, "top_p", z["zero_param"], "logloss_eps_x10")
    assert got == pytest.approx((3.5 - 0.2) + w * ((3.2 - 0.04) - (3.5 - 0.2)))
    assert calibration._eps_lerp(rows, "top_p", z["zero_param"], "logloss") == pytest.approx(z["zero_logloss"])
    assert calibration._eps_lerp(rows, "top_p", 0.6, "logloss") is None  # no sign change there
    assert math.isclose(calibration._eps_lerp(rows, "top_p", 0.8, "logloss"), 3.5)


def _recalibration(eos_at_zero: float, detectable: bool):
    from entcal.tasks.contracts import Recalibration, Reweighting

    comparison = {"entce_before": 0.9, "entce_after": 0.75, "logloss_before": 2.528, "logloss_after": 2.527,
                  "delta_entce": -0.15, "delta_entce_ci": [-0.3, -0.02]
                  if detectable else [-0.3, 0.05], "detectable": detectable, "delta_logloss": -0.001,
                  "delta_logloss_ci": [-0.002, 0.0], "calib_error_per_step_before": 1.2,
                  "calib_error_per_step_after": 1.1, "entce_slope_before": 0.3, "entce_slope_after": 0.2,
                  "eos_share_before": 0.0, "eos_share_after": 0.06}
    zero = {"knob": 0.045, "entce": 0.01, "logloss": 2.61, "delta_logloss": 0.08, "delta_logloss_ci": [0.05, 0.11],
            "eos_share": eos_at_zero, "converged": True}
    fitted = Reweighting("future_entropy", {}, 0.0084, {"heldout_r2": 0.83, "gradient_at_zero": -0.27,
                                                        "entce_fit_split": 0.65})
    return Recalibration("future_entropy", fitted, comparison, zero)


@pytest.mark.parametrize("eos_at_zero, detectable", [(1.0, True), (0.02, False)])
def test_recalibration_row_reads_its_ci_and_warns_when_eos_zeroes_entce(eos_at_zero, detectable):
    """A ΔEntCE whose paired CI holds 0 reads "no detectable effect"; a knob for EntCE = 0 that ends many more
    generations by EOS than τ = 1 says so beside its cost (EntCE reached 0 by stopping early)."""
    rec = _recalibration(eos_at_zero, detectable)
    result = CalibrationResult(label="m__d", tau_star=0.9, tau_star_ci=(0.8, 1.0), tau_converged=True,
                               logloss_at_tau_star=3.0, logloss_at_tau_1=3.1, truncation=[], sweep=[], pareto_front=[],
                               fit_examples=8, eval_examples=8, epsilon=1e-4,
                               recalibrations={"future_entropy": rec})
    (row,) = [line for line in sections.calibration_markdown(result).splitlines()
              if line.startswith("| future_entropy |")]
    assert ("no detectable effect" in row) != detectable
    assert ("100% end by EOS (τ = 1: 0%)" in row) == (eos_at_zero == 1.0)
    doc = result.as_dict()["future_entropy"]
    assert doc["eos_share_at_zero_entce"] == eos_at_zero and doc["alpha"] == 0.0084
    m = describe.calibration_metrics(result)
    assert m["future_entropy_eos_share_after"] == 0.06 and m["future_entropy_delta_entce_ci_high"] == (
        -0.02 if detectable else 0.05)


def test_cli_prints_each_method_with_its_paired_cis(capsys):
    """What `entcal demo --calibrate` prints: every Δ with its paired CI, "no detectable effect" when it holds 0,
    and the cost at EntCE = 0 with its CI."""
    from entcal.flows.cli import print_calibration

    result = CalibrationResult(label="m__d", tau_star=0.9, tau_star_ci=(0.8, 1.0), tau_converged=True,
                               logloss_at_tau_star=3.0, logloss_at_tau_1=3.1, truncation=[], sweep=[], pareto_front=[],
                               fit_examples=8, eval_examples=8, epsilon=1e-4,
                               recalibrations={"future_entropy": _recalibration(0.02, detectable=False)})
    print_calibration(result.label, json.loads(json.dumps(result.as_dict())))
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("future_entropy")]
    assert "EntCE +0.900 -> +0.750 Δ -0.150 [-0.300, +0.050] (no detectable effect)" in line
    assert "L̄ 2.61" not in line and "Δ -0.001 [-0.002, +0.000] (no detectable effect)" in line
    assert "EntCE = 0 at alpha 0.045: L̄ Δ +0.080 [+0.050, +0.110]" in line


def test_fit_diagnostics_never_pass_for_the_evaluation_splits_numbers():
    from entcal.tasks.contracts import Recalibration

    rec = _recalibration(0.02, detectable=True)
    shadow = Recalibration(rec.method, dataclasses.replace(rec.fitted, fit={"entce_before": -0.2}), rec.comparison,
                           rec.zero)
    with pytest.raises(ValueError, match=r"fit diagnostics \['entce_before'\] shadow"):
        shadow.as_dict()
