"""Every figure entcal draws, one idiom: matplotlib's Agg backend, ``fig, ax = plt.subplots(...)``, draw,
save, ``plt.close(fig)``, return the path (error_accumulation_figure returns the closed Figure instead,
for MLflow to save).

- plot_error_accumulation: h_t (solid) and l_t (dashed) against t, smoothed, one colour per decoding,
  one panel per (model, dataset) (the report's error_accumulation.png)
- error_accumulation_figure: one child's h_t and l_t, unsmoothed (its MLflow figure)
- plot_entce_vs_temperature: EntCE with its CI against temperature, one line per (model, dataset)
- plot_pareto: EntCE against L̄ of a truncation sweep, with the (|EntCE|, L̄) front
- plot_scaling: EntCE against parameter count (log-log) with the fitted power law
- plot_theory: the simplified theory's expected EntCE against training tokens, one line per α
- study_figures: every figure of a study's report

matplotlib is imported when a figure is drawn, not when this module is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from entcal.tasks.contracts import StudyResult
from entcal.tasks.scaling import ScalingFit
from entcal.tasks.theory import TheoryCurve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _error_curves(ax, curves: pl.DataFrame, labels: tuple[str, str], *, smoothed: bool = False, color=None) -> None:
    """h_t (solid) and l_t (dashed) of one step_curves frame on ``ax``, in nats/token against the step
    (the row index when there is no step column); its smoothed columns when ``smoothed``."""
    steps = curves["step"].to_list() if "step" in curves.columns else list(range(curves.height))
    kind = "smooth" if smoothed else "mean"
    ax.plot(steps, curves[f"entropy_{kind}"].to_list(), color=color, label=labels[0])
    ax.plot(steps, curves[f"logloss_{kind}"].to_list(), color=color, linestyle="--", label=labels[1])
    ax.set_xlabel("generation step t")
    ax.set_ylabel("nats / token")


def _save(plt, fig, path, **savefig):
    """The one epilogue: lay out, write the PNG, close the figure (no pyplot state is left); ``path``."""
    fig.tight_layout()
    fig.savefig(path, **savefig)
    plt.close(fig)
    return path


def plot_error_accumulation(curves: list[dict], path: Path) -> Path:
    """``curves``: dicts with model, dataset, decoding and a 'curves' frame from step_curves (with smoothing)."""
    plt = _pyplot()
    panels = sorted({(c["model"], c["dataset"]) for c in curves})
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4 * rows), squeeze=False)
    decodings = sorted({c["decoding"] for c in curves})
    colour = {d: plt.cm.tab10(i % 10) for i, d in enumerate(decodings)}
    for ax, (model, dataset) in zip(axes.flat, panels):
        for c in curves:
            if (c["model"], c["dataset"]) == (model, dataset):
                _error_curves(ax, c["curves"], (f"{c['decoding']} entropy h_t", f"{c['decoding']} log loss l_t"),
                              smoothed=True, color=colour[c["decoding"]])
        ax.set_title(f"{model} · {dataset}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Error accumulation: entropy of generations vs log loss on human text")
    return _save(plt, fig, path, dpi=110)


def error_accumulation_figure(curves: pl.DataFrame, title: str):
    """A child's h_t and l_t against t (unsmoothed) as a matplotlib ``Figure``, already closed (no pyplot
    state left behind; it still saves)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    _error_curves(ax, curves, ("entropy of generations h_t", "log loss on human text l_t"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_entce_vs_temperature(summary: pl.DataFrame, path: Path) -> Path:
    """EntCE ± CI against temperature for the untruncated decodings."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pure = summary.filter(~pl.col("truncated"))
    for (model, dataset), grp in pure.group_by("model", "dataset", maintain_order=True):
        g = grp.sort("temperature")
        err = [g["entce"] - g["entce_ci_low"], g["entce_ci_high"] - g["entce"]]
        ax.errorbar(g["temperature"], g["entce"], yerr=err, marker="o", capsize=3, label=f"{model} · {dataset}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("temperature τ")
    ax.set_ylabel("EntCE = H̄ − L̄ (nats / token)")
    ax.set_title("Entropy calibration error against temperature")
    ax.legend(fontsize=8)
    return _save(plt, fig, path, dpi=110)


def plot_pareto(rows: list[dict], front: list[dict], path, *, title: str | None = None) -> str:
    """EntCE against L̄, one marker/colour per method, the (|EntCE|, L̄) ``front`` (fronts.truncation_front's)
    circled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^vP*Xh<>"
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r for r in rows if r["method"] == m and np.isfinite([r["entce"], r["logloss"]]).all()),
                     key=lambda r: r["param"])
        ax.plot([r["logloss"] for r in pts], [r["entce"] for r in pts], marker=markers[i % len(markers)],
                color=f"C{i}", lw=0.8, ms=5, label=m)
    ax.scatter([r["logloss"] for r in front], [r["entce"] for r in front], s=140, facecolors="none",
               edgecolors="k", lw=1.2, label="Pareto front (|EntCE|, L̄)", zorder=3)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("L̄: log loss on human text (nats/token)")
    ax.set_ylabel("EntCE = H̄ − L̄ (nats/token)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return str(_save(plt, fig, path, dpi=120))


def plot_scaling(params: Sequence[float], entce: Sequence[float], fit: ScalingFit, path: str) -> str:
    """Log-log scatter of EntCE (nats/token) against parameter count with the fitted line; PNG."""
    plt = _pyplot()
    x = np.asarray(params, dtype=np.float64)
    y = np.asarray(entce, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.scatter(x, y, color="C0", zorder=3, label="models")
    grid = np.geomspace(x.min(), x.max(), 50)
    ax.plot(grid, np.exp(fit.intercept) * grid ** fit.slope, color="C1",
            label=(f"slope {fit.slope:.3f} (no CI)" if fit.slope_ci_low is None else
                   f"slope {fit.slope:.3f} [{fit.slope_ci_low:.3f}, {fit.slope_ci_high:.3f}]"))
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="EntCE (nats/token)")
    ax.legend(fontsize=8)
    return str(_save(plt, fig, path, format="png"))


def plot_theory(results_per_alpha: Sequence[TheoryCurve], path: str) -> str:
    """Expected EntCE against training tokens m (log-log), one line per α, legend with the fitted and
    predicted (1/α − 1) exponents; PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for k, c in enumerate(results_per_alpha):
        ax.plot(c.ms, c.entce_nats, marker="o", ms=3, color=f"C{k}",
                label=f"α={c.alpha:g}: fit {c.fitted_exponent:.3f}, 1/α−1 = {c.predicted_exponent:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training tokens m", ylabel="expected EntCE (nats/token)")
    ax.legend(fontsize=7)
    return str(_save(plt, fig, path, format="png"))


def study_figures(out_dir: Path, result: StudyResult, summary: pl.DataFrame) -> dict[str, Path]:
    """Every figure of a study's report, drawn into ``out_dir``: error_accumulation (smoothed curves of every
    pair), entce_vs_temperature (``summary``: one row per child run), each calibration's Pareto figure and each
    scaling fit's (FamilyFit.figure). Returns their paths by name (the first two without ".png")."""
    curves = [{"model": r.model, "dataset": r.dataset, "decoding": r.decoding.key, "curves": r.curves}
              for r in result.pairs]
    files = {"error_accumulation": plot_error_accumulation(curves, out_dir / "error_accumulation.png"),
             "entce_vs_temperature": plot_entce_vs_temperature(summary, out_dir / "entce_vs_temperature.png")}
    for c in result.calibrations:
        files[c.pareto_figure] = Path(plot_pareto(
            c.sweep, c.pareto_front, out_dir / c.pareto_figure,
            title=f"{c.label}: EntCE vs L̄, evaluation split, {c.eval_examples} prompts"))
    for f in result.scaling:
        if f.figure:
            files[f.figure] = Path(plot_scaling([x for x, _, _ in f.points], [e for _, e, _ in f.points], f.fit,
                                                str(out_dir / f.figure)))
    return files
