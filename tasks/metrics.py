"""Calibration metrics from the generations and reference tables: this module only measures.

  H̄ = mean of step_entropy over the tokens of the first T steps of every generation
  L̄ = mean of step_logloss over the first T tokens of every human reference
  EntCE = H̄ − L̄ (nats/token; positive = generations carry more entropy than human text deserves)

The CI is a percentile bootstrap over examples (an example brings all its samples and its
reference). Curves average h_t and l_t over the examples that reach step t.

``example_sums`` gives the per-example sums the bootstrap resamples (also used by the scaling fit's
nested bootstrap); ``logloss_at_epsilon`` re-mixes a reference table at another ε without re-scoring.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import PairResult, Summary, SummaryKnobs


def per_example(table: pl.DataFrame, col: str, horizon: int) -> pl.DataFrame:
    """Sum (float64) and count of ``col`` over the first ``horizon`` steps, per example: columns example_id,
    sum, n (examples in table order)."""
    return (
        table.select("example_id", pl.col(col).list.head(horizon).alias("v"))
        .explode("v")
        .drop_nulls("v")
        .group_by("example_id", maintain_order=True)
        .agg(pl.col("v").cast(pl.Float64).sum().alias("sum"), pl.len().alias("n"))
    )


def example_sums(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int) -> dict[str, np.ndarray]:
    """Per-example sums over the first ``horizon`` steps, for examples in both tables (join order).

    Returns float64 arrays of shape [n_examples]: entropy_sum (Σ step_entropy over all samples, nats),
    entropy_n (their token count), logloss_sum (Σ step_logloss of the reference, nats), logloss_n.
    EntCE = Σ entropy_sum / Σ entropy_n − Σ logloss_sum / Σ logloss_n."""
    if generations.is_empty() or reference.is_empty():
        raise ValueError("entce_summary: expected non-empty generations and reference tables")
    h = per_example(generations, "step_entropy", horizon)
    l = per_example(reference, "step_logloss", horizon)
    both = h.join(l, on="example_id", how="inner", suffix="_l")
    if both.is_empty():
        raise ValueError("entce_summary: generations and reference share no example_id")
    return {"entropy_sum": both["sum"].to_numpy().astype(np.float64),
            "entropy_n": both["n"].to_numpy().astype(np.float64),
            "logloss_sum": both["sum_l"].to_numpy().astype(np.float64),
            "logloss_n": both["n_l"].to_numpy().astype(np.float64)}


def entce_summary(generations: pl.DataFrame, reference: pl.DataFrame, knobs: SummaryKnobs) -> Summary:
    """H̄, L̄, EntCE over the first ``knobs.horizon`` steps and its percentile bootstrap CI over examples
    (``knobs.bootstrap`` resamples at ``knobs.ci_level``, seeded by ``knobs.seed``), plus diagnostics
    (tasks.contracts.Summary). Nats per token."""
    horizon, bootstrap, ci_level, seed = knobs.horizon, knobs.bootstrap, knobs.ci_level, knobs.seed
    sums = example_sums(generations, reference, horizon=horizon)
    hs, hn, ls, ln = (sums[k] for k in ("entropy_sum", "entropy_n", "logloss_sum", "logloss_n"))
    n = hs.size  # examples
    entropy, logloss = hs.sum() / hn.sum(), ls.sum() / ln.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(bootstrap, n))
    boot = hs[idx].sum(1) / hn[idx].sum(1) - ls[idx].sum(1) / ln[idx].sum(1)
    lo, hi = np.quantile(boot, [(1 - ci_level) / 2, (1 + ci_level) / 2])

    def pooled(table: pl.DataFrame, col: str, fn=None) -> float:
        v = table.select(pl.col(col).list.head(horizon)).explode(col).drop_nulls()[col]
        v = v.cast(pl.Float64) if fn is None else fn(v)
        return float(v.mean()) if len(v) else float("nan")

    return Summary(
        entce=float(entropy - logloss),
        entropy=float(entropy),
        logloss=float(logloss),
        entce_ci_low=float(lo),
        entce_ci_high=float(hi),
        ci_level=ci_level,
        logloss_untruncated=pooled(reference, "step_logloss_untruncated"),
        truncated_share=pooled(reference, "step_truncated", lambda s: s.cast(pl.Float64)),
        sampled_surprisal=-pooled(generations, "step_logprob"),
        steps=horizon,
        generated_tokens=int(hn.sum()),
        reference_tokens=int(ln.sum()),
        n_examples=int(n),
        eos_share=float((generations["finish_reason"] == "eos").mean()),
        **shape_stats(generations, reference, knobs),
    )


# ---------------------------------------------------------------- the shape of miscalibration
def step_sums(table: pl.DataFrame, col: str, horizon: int, examples: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts), float64 [len(examples), horizon]: per example (all its samples) and step t < horizon,
    the sum of ``col`` and how many values it has (0 where no row of the example reaches step t)."""
    row = {ex: i for i, ex in enumerate(examples)}
    sums, counts = np.zeros((len(examples), horizon)), np.zeros((len(examples), horizon))
    for ex, values in table.select("example_id", pl.col(col).list.head(horizon)).iter_rows():
        if ex in row and values:
            v = np.asarray(values, dtype=np.float64)
            sums[row[ex], : v.size] += v
            counts[row[ex], : v.size] += 1
    return sums, counts


