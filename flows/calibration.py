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

import numpy as np
import polars as pl

from entcal.flows.executor import Executor
from entcal.tasks import fronts, metrics
from entcal.tasks.config import DecodingSpec, ModelSpec
from entcal.tasks.contracts import EPS_COLUMNS, CalibrationResult
from entcal.tasks.recalibrate import BASE, BeforeTables

SWEEPS = ("top_k", "top_p", "min_p", "top_nsigma")
OFF = {"top_p": 1.0, "min_p": 0.0}  # settings that truncate nothing, so the τ = 1 point belongs to the sweep


def split(prompts: pl.DataFrame, fit_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(fit split, evaluation split): the first ``fit_fraction`` of the prompts, and the rest (≥ 1 each)."""
    n_fit = max(1, min(prompts.height - 1, round(prompts.height * fit_fraction)))
    return prompts.head(n_fit), prompts.tail(prompts.height - n_fit)


def calibrate(ex: Executor, model: ModelSpec, prompts: pl.DataFrame) -> CalibrationResult:
    """τ*, the truncation sweeps and fronts, and the configured recalibrations of one (model, dataset), every
    generation and score through ``ex``'s cached stages."""
    config, logger = ex.config, ex.logger
    spec = config.calibration
    label = f"{model.label}__{prompts['dataset'][0]}"
    train, evaluate = split(prompts, spec.fit_fraction)
    rows: list[dict] = []
    tables: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}  # decoding key -> (generations, reference)

    def evaluate_decoding(dec: DecodingSpec, method: str, param: float) -> dict:
        gens = ex.generate(model, evaluate, [dec])[dec.key]
        ref = ex.score(model, evaluate, [dec])
        tables[dec.key] = gens, ref
        s = metrics.entce_summary(gens, ref, ex.knobs.summary)
        row = {"method": method, "param": float(param), "decoding": dec.key, **{k: getattr(s, k) for k in (
            "entce", "entce_ci_low", "entce_ci_high", "logloss", "logloss_untruncated", "truncated_share", "entropy")}}
        for col, eps in zip(EPS_COLUMNS, (config.epsilon * 10, config.epsilon / 10)):
            row[col] = (metrics.logloss_at_epsilon(ref, horizon=config.horizon, epsilon=config.epsilon,
                                                   new_epsilon=eps) if eps < 1 else None)
        rows.append(row)
        logger.info("calibration %s=%g: EntCE %+.3f, L̄ %.3f", method, param, s.entce, s.logloss)
        return row

    def entce_at(tau: float) -> tuple[float, float, float]:
        r = evaluate_decoding(DecodingSpec(temperature=round(tau, 4)), "temperature", round(tau, 4))
        return r["entce"], r["entce_ci_low"], r["entce_ci_high"]

    try:
        tau = fronts.tau_star(entce_at, *spec.tau_bracket, tol=spec.tau_tol, max_rounds=spec.tau_rounds)
    except ValueError as err:  # no sign change in the bracket: say so, keep the rest
        logger.warning("τ*: %s", err)
        tau = {"tau_star": None, "tau_star_ci": [None, None], "converged": False}
    if BASE.key not in tables:
        entce_at(1.0)
    for method in SWEEPS:
        for param in getattr(spec, method):
            evaluate_decoding(DecodingSpec(**{method: param}), method, param)
    base = next(r for r in rows if r["decoding"] == BASE.key)
    for method, off in OFF.items():  # top_p = 1 and min_p = 0 ARE the τ = 1 decoding: the sweep's anchor
        if getattr(spec, method):
            rows.append({**base, "method": method, "param": off, "anchor": True})
    front = fronts.truncation_front(rows)
    recalibrations = {}
    if spec.lookahead or spec.future_entropy:
        before = BeforeTables(train_generations=ex.generate(model, train, [BASE])[BASE.key] if spec.future_entropy
                              else None, eval_generations=tables[BASE.key][0], eval_reference=tables[BASE.key][1])
        for method in ("lookahead", "future_entropy"):
            if getattr(spec, method):
                out = recalibrations[method] = ex.recalibrate(method, model, train, evaluate, before)
                logger.info("%s: α=%s EntCE %+.3f -> %+.3f, L̄ %.3f -> %.3f", method, out.alpha, out.entce_before,
                            out.entce_after, out.logloss_before, out.logloss_after)
    return CalibrationResult(
        label=label, tau_star=tau["tau_star"], tau_star_ci=tuple(tau["tau_star_ci"]),
        tau_converged=tau.get("converged"), logloss_at_tau_star=_at(rows, tau["tau_star"], "logloss"),
        logloss_at_tau_1=_at(rows, 1.0, "logloss"),
        truncation=[{"method": m, "param": v["zero_param"], "entce": 0.0, "logloss": v["zero_logloss"],
                     "logloss_untruncated": v.get("zero_logloss_untruncated"),
                     "truncated_share": v.get("zero_truncated_share"),
                     **{c: _eps_lerp(rows, m, v["zero_param"], c) for c in EPS_COLUMNS}}
                    for m, v in front["methods"].items() if v["zero_param"] is not None],
        sweep=rows, pareto_front=front["front"], fit_examples=train.height,
        eval_examples=evaluate.height, epsilon=config.epsilon, **recalibrations)


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
