"""The calibration of one (model, dataset), called by the study flow with its executor: τ* by root
search over cached generation rounds, truncation sweeps and their Pareto front, lookahead and
future-entropy calibration (docs/SCIENCE.md §4). Numbers only: flows/publish.py and tasks/report.py
show them.

Every generation round and every score is the study's own cached stage (through the executor), so
τ* rounds and sweep points are reused by later runs and by studies at the same settings, and the
"before" tables of lookahead and future entropy are the τ = 1 tables those stages already made.

Splits: the prompts are cut into a fit split (the first ``fit_fraction``) and an evaluation split.
τ*, the truncation sweeps, the EntCE-zeroing settings and the Pareto front are all computed on the
evaluation split (τ* is a root search *on* it: nothing is fitted elsewhere); the lookahead and
future-entropy α are fitted on the fit split and their before/after numbers measured on the
evaluation split. Every table and figure says which.

ε: a truncated decoding is scored as (1−ε)q + εp, so each truncated human token costs about −log ε;
beside each setting we report the truncated share, L̄ untruncated (−log p) and L̄ re-mixed at ε×10
and ε/10 (metrics.logloss_at_epsilon), so a reader sees how far a conclusion moves with ε.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl

from entcal.flows.executor import Executor
from entcal.tasks import fronts, metrics
from entcal.tasks.config import DecodingSpec, ModelSpec
from entcal.tasks.contracts import EPS_COLUMNS, CalibrationResult, Recalibration, Reweighting
from entcal.tasks.recalibrate import BASE, BeforeTables

# settings that truncate nothing, so the τ = 1 point belongs to the sweep (top-k and top-nσ are off at ∞)
OFF = {"top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "eta_cutoff": 0.0, "epsilon_cutoff": 0.0}
# each recalibration's bracket for the knob where EntCE = 0 on the evaluation split, and the knob's floor
ZERO_BRACKETS = {"lookahead": ((0.0, 1.0), -1.0), "future_entropy": ((0.0, 0.5), -0.5),
                 "tau_schedule": ((0.7, 1.3), 0.0), "entropy_feedback": ((-1.0, 1.0), None)}
# future entropy's α is in units of 1/f̂ (q̃ ∝ p̂^{1+α}·e^{−α·f̂}, and φ(EOS) = 0 lifts EOS by e^{α·f̂}): its
# search stops where α times the largest f̂, the baseline's total entropy of a whole generation, reaches this
# (e^10: EOS ×22,000 at the first step). A fixed 0.5 ended every generation at its first step (α·f̂ ≈ 160 at T = 96)
FUTURE_ALPHA_SCALE = 10.0
# the knob at which a method's rule is τ = 1 itself (q̃ = p̂): its tables ARE the τ = 1 tables, token for token
# (tests/tasks/test_recalibrate.py), so they are read, not generated again
IDENTITY = {"lookahead": 0.0, "future_entropy": 0.0}
Tables = tuple[pl.DataFrame, pl.DataFrame]  # (generations, reference) of one decoding on one split


def split(prompts: pl.DataFrame, fit_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(fit split, evaluation split): the first ``fit_fraction`` of the prompts, and the rest (≥ 1 each)."""
    n_fit = max(1, min(prompts.height - 1, round(prompts.height * fit_fraction)))
    return prompts.head(n_fit), prompts.tail(prompts.height - n_fit)


class Sweep:
    """The points a calibration evaluates on the evaluation split, each paired against τ = 1 (``base``)."""

    def __init__(self, ex: Executor, base: Tables):
        self.ex, self.base, self.rows = ex, base, []

    def record(self, method: str, param: float, tables: Tables, **tags) -> dict:
        """One point: EntCE, L̄, H̄ and their diagnostics, L̄ re-mixed at ε×10 and ε/10, and after − before
        against τ = 1 with its paired CI (metrics.paired_delta)."""
        ex, cfg = self.ex, self.ex.config
        s = metrics.entce_summary(*tables, ex.knobs.summary)
        d = metrics.paired_delta(self.base, tables, ex.knobs.summary)
        row = {"method": method, "param": float(param), "decoding": tables[0]["decoding"][0], **tags,
               **{k: getattr(s, k) for k in ("entce", "entce_ci_low", "entce_ci_high", "logloss",
                                             "logloss_untruncated", "truncated_share", "entropy",
                                             "calib_error_per_step", "entce_slope", "eos_share")},
               **{k: d[k] for k in ("delta_entce", "delta_entce_ci", "delta_logloss", "delta_logloss_ci",
                                    "detectable")}}
        for col, eps in zip(EPS_COLUMNS, (cfg.epsilon * 10, cfg.epsilon / 10)):
            row[col] = (metrics.logloss_at_epsilon(tables[1], horizon=cfg.horizon, epsilon=cfg.epsilon,
                                                   new_epsilon=eps) if eps < 1 else None)
        self.rows.append(row)
        ex.logger.info("calibration %s=%g: EntCE %+.3f, L̄ %.3f (ΔEntCE %+.3f [%+.3f, %+.3f] against τ = 1)", method,
                       param, s.entce, s.logloss, d["delta_entce"], *d["delta_entce_ci"])
        return row


