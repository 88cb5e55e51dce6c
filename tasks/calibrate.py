"""Calibration metrics from the generations and reference tables.

  H̄ = mean of step_entropy over the tokens of the first T steps of every generation
  L̄ = mean of step_logloss over the first T tokens of every human reference
  EntCE = H̄ − L̄ (nats/token; positive = generations carry more entropy than human text deserves)

The CI is a percentile bootstrap over examples (an example brings all its samples and its
reference). Curves average h_t and l_t over the examples that reach step t.
"""
from __future__ import annotations

import numpy as np
import polars as pl


def _per_example(table: pl.DataFrame, col: str, horizon: int) -> pl.DataFrame:
    """Sum and count of ``col`` over the first ``horizon`` steps, per example."""
    return (
        table.select("example_id", pl.col(col).list.head(horizon).alias("v"))
        .explode("v")
        .drop_nulls("v")
        .group_by("example_id", maintain_order=True)
        .agg(pl.col("v").cast(pl.Float64).sum().alias("sum"), pl.len().alias("n"))
    )


def entce_summary(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int,
                  bootstrap: int = 1000, ci_level: float = 0.95, seed: int = 0) -> dict:
    """H̄, L̄, EntCE and its bootstrap CI, plus diagnostics. All in nats per token."""
    if generations.is_empty() or reference.is_empty():
        raise ValueError("entce_summary: expected non-empty generations and reference tables")
    h = _per_example(generations, "step_entropy", horizon)
    l = _per_example(reference, "step_logloss", horizon)
    both = h.join(l, on="example_id", how="inner", suffix="_l")
    if both.is_empty():
        raise ValueError("entce_summary: generations and reference share no example_id")
    hs, hn = both["sum"].to_numpy(), both["n"].to_numpy().astype(float)
    ls, ln = both["sum_l"].to_numpy(), both["n_l"].to_numpy().astype(float)
    entropy, logloss = hs.sum() / hn.sum(), ls.sum() / ln.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(both), size=(bootstrap, len(both)))
    boot = hs[idx].sum(1) / hn[idx].sum(1) - ls[idx].sum(1) / ln[idx].sum(1)
    lo, hi = np.quantile(boot, [(1 - ci_level) / 2, (1 + ci_level) / 2])

    def pooled(table: pl.DataFrame, col: str, fn=None) -> float:
        v = table.select(pl.col(col).list.head(horizon)).explode(col).drop_nulls()[col]
        v = v.cast(pl.Float64) if fn is None else fn(v)
        return float(v.mean()) if len(v) else float("nan")

    return {
        "entce": float(entropy - logloss),
        "entropy": float(entropy),
        "logloss": float(logloss),
        "entce_ci_low": float(lo),
        "entce_ci_high": float(hi),
        "ci_level": ci_level,
        "logloss_untruncated": pooled(reference, "step_logloss_untruncated"),
        "truncated_share": pooled(reference, "step_truncated", lambda s: s.cast(pl.Float64)),
        "sampled_surprisal": -pooled(generations, "step_logprob"),  # diagnostic: noisier estimate of H̄
        "steps": horizon,
        "generated_tokens": int(hn.sum()),
        "reference_tokens": int(ln.sum()),
        "n_examples": int(len(both)),
        "eos_share": float((generations["finish_reason"] == "eos").mean()),
    }


def step_curves(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int) -> pl.DataFrame:
    """Error-accumulation curves: step, entropy_mean (h_t), logloss_mean (l_t) and their counts."""
    def curve(table: pl.DataFrame, col: str, name: str) -> pl.DataFrame:
        return (
            table.select(pl.col(col).list.head(horizon).alias("v"))
            .with_columns(pl.int_ranges(pl.col("v").list.len()).alias("step"))
            .explode("v", "step")
            .drop_nulls("v")
            .group_by("step")
            .agg(pl.col("v").cast(pl.Float64).mean().alias(f"{name}_mean"), pl.len().alias(f"{name}_n"))
        )

    steps = pl.DataFrame({"step": pl.int_range(0, horizon, eager=True)})
    return (
        steps.join(curve(generations, "step_entropy", "entropy"), on="step", how="left")
        .join(curve(reference, "step_logloss", "logloss"), on="step", how="left")
        .sort("step")
    )


def smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential smoothing s_t = α·x_t + (1−α)·s_{t−1}, skipping missing values."""
    out, s = [], None
    for x in values:
        if x is not None and not np.isnan(x):
            s = x if s is None else alpha * x + (1 - alpha) * s
        out.append(s if s is not None else float("nan"))
    return out
