"""The calibration subflow of one (model, dataset): τ* by root search over cached generation rounds,
truncation sweeps and their Pareto front, lookahead and future-entropy calibration (docs/SCIENCE.md §4).

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

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
from prefect import flow, get_run_logger

from entcal.flows.executor import Executor
from entcal.flows.orphans import label_flow_run
from entcal.tasks import figures, fronts, metrics
from entcal.tasks.config import DecodingSpec, ModelSpec, StudyConfig
from entcal.tasks.contracts import CalibrationResult
from entcal.tasks.recalibrate import BeforeTables

SWEEPS = ("top_k", "top_p", "min_p", "top_nsigma")
OFF = {"top_p": 1.0, "min_p": 0.0}  # settings that truncate nothing, so the τ = 1 point belongs to the sweep
EPS_COLUMNS = ("logloss_eps_x10", "logloss_eps_div10")  # L̄ re-mixed at ε×10 and ε/10
SETTING_COLUMNS = ("logloss", "truncated_share", "logloss_untruncated", *EPS_COLUMNS)
BASE = DecodingSpec()  # τ = 1, untruncated: the "before" of every calibration


def split(prompts: pl.DataFrame, fit_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(fit split, evaluation split): the first ``fit_fraction`` of the prompts, and the rest (≥ 1 each)."""
    n_fit = max(1, min(prompts.height - 1, round(prompts.height * fit_fraction)))
    return prompts.head(n_fit), prompts.tail(prompts.height - n_fit)


@flow(name="entcal-calibration", flow_run_name="calibration-{label}", validate_parameters=False)
def calibrate(config: StudyConfig, model: ModelSpec, prompts: pl.DataFrame, ex: Executor, out_dir: str,
              label: str) -> CalibrationResult:
    """τ*, the truncation sweeps and fronts, and the configured recalibrations of one (model, dataset)."""
    logger = get_run_logger()
    try:
        label_flow_run()  # a study killed mid-calibration leaves this run to be set Crashed
    except Exception as err:  # bookkeeping never fails a study
        logger.warning("could not label the calibration flow run: %s", err)
    spec = config.calibration
    summary_knobs = dataclasses.asdict(ex.knobs.summary)
    train, evaluate = split(prompts, spec.fit_fraction)
    rows: list[dict] = []
    tables: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}  # decoding key -> (generations, reference)

    def evaluate_decoding(dec: DecodingSpec, method: str, param: float) -> dict:
        gens = ex.generate(model, evaluate, [dec])[dec.key]
        ref = ex.score(model, evaluate, [dec])
        tables[dec.key] = gens, ref
        s = metrics.entce_summary(gens, ref, **summary_knobs)
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
    pareto = figures.plot_pareto(rows, Path(out_dir) / f"pareto__{label}.png",
                                 title=f"{label}: EntCE vs L̄, evaluation split, {evaluate.height} prompts")
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
        sweep=rows, pareto_front=front["front"], pareto_figure=str(pareto), fit_examples=train.height,
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


# ------------------------------------------------------------------ what the result shows
def calibration_metrics(result: CalibrationResult) -> dict[str, float]:
    """Stable MLflow metric names for comparison views."""
    m = {"tau_star": result.tau_star, "logloss_at_tau_star": result.logloss_at_tau_star,
         "logloss_at_tau_1": result.logloss_at_tau_1}
    m["tau_star_ci_low"], m["tau_star_ci_high"] = result.tau_star_ci
    for t in result.truncation:
        m[f"{t['method']}_zeroing_param"] = t["param"]
        for col in SETTING_COLUMNS:
            m[f"{t['method']}_zeroing_{col}"] = t.get(col)
    for name in ("lookahead", "future_entropy"):
        r = getattr(result, name)
        if r is not None:
            m.update({f"{name}_{k}": getattr(r, k) for k in ("entce_before", "entce_after", "logloss_before",
                                                               "logloss_after")})
            if not isinstance(r.alpha, list):
                m[f"{name}_alpha"] = r.alpha
    return {k: v for k, v in m.items() if v is not None}


def calibration_markdown(result: CalibrationResult) -> str:
    def f(v):
        return "—" if v is None else f"{v:.3f}"

    def alpha(v):
        return " / ".join(f(a) for a in v) if isinstance(v, list) else f(v)

    eps, n_eval, n_fit, label = result.epsilon, result.eval_examples, result.fit_examples, result.label
    ev = f"evaluation split, {n_eval} prompts"
    e10, e01 = f"ε×10 = {eps * 10:.0e}", f"ε/10 = {eps / 10:.0e}"
    cols = (f"| truncated share | L̄ untruncated | L̄ at {e10} | L̄ at {e01} |", "|---|---|---|---|")

    def tail(r: dict) -> str:
        return " | ".join(f(r.get(c)) for c in ("truncated_share", "logloss_untruncated", *EPS_COLUMNS)) + " |"

    lo, hi = result.tau_star_ci
    lines = [f"## Calibration: {label}", "",
             f"τ* = {f(result.tau_star)} (CI [{f(lo)}, {f(hi)}]); L̄ at τ* = {f(result.logloss_at_tau_star)} "
             f"vs L̄ at τ = 1: {f(result.logloss_at_tau_1)} — root search on the {ev}.", "",
             f"L̄ of truncated decodings mixes in the untruncated p with weight ε = {eps}: "
             f"a truncated human token costs about −log ε, so the columns at {e10} and {e01} show how far each "
             "number moves with that arbitrary constant.", "",
             f"EntCE-zeroing settings ({ev}):", "",
             "| method | EntCE-zeroing param | L̄ there " + cols[0], "|---|---|---" + cols[1]]
    lines += [f"| {t['method']} | {f(t['param'])} | {f(t['logloss'])} | {tail(t)}" for t in result.truncation]
    lines += ["", f"Sweeps ({ev}):", "", "| method | param | EntCE | L̄ " + cols[0], "|---|---|---|---" + cols[1]]
    lines += [f"| {r['method']} | {r['param']:g} | {f(r['entce'])} | {f(r['logloss'])} | {tail(r)}"
              for r in result.sweep if not r.get("anchor")]
    lines += ["", f"Recalibration: α fitted on the fit split, {n_fit} prompts; before/after on the {ev}.", "",
              "| calibration | α | EntCE before | EntCE after | L̄ before | L̄ after |", "|---|---|---|---|---|---|"]
    for name in ("lookahead", "future_entropy"):
        r = getattr(result, name)
        if r is not None:
            lines.append(f"| {name} | {alpha(r.alpha)} | {f(r.entce_before)} | {f(r.entce_after)} | "
                         f"{f(r.logloss_before)} | {f(r.logloss_after)} |")
    lines += ["", f"![Pareto front of EntCE against L̄, {ev}]({Path(result.pareto_figure).name})", "",
              f"Pareto front: every sweep point on the {ev}; circled: not dominated in (|EntCE|, L̄).", ""]
    return "\n".join(lines)