def _smooth_rows(x: np.ndarray, alpha: float) -> np.ndarray:
    """smooth() along the last axis of [B, T], every row at once (NaN steps skipped)."""
    out, s = np.full_like(x, np.nan), np.full(x.shape[0], np.nan)
    for t in range(x.shape[1]):
        v = x[:, t]
        s = np.where(np.isnan(v), s, np.where(np.isnan(s), v, alpha * v + (1 - alpha) * s))
        out[:, t] = s
    return out


def _shape(sh, nh, sl, nl, idx: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-step calibration error, slope per 100 steps) of the curves of the examples ``idx`` [B, n]: [B] each."""
    with np.errstate(invalid="ignore", divide="ignore"):
        h, l = sh[idx].sum(1) / nh[idx].sum(1), sl[idx].sum(1) / nl[idx].sum(1)  # [B, T], NaN: no example there
        gap = np.abs(_smooth_rows(h, smoothing) - _smooth_rows(l, smoothing))
        error = np.nanmean(np.where(np.isnan(h) | np.isnan(l), np.nan, gap), axis=1)
        d = h - l
        ok = ~np.isnan(d)
        t = np.where(ok, np.arange(d.shape[1])[None], 0.0)
        m = ok.sum(1)
        tc = t - (t.sum(1) / m)[:, None]
        dc = np.where(ok, d, 0.0) - (np.where(ok, d, 0.0).sum(1) / m)[:, None]
        slope = 100 * (np.where(ok, tc * dc, 0.0).sum(1) / np.where(ok, tc * tc, 0.0).sum(1))
    return error, slope


def shape_stats(generations: pl.DataFrame, reference: pl.DataFrame, knobs: SummaryKnobs) -> dict:
    """The shape of miscalibration over the first ``knobs.horizon`` steps (docs/SCIENCE.md §4): a model too cold
    early and too hot late can pool to EntCE = 0.

    calib_error_per_step: (1/T)·Σ_t |h̃_t − l̃_t|, nats, with h̃, l̃ the per-step curves (step_curves: means over
    the examples that reach t) exponentially smoothed at ``knobs.smoothing``, as the plots draw them; over the
    steps both curves reach. entce_slope: the least-squares slope of h_t − l_t against t, in nats per 100
    steps (error accumulation makes it positive). Each with a bootstrap CI over examples (centred_ci)
    (``knobs.bootstrap`` resamples at ``knobs.ci_level``, seeded by ``knobs.seed``)."""
    examples = sorted(set(generations["example_id"].to_list()) & set(reference["example_id"].to_list()))
    if not examples:
        raise ValueError("shape_stats: generations and reference share no example_id")
    sh, nh = step_sums(generations, "step_entropy", knobs.horizon, examples)
    sl, nl = step_sums(reference, "step_logloss", knobs.horizon, examples)
    n = len(examples)
    error, slope = _shape(sh, nh, sl, nl, np.arange(n)[None], knobs.smoothing)
    idx = np.random.default_rng(knobs.seed).integers(0, n, size=(knobs.bootstrap, n))
    b_error, b_slope = _shape(sh, nh, sl, nl, idx, knobs.smoothing)
    return {"calib_error_per_step": float(error[0]),
            "calib_error_per_step_ci": centred_ci(b_error, float(error[0]), knobs.ci_level),
            "entce_slope": float(slope[0]), "entce_slope_ci": centred_ci(b_slope, float(slope[0]), knobs.ci_level)}


def centred_ci(replicates: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """The percentile interval of the bootstrap replicates shifted so their mean is ``estimate``. A mean of
    |h̃_t − l̃_t| gains in every resample (resampling noise adds to each |gap|), so the plain percentile
    interval can lie wholly above its own estimate (and Efron's bias correction collapses there); shifted,
    the interval keeps the replicates' spread around the estimate. It is an interval for the statistic at
    this number of examples, noise floor included: compare before and after at the same number. For an
    unbiased statistic (the slope) the shift is about 0 and this is the percentile interval."""
    b = replicates[np.isfinite(replicates)]
    if not b.size or not np.isfinite(estimate):
        return float("nan"), float("nan")
    lo, hi = np.quantile(b - (b.mean() - estimate), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------- paired comparisons
def paired_delta(before: tuple[pl.DataFrame, pl.DataFrame], after: tuple[pl.DataFrame, pl.DataFrame],
                 knobs: SummaryKnobs) -> dict:
    """after − before, for two decodings of the same prompts (each a (generations, reference) pair), with a
    paired percentile bootstrap: every resample draws the same examples on both sides, so what the two share
    (the prompts, and with paired sampling most draws) cancels out of the CI.

    Returns delta_entce, delta_logloss, delta_entropy (nats/token, first ``knobs.horizon`` steps), their CIs
    (``*_ci``: [low, high] at ``knobs.ci_level``), examples (how many both sides share) and ``detectable``:
    whether the ΔEntCE CI excludes 0 (else: "no detectable effect")."""
    sides = []
    for g, r in (before, after):
        sums = example_sums(g, r, horizon=knobs.horizon)
        ids = (per_example(g, "step_entropy", knobs.horizon).join(
            per_example(r, "step_logloss", knobs.horizon), on="example_id", how="inner")["example_id"].to_list())
        sides.append(pl.DataFrame({"example_id": ids, **sums}))
    both = sides[0].join(sides[1], on="example_id", how="inner", suffix="_after")
    if both.is_empty():
        raise ValueError("paired_delta: the two sides share no example_id")
    cols = ("entropy_sum", "entropy_n", "logloss_sum", "logloss_n")
    b, a = ([both[c + suffix].to_numpy() for c in cols] for suffix in ("", "_after"))
    n = both.height
    idx = np.concatenate([np.arange(n)[None], np.random.default_rng(knobs.seed).integers(0, n, (knobs.bootstrap, n))])

    def means(x):  # [1 + B] H̄ and L̄ of each resample (row 0: the examples themselves)
        return x[0][idx].sum(1) / x[1][idx].sum(1), x[2][idx].sum(1) / x[3][idx].sum(1)
    (hb, lb), (ha, la) = means(b), means(a)
    deltas = {"delta_entce": (ha - la) - (hb - lb), "delta_logloss": la - lb, "delta_entropy": ha - hb}
    q = [(1 - knobs.ci_level) / 2, (1 + knobs.ci_level) / 2]
    out: dict = {"examples": n, "ci_level": knobs.ci_level}
    for name, d in deltas.items():
        out[name] = float(d[0])
        out[f"{name}_ci"] = [float(x) for x in np.quantile(d[1:], q)]
    lo, hi = out["delta_entce_ci"]
    out["detectable"] = bool(lo > 0 or hi < 0)
    return out


def logloss_at_epsilon(reference: pl.DataFrame, *, horizon: int, epsilon: float, new_epsilon: float) -> float:
    """L̄ (nats/token, pooled over the first ``horizon`` tokens of every reference) had the table been
    scored at ``new_epsilon`` instead of ``epsilon``, from the table alone (tasks/score.py):
    step_logloss l = −log((1−ε)q + εp), step_logloss_untruncated = −log p, step_truncated ⇔ q(y) = 0.
    So q = (e^{−l} − εp)/(1−ε), clipped ≥ 0 and exactly 0 where truncated, and l' = −log((1−ε')q + ε'p).
    Untruncated decodings have l = −log p, so q = p and l' = l."""
    for name, eps in (("epsilon", epsilon), ("new_epsilon", new_epsilon)):
        if not 0 < eps < 1:
            raise ValueError(f"logloss_at_epsilon: {name} must be in (0, 1), got {eps}")
    cols = ("step_logloss", "step_logloss_untruncated", "step_truncated")
    flat = (reference.select(*(pl.col(c).list.head(horizon) for c in cols))
            .explode(*cols).drop_nulls("step_logloss"))
    if flat.is_empty():
        return float("nan")
    loss = flat["step_logloss"].cast(pl.Float64).to_numpy()
    p = np.exp(-flat["step_logloss_untruncated"].cast(pl.Float64).to_numpy())
    cut = flat["step_truncated"].to_numpy().astype(bool)
    q = np.where(cut, 0.0, np.clip((np.exp(-loss) - epsilon * p) / (1 - epsilon), 0.0, None))
    with np.errstate(divide="ignore"):
        return float(np.mean(-np.log((1 - new_epsilon) * q + new_epsilon * p)))


