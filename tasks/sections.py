"""The report's sections beyond the summary table: a calibration's (τ*, the sweeps and their Pareto front,
each recalibration compared with τ = 1, paired), a scaling fit's, the corpora's α. Markdown; the numbers
come from the records (tasks/contracts.py), rounded here for reading only."""
from __future__ import annotations

from entcal.tasks.contracts import EPS_COLUMNS, CalibrationResult, StudyResult
from entcal.tasks.scaling import FamilyFit


def _f(v, sign: bool = False) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:+.3f}" if sign else f"{v:.3f}"


def _ci(v) -> str:
    return "—" if not v or None in v else f"[{v[0]:+.3f}, {v[1]:+.3f}]"


def corpus_alpha_section(alphas: dict[str, dict | None]) -> str:
    """The power-law α of each corpus (docs/SCIENCE.md §3). ``alphas``: dataset label -> the corpus-alpha
    stage's dict (alpha, top, unit, words, documents, count_at_top, warning) or None (too few words)."""
    lines = ["## Corpora", "",
             "α: minus the OLS slope of log count on log rank over the corpus's most frequent words; the "
             "theory's exponent of EntCE in training tokens is 1/α − 1 (docs/SCIENCE.md §3).", "",
             "| dataset | α | 1/α − 1 | ranks fitted | words counted | documents | count at last rank | warning |",
             "|---|---|---|---|---|---|---|---|"]
    units = set()
    for d, a in alphas.items():
        if not a:
            lines.append(f"| {d} | — (too few distinct words) | — | — | — | — | — | — |")
            continue
        units.add(a["unit"])
        lines.append(f"| {d} | {a['alpha']:.3f} | {1 / a['alpha'] - 1:+.3f} | {a['top']} | {a['words']} | "
                     f"{a.get('documents', '—')} | {a['count_at_top']} | {a['warning'] or '—'} |")
    lines += [""] + [f"Unit: {u}." for u in sorted(units)]
    return "\n".join(lines + [""])


def scaling_section(f: FamilyFit) -> str:
    """The report's section of one family's scaling fit on one dataset (with its plot, FamilyFit.figure)."""
    head = f"## Scaling: {f.family} on {f.dataset}"
    if f.fit is None:
        return f"{head}\n\nNo fit: {f.error}\n"
    return f"{head}\n\n{f.fit.describe()}\n\n![scaling]({f.figure})\n"


KNOB_NAMES = {"alpha": "α", "scale": "τ(s) scale", "offset": "target offset (nats)"}


def _stops_early(zero: dict, comparison: dict) -> str:
    """A warning when the zero-EntCE knob ends more generations by EOS than τ = 1 does (EntCE can then reach
    0 by stopping early, not by calibrating)."""
    share, base = zero.get("eos_share"), comparison.get("eos_share_before")
    if share is None or base is None or share <= base + 0.05:
        return ""
    return f"; {share:.0%} end by EOS (τ = 1: {base:.0%})"


