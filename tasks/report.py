"""Figures and the markdown report of a study.

- error_accumulation.png: h_t (solid) and l_t (dashed) against t, smoothed, one colour per
  decoding, one panel per (model, dataset)
- entce_vs_temperature.png: EntCE with its CI against temperature, one line per (model, dataset)
- report.md: the numbers, one row per child run
"""
from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from tasks.calibrate import smooth

METRIC_COLUMNS = ("entce", "entce_ci_low", "entce_ci_high", "entropy", "logloss", "logloss_untruncated",
                  "truncated_share", "sampled_surprisal", "n_examples")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_accumulation(curves: list[dict], path: Path, *, smoothing: float) -> Path:
    """``curves``: dicts with model, dataset, decoding and a 'curves' frame from step_curves."""
    plt = _plt()
    panels = sorted({(c["model"], c["dataset"]) for c in curves})
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4 * rows), squeeze=False)
    decodings = sorted({c["decoding"] for c in curves})
    colour = {d: plt.cm.tab10(i % 10) for i, d in enumerate(decodings)}
    for ax, (model, dataset) in zip(axes.flat, panels):
        for c in curves:
            if (c["model"], c["dataset"]) != (model, dataset):
                continue
            df = c["curves"]
            ax.plot(df["step"], smooth(df["entropy_mean"].to_list(), smoothing), color=colour[c["decoding"]],
                    label=f"{c['decoding']} entropy h_t")
            ax.plot(df["step"], smooth(df["logloss_mean"].to_list(), smoothing), color=colour[c["decoding"]],
                    linestyle="--", label=f"{c['decoding']} log loss l_t")
        ax.set_title(f"{model} · {dataset}")
        ax.set_xlabel("generation step t")
        ax.set_ylabel("nats / token")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Error accumulation: entropy of generations vs log loss on human text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entce_vs_temperature(summary: pl.DataFrame, path: Path) -> Path:
    """EntCE ± CI against temperature for the untruncated decodings."""
    plt = _plt()
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def corpus_alpha_section(alphas: dict[str, float]) -> str:
    """The power-law α of each corpus (rank-frequency slope of its words; SCIENCE.md §3)."""
    lines = ["## Corpora", "", "| dataset | α (word rank-frequency) | theory's exponent 1/α − 1 |", "|---|---|---|"]
    lines += [f"| {d} | {a:.3f} | {1 / a - 1:+.3f} |" if a else f"| {d} | — (too few distinct words) | — |"
              for d, a in alphas.items()]
    return "\n".join(lines + [""])


def markdown_report(name: str, summary: pl.DataFrame, *, horizon: int, figures: list[str],
                    run_url: str | None = None, extra: str = "") -> str:
    lines = [f"# entcal study: {name}", ""]
    if run_url:
        lines += [f"MLflow run: {run_url}", ""]
    lines += [
        f"EntCE = H̄ − L̄ in nats per token over the first T = {horizon} steps; positive means the model's "
        "generations carry more entropy than its log loss on human text. CI: bootstrap over examples.",
        "",
        "| model | dataset | decoding | EntCE | CI | H̄ | L̄ | L̄ untruncated | truncated share | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.iter_rows(named=True):
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['decoding']} | {_fmt(r['entce'])} | "
            f"[{_fmt(r['entce_ci_low'])}, {_fmt(r['entce_ci_high'])}] | {_fmt(r['entropy'])} | {_fmt(r['logloss'])} | "
            f"{_fmt(r['logloss_untruncated'])} | {_fmt(r['truncated_share'])} | {r['n_examples']} |"
        )
    lines += [""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + ["", extra]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, summary: pl.DataFrame, curves: list[dict], *, horizon: int,
                 smoothing: float, run_url: str | None = None, extra: str = "") -> dict[str, Path]:
    """Write the figures and report.md into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = {
        "error_accumulation": plot_error_accumulation(curves, out_dir / "error_accumulation.png", smoothing=smoothing),
        "entce_vs_temperature": plot_entce_vs_temperature(summary, out_dir / "entce_vs_temperature.png"),
    }
    md = out_dir / "report.md"
    md.write_text(markdown_report(name, summary, horizon=horizon, figures=[str(p) for p in figs.values()],
                                  run_url=run_url, extra=extra))
    summary.write_parquet(out_dir / "summary.parquet")
    return {**figs, "report": md}