def calibrate(ex: Executor, model: ModelSpec, prompts: pl.DataFrame) -> CalibrationResult:
    """τ*, the truncation sweeps and fronts, and the configured recalibrations of one (model, dataset), every
    generation and score through ``ex``'s cached stages; every point paired against τ = 1."""
    config, spec = ex.config, ex.config.calibration
    train, evaluate = split(prompts, spec.fit_fraction)

    def decoding(dec: DecodingSpec) -> Tables:
        return ex.generate(model, evaluate, [dec])[dec.key], ex.score(model, evaluate, [dec])
    sweep = Sweep(ex, decoding(BASE))
    sweep.record("temperature", 1.0, sweep.base)

    def entce_at(tau: float) -> tuple[float, float, float]:
        dec = DecodingSpec(temperature=round(tau, 4))
        r = sweep.record("temperature", dec.temperature, decoding(dec))
        return r["entce"], r["entce_ci_low"], r["entce_ci_high"]

    try:
        tau = fronts.tau_star(entce_at, *spec.tau_bracket, tol=spec.tau_tol, max_rounds=spec.tau_rounds)
    except ValueError as err:  # no sign change in the bracket: say so, keep the rest
        ex.logger.warning("τ*: %s", err)
        tau = {"tau_star": None, "tau_star_ci": [None, None], "converged": False}
    for method in spec.sweeps:
        for param in getattr(spec, method):
            sweep.record(method, param, decoding(DecodingSpec(**{method: param})))
    methods = spec.methods
    recalibrations = {}
    if methods:
        before = BeforeTables(
            train_generations=ex.generate(model, train, [BASE], samples=spec.regressor_samples)[BASE.key]
            if "future_entropy" in methods else None, train_reference=ex.score(model, train, [BASE]))
        for method in methods:
            recalibrations[method] = recalibrate(ex, sweep, model, train, evaluate, before, method)
    rows = sweep.rows
    for method, off in OFF.items():  # top_p = 1 and min_p = 0 ARE the τ = 1 decoding: the sweep's anchor
        if getattr(spec, method):
            rows.append({**rows[0], "method": method, "param": off, "anchor": True})
    front = fronts.truncation_front(rows)
    return CalibrationResult(
        label=f"{model.label}__{prompts['dataset'][0]}", tau_star=tau["tau_star"],
        tau_star_ci=tuple(tau["tau_star_ci"]), tau_converged=tau.get("converged"),
        logloss_at_tau_star=_at(rows, tau["tau_star"], "logloss"), logloss_at_tau_1=_at(rows, 1.0, "logloss"),
        truncation=[{"method": m, "param": v["zero_param"], "entce": 0.0, "logloss": v["zero_logloss"],
                     "logloss_untruncated": v.get("zero_logloss_untruncated"),
                     "truncated_share": v.get("zero_truncated_share"),
                     **{c: _eps_lerp(rows, m, v["zero_param"], c) for c in EPS_COLUMNS}}
                    for m, v in front["methods"].items() if m in spec.SWEEPS and v["zero_param"] is not None],
        sweep=rows, pareto_front=front["front"], fit_examples=train.height,
        eval_examples=evaluate.height, epsilon=config.epsilon, recalibrations=recalibrations)