def calibration_markdown(result: CalibrationResult) -> str:
    """The calibration of one (model, dataset): τ*, the truncations' EntCE-zeroing settings, every sweep point
    against τ = 1 (paired), each recalibration before/after (paired) with the knob where EntCE = 0 and its
    L̄ cost, and the Pareto front's figure."""
    eps, n_eval, n_fit, label = result.epsilon, result.eval_examples, result.fit_examples, result.label
    ev = f"evaluation split, {n_eval} prompts"
    e10, e01 = f"ε×10 = {eps * 10:.0e}", f"ε/10 = {eps / 10:.0e}"
    cols = (f"| truncated share | L̄ untruncated | L̄ at {e10} | L̄ at {e01} |", "|---|---|---|---|")

    def tail(r: dict) -> str:
        return " | ".join(_f(r.get(c)) for c in ("truncated_share", "logloss_untruncated", *EPS_COLUMNS)) + " |"

    def delta(r: dict, key: str) -> str:
        return f"{_f(r.get(key), True)} {_ci(r.get(key + '_ci'))}"

    lo, hi = result.tau_star_ci
    lines = [f"## Calibration: {label}", "",
             f"τ* = {_f(result.tau_star)} (CI [{_f(lo)}, {_f(hi)}]); L̄ at τ* = {_f(result.logloss_at_tau_star)} "
             f"vs L̄ at τ = 1: {_f(result.logloss_at_tau_1)} — root search on the {ev}.", "",
             f"L̄ of truncated decodings mixes in the untruncated p with weight ε = {eps}: "
             f"a truncated human token costs about −log ε, so the columns at {e10} and {e01} show how far each "
             "number moves with that arbitrary constant.", "",
             "Every Δ is against τ = 1 on the same prompts, with a paired bootstrap CI (the same resampled "
             "examples on both sides; the decodings share their sampling noise); a Δ whose CI contains 0 is "
             "no detectable effect.", "",
             f"EntCE-zeroing settings ({ev}):", "",
             "| method | EntCE-zeroing param | L̄ there " + cols[0], "|---|---|---" + cols[1]]
    lines += [f"| {t['method']} | {_f(t['param'])} | {_f(t['logloss'])} | {tail(t)}" for t in result.truncation]
    lines += ["", f"Sweeps ({ev}; per-step error and slope as in the table above):", "",
              "| method | param | EntCE | L̄ | ΔEntCE vs τ = 1 | ΔL̄ vs τ = 1 | per-step error | slope " + cols[0],
              "|---|---|---|---|---|---|---|---" + cols[1]]
    lines += [f"| {r['method']} | {r['param']:g} | {_f(r['entce'])} | {_f(r['logloss'])} | {delta(r, 'delta_entce')} | "
              f"{delta(r, 'delta_logloss')} | {_f(r.get('calib_error_per_step'))} | {_f(r.get('entce_slope'), True)} | "
              f"{tail(r)}" for r in result.sweep if not r.get("anchor")]
    if result.recalibrations:
        lines += ["", f"Recalibration: fitted on the fit split, {n_fit} prompts; compared with τ = 1 on the {ev}. "
                  "Per-step error: (1/T)·Σ_t |h_t − l_t| of the smoothed curves; slope: of h_t − l_t, nats per "
                  "100 steps.", "",
                  "| calibration | fitted knob | EntCE before → after | ΔEntCE (paired CI) | ΔL̄ (paired CI) | "
                  "per-step error before → after | slope before → after | knob for EntCE = 0 | ΔL̄ there |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in result.recalibrations.items():
            c, z = r.comparison, r.zero or {}
            effect = delta(c, "delta_entce") + ("" if c["detectable"] else " (no detectable effect)")
            zero_knob = "—" if z.get("knob") is None else f"{z['knob']:g}"
            lines.append(
                f"| {name} | {KNOB_NAMES[r.fitted.knob_name]} = {r.fitted.knob:g} | {_f(c['entce_before'], True)} → "
                f"{_f(c['entce_after'], True)} | {effect} | {delta(c, 'delta_logloss')} | "
                f"{_f(c['calib_error_per_step_before'])} → {_f(c['calib_error_per_step_after'])} | "
                f"{_f(c['entce_slope_before'], True)} → {_f(c['entce_slope_after'], True)} | "
                f"{zero_knob} | "
                f"{delta(z, 'delta_logloss') + _stops_early(z, c) if z else r.zero_note or '—'} |")
        lines += [""] + [f"- {name}: {note}" for name, r in result.recalibrations.items()
                         if (note := recalibration_note(name, r.fitted.fit))]
    lines += ["", f"![Pareto front of EntCE against L̄, {ev}]({result.pareto_figure})", "",
              f"Pareto front: every sweep point on the {ev}; circled: not dominated in (|EntCE|, L̄).", ""]
    return "\n".join(lines)


def recalibration_note(method: str, fit: dict) -> str:
    """What a reader needs to read a method's row: lookahead's reach, future entropy's skill."""
    if method == "lookahead":
        return ("its feature looks one step ahead, so the α that fits human text moves EntCE little by "
                "construction; the EntCE = 0 column says what pushing it further costs")
    if method == "future_entropy" and "heldout_r2" in fit:
        entce = fit.get("entce_fit_split")
        return (f"f̂'s held-out R² {_f(fit['heldout_r2'])}; the fit split's log-loss gradient at α = 0 "
                f"{_f(fit.get('gradient_at_zero'), True)} against −EntCE {_f(None if entce is None else -entce, True)} "
                f"(equal for an exact future entropy){'; ' + fit['verdict'] if fit.get('verdict') else ''}")
    return fit.get("verdict", "")


def inputs_section(identities: dict[str, str]) -> str:
    """What the study read, by identity (tasks.models.identity / tasks.datasets.identity): a hub commit, or a
    fingerprint of the files (a new checkpoint written in place shows here, and re-keys the cached stages)."""
    lines = ["## Inputs", "", "| input | identity |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | `{ident}` |" for name, ident in identities.items()] + [""])


def study_sections(result: StudyResult, inputs: dict[str, str] | None) -> str:
    """The report's sections after its table: each calibration, the corpora's α, the inputs by identity
    (``inputs``), each scaling fit."""
    parts = [calibration_markdown(c) for c in result.calibrations] + [corpus_alpha_section(result.corpus_alpha)]
    parts += [inputs_section(inputs)] if inputs else []
    return "\n".join(parts + [scaling_section(f) for f in result.scaling])