def step_curves(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int,
                smoothing: float | None = None) -> pl.DataFrame:
    """Error-accumulation curves: step, entropy_mean (h_t), logloss_mean (l_t) and their counts; with
    ``smoothing``, also entropy_smooth and logloss_smooth (smooth() at that α: what the plots draw)."""
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
    out = (steps.join(curve(generations, "step_entropy", "entropy"), on="step", how="left")
           .join(curve(reference, "step_logloss", "logloss"), on="step", how="left")
           .sort("step"))
    if smoothing is None:
        return out
    return out.with_columns(pl.Series(f"{n}_smooth", smooth(out[f"{n}_mean"].to_list(), smoothing), pl.Float64)
                            for n in ("entropy", "logloss"))


def smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential smoothing s_t = α·x_t + (1−α)·s_{t−1}, skipping missing values."""
    out, s = [], None
    for x in values:
        if x is not None and not np.isnan(x):
            s = x if s is None else alpha * x + (1 - alpha) * s
        out.append(s if s is not None else float("nan"))
    return out


TEXT_CHARS = 80  # characters of each example's first generation in the per-example table


def example_table(generations: pl.DataFrame, reference: pl.DataFrame, *, horizon: int) -> pl.DataFrame:
    """One row per example: entropy_mean (H̄ of its samples), logloss_mean (L̄ of its reference),
    entce, tokens pooled (nats/token, first ``horizon`` steps), the first sample's finish_reason and,
    when the generations carry decoded text (their ``text`` column), its first ``TEXT_CHARS`` characters."""
    h = per_example(generations, "step_entropy", horizon)
    l = per_example(reference, "step_logloss", horizon)
    if "text" not in generations.columns:
        generations = generations.with_columns(pl.lit(None, pl.String).alias("text"))
    first = generations.group_by("example_id", maintain_order=True).first()
    out = (h.join(l, on="example_id", how="left", suffix="_l")
           .join(first.select("example_id", "finish_reason", "text"), on="example_id", how="left")
           .select("example_id", (pl.col("sum") / pl.col("n")).alias("entropy_mean"),
                   (pl.col("sum_l") / pl.col("n_l")).alias("logloss_mean"),
                   pl.col("n").alias("generated_tokens"), pl.col("n_l").alias("reference_tokens"),
                   "finish_reason", pl.col("text").str.slice(0, TEXT_CHARS))
           .with_columns((pl.col("entropy_mean") - pl.col("logloss_mean")).alias("entce")))
    cols = ["example_id", "entropy_mean", "logloss_mean", "entce", "generated_tokens", "reference_tokens",
            "finish_reason"]
    return out.select(cols + (["text"] if out["text"].null_count() < out.height else []))


def pair_result(model: str, dataset: str, decoding: DecodingSpec, prompts: pl.DataFrame, generations: pl.DataFrame,
                reference: pl.DataFrame, knobs: SummaryKnobs, agreement: dict | None = None) -> PairResult:
    """Everything measured of one (model, dataset, decoding) from its tables: the summary, the per-step
    curves, the per-example table and sums, the tables themselves, and engine: vllm's ``agreement``."""
    return PairResult(
        model=model, dataset=dataset, decoding=decoding, summary=entce_summary(generations, reference, knobs),
        curves=step_curves(generations, reference, horizon=knobs.horizon, smoothing=knobs.smoothing),
        examples=example_table(generations, reference, horizon=knobs.horizon),
        sums=example_sums(generations, reference, horizon=knobs.horizon),
        tables={"prompts": prompts, "generations": generations, "reference": reference}, agreement=agreement)