def recalibrate(ex: Executor, sweep: Sweep, model: ModelSpec, train: pl.DataFrame, evaluate: pl.DataFrame,
                before: BeforeTables, method: str) -> Recalibration:
    """One method: fitted on the fit split, compared with τ = 1 on the evaluation split (paired), then the
    knob where EntCE = 0 found by the τ* root search and what it costs; every point it evaluates goes on
    the sweep (the Pareto front)."""
    fitted = ex.fit(method, model, train, before)
    after = tables(ex, sweep, model, evaluate, fitted)
    zero, note = zero_entce(ex, sweep, model, evaluate, fitted, after)
    comparison = metrics.comparison(sweep.base, after, ex.knobs.summary)
    ex.logger.info("%s: %s %g, EntCE %+.3f -> %+.3f (Δ %+.3f [%+.3f, %+.3f]%s), L̄ %.3f -> %.3f", method,
                   fitted.knob_name, fitted.knob, comparison["entce_before"], comparison["entce_after"],
                   comparison["delta_entce"], *comparison["delta_entce_ci"],
                   "" if comparison["detectable"] else ": no detectable effect", comparison["logloss_before"],
                   comparison["logloss_after"])
    return Recalibration(method, fitted, comparison, zero, note)


def zero_entce(ex: Executor, sweep: Sweep, model: ModelSpec, evaluate: pl.DataFrame, fitted: Reweighting,
               after: Tables) -> tuple[dict | None, str | None]:
    """``after`` (``fitted`` on the evaluation split) as a sweep point, then the knob of ``fitted``'s rule where
    EntCE = 0 on the evaluation split (fronts.tau_star over the method's
    ZERO_BRACKETS, ``zero_rounds`` rounds) and, evaluated there, its L̄ and ΔL̄ against τ = 1 (paired CI); or
    (None, why) when no knob in the bracket, widened once, zeroes EntCE. ``eos_share``: the share of its
    generations ended by EOS there (a knob that lifts EOS can zero EntCE by stopping early)."""
    sweep.record(fitted.method, fitted.knob, after, fitted=True)
    (lo, hi), floor = ZERO_BRACKETS[fitted.method]
    if fitted.method == "future_entropy" and max(fitted.params.get("baseline", ()), default=0.0) > 0:
        hi = min(hi, FUTURE_ALPHA_SCALE / max(fitted.params["baseline"]))
    digits = max(4, 3 - math.floor(math.log10(hi - lo)))  # knobs rounded (cache keys) to ≤ 1e-3 of the bracket

    def entce_at(knob: float) -> tuple[float, float, float]:
        knob = round(knob, digits)
        r = sweep.record(fitted.method, knob, tables(ex, sweep, model, evaluate, fitted.at(knob)))
        return r["entce"], r["entce_ci_low"], r["entce_ci_high"]
    try:
        found = fronts.tau_star(entce_at, lo, hi, tol=(hi - lo) / 50, max_rounds=ex.config.calibration.zero_rounds,
                                floor=floor)
    except ValueError as err:
        ex.logger.warning("%s: no %s zeroes EntCE: %s", fitted.method, fitted.knob_name, err)
        return None, str(err).replace("tau_star: ", "")
    entce_at(found["tau_star"])  # the knob found, evaluated (its stages are cached when it was a round's)
    r = sweep.rows[-1]
    return {"knob": r["param"], "entce": r["entce"], "logloss": r["logloss"], "delta_logloss": r["delta_logloss"],
            "delta_logloss_ci": r["delta_logloss_ci"], "eos_share": r["eos_share"], "converged": found["converged"]}, None


def tables(ex: Executor, sweep: Sweep, model: ModelSpec, evaluate: pl.DataFrame, rw: Reweighting) -> Tables:
    """``rw``'s tables on the evaluation split: τ = 1's own where ``rw`` is the identity (IDENTITY)."""
    return sweep.base if rw.knob == IDENTITY.get(rw.method) else ex.calibrated(model, evaluate, rw)


def _eps_lerp(rows: list[dict], method: str, param: float, col: str) -> float | None:
    """``col`` linearly interpolated in param at ``param`` between the method's two sweep points that
    straddle it with EntCE of opposite sign (or at the point itself): the same weight as
    fronts.truncation_front uses for the zeroing setting's L̄."""
    pts = sorted((r for r in rows if r["method"] == method and r.get(col) is not None), key=lambda r: r["param"])
    for a, b in zip(pts, pts[1:] + pts[-1:]):
        if a["param"] == param:
            return a[col]
        if a["param"] < param < b["param"] and a["entce"] * b["entce"] <= 0:
            w = (param - a["param"]) / (b["param"] - a["param"])
            return a[col] + w * (b[col] - a[col])
    return None


def _at(rows: list[dict], tau: float | None, col: str) -> float | None:
    pts = sorted((r["param"], r[col]) for r in rows if r["method"] == "temperature")
    if tau is None or not pts:
        return None
    return float(np.interp(tau, [p for p, _ in pts], [v for _, v in pts]))