def comparison(before: tuple[pl.DataFrame, pl.DataFrame], after: tuple[pl.DataFrame, pl.DataFrame],
               knobs: SummaryKnobs) -> dict:
    """A calibration's before / after on one split (each side a (generations, reference) pair of the same
    prompts): EntCE, L̄ and H̄ of each side with its CI, the share of generations ended by EOS (a knob that
    lifts EOS can zero EntCE by stopping early), the paired deltas (paired_delta) and the shape of each side
    (calib_error_per_step, entce_slope). JSON-able; nats per token (slopes per 100 steps)."""
    s0, s1 = entce_summary(*before, knobs), entce_summary(*after, knobs)
    out = {}
    for side, s in (("before", s0), ("after", s1)):
        out |= {f"entce_{side}": s.entce, f"entce_{side}_ci": [s.entce_ci_low, s.entce_ci_high],
                f"logloss_{side}": s.logloss, f"entropy_{side}": s.entropy,
                f"eos_share_{side}": s.eos_share, f"calib_error_per_step_{side}": s.calib_error_per_step,
                f"calib_error_per_step_{side}_ci": list(s.calib_error_per_step_ci),
                f"entce_slope_{side}": s.entce_slope, f"entce_slope_{side}_ci": list(s.entce_slope_ci)}
    return out | paired_delta(before, after, knobs)
