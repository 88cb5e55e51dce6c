"""Scaling-law fits (docs/SCIENCE.md §2): log EntCE on log parameter count, per model family.

Plain functions (no Prefect, no I/O), numpy only; the plot is tasks.figures.plot_scaling:

    fit_scaling(params, entce, *, examples, n_boot, ci_level, seed) -> ScalingFit  # log EntCE on log N
    family_fits(families, datasets, rows, params, sums, ...) -> [FamilyFit]     # one per family × dataset
    fit_exponent(ms, values) -> slope of log value on log m

The paper's simplified theory and a corpus's power-law α are tasks/theory.py.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- scaling fit (§2)

@dataclass(frozen=True)
class ScalingFit:
    """OLS of log EntCE on log parameter count: log EntCE = intercept + slope · log N.

    slope: the scaling exponent (dimensionless); intercept: log nats/token at N = 1; r2: coefficient
    of determination. slope_ci_low/high: percentile interval at ``ci_level`` of the nested bootstrap
    (``fit_scaling``), or None with ``no_ci`` saying why. n_boot: resamples drawn; n_used: those the
    CI rests on; dropped_nonpositive: resamples dropped because some model's resampled EntCE was ≤ 0
    (log undefined); dropped_degenerate: resamples that drew one parameter count only.
    """

    slope: float
    intercept: float
    slope_ci_low: float | None
    slope_ci_high: float | None
    n_models: int
    r2: float
    ci_level: float = 0.95
    n_boot: int = 0
    n_used: int = 0
    dropped_nonpositive: int = 0
    dropped_degenerate: int = 0
    no_ci: str | None = None
    few_models_share: float = 0.0  # share of the used resamples that held fewer distinct models than n_models

    def describe(self) -> str:
        """One sentence for the report: the slope, its CI (or why there is none), and what was dropped; with
        few models, how conservative the CI is (most resamples then refit fewer distinct models)."""
        head = f"slope {self.slope:.3f} over {self.n_models} models"
        if self.slope_ci_low is None:
            return f"{head}; no CI: {self.no_ci}"
        share = self.dropped_nonpositive / self.n_boot if self.n_boot else 0.0
        text = (f"{head}, {self.ci_level:.0%} CI [{self.slope_ci_low:.3f}, {self.slope_ci_high:.3f}] "
                f"(nested bootstrap: models, then examples within each model; {self.n_used} of {self.n_boot} "
                f"resamples used, {share:.1%} dropped because a model's resampled EntCE was ≤ 0, "
                f"{self.dropped_degenerate} drew a single model)")
        if self.few_models_share >= 0.25:
            text += (f". Conservative: {self.few_models_share:.0%} of the used resamples held fewer than "
                     f"{self.n_models} distinct models (drawing {self.n_models} with replacement repeats one "
                     "often), so the interval is wider than the models' spread alone would make it")
        return text


MIN_CI_MODELS = 3        # a slope through 2 points has no residual: no CI below this
MIN_USED_SHARE = 0.5     # no CI when more than half the resamples had to be dropped
_SUM_KEYS = ("entropy_sum", "entropy_n", "logloss_sum", "logloss_n")


def fit_scaling(params: Sequence[float], entce: Sequence[float], *,
                examples: Sequence[Mapping[str, np.ndarray]] | None = None, n_boot: int = 1000,
                ci_level: float = 0.95, seed: int = 0) -> ScalingFit:
    """Fit EntCE ≈ exp(intercept) · N^slope over models, with a nested-bootstrap CI on the slope.

    params[n]: parameter counts (> 0); entce[n]: EntCE of each model, nats/token (> 0: the log of a
    non-positive EntCE is undefined, which raises ValueError naming the model). examples[n]: model
    n's per-example sums (tasks.metrics.example_sums: entropy_sum, entropy_n, logloss_sum,
    logloss_n, each [n_examples]).

    CI (only with ≥ MIN_CI_MODELS models and ``examples``): each of ``n_boot`` resamples draws models
    with replacement, then, for every drawn model, its examples with replacement, recomputes that
    model's EntCE = Σh/Σn_h − Σl/Σn_l and refits the slope; the interval is the (1 ∓ ci_level)/2
    quantiles. A resample in which some drawn model's EntCE is ≤ 0 is dropped and counted
    (``dropped_nonpositive``); one that drew a single parameter count is skipped (``dropped_degenerate``);
    when fewer than MIN_USED_SHARE of the resamples remain, there is no CI (``no_ci`` says why).
    """
    x_raw = np.asarray(params, dtype=np.float64).reshape(-1)
    y_raw = np.asarray(entce, dtype=np.float64).reshape(-1)
    if x_raw.shape != y_raw.shape:
        raise ValueError(f"expected as many EntCE values as models, got {y_raw.size} for {x_raw.size}")
    if x_raw.size < 2:
        raise ValueError(f"scaling fit needs at least 2 models, got {x_raw.size}")
    for i, (n, e) in enumerate(zip(x_raw, y_raw)):
        if not (np.isfinite(n) and n > 0):
            raise ValueError(f"parameter count must be > 0: model {i} has {n}")
        if not (np.isfinite(e) and e > 0):
            raise ValueError(f"EntCE must be > 0 for a log-log scaling fit: model {i} has EntCE = "
                             f"{e:.6g} nats/token, log undefined")
    x, y = np.log(x_raw), np.log(y_raw)
    if np.ptp(x) == 0:
        raise ValueError("scaling fit needs at least 2 distinct parameter counts")
    slope, intercept = _ols(x, y)
    resid = y - (intercept + slope * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    fit = dict(slope=slope, intercept=intercept, n_models=int(x.size), r2=r2, ci_level=float(ci_level))
    if x.size < MIN_CI_MODELS:
        return ScalingFit(**fit, slope_ci_low=None, slope_ci_high=None, no_ci=(
            f"{x.size} models; a slope through {x.size} points has no residual to resample — add a third model"))
    if examples is None:
        return ScalingFit(**fit, slope_ci_low=None, slope_ci_high=None,
                          no_ci="no per-example sums given to resample")
    if len(examples) != x.size:
        raise ValueError(f"expected per-example sums for each of the {x.size} models, got {len(examples)}")
    sums = [{k: np.asarray(ex[k], dtype=np.float64).reshape(-1) for k in _SUM_KEYS} for ex in examples]

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))          # outer: models
    xb = x[idx]
    yb = np.full(xb.shape, np.nan)
    for m, s in enumerate(sums):                                   # inner: examples of each drawn model
        where = np.nonzero(idx == m)
        n_ex = s["entropy_sum"].size
        draws = rng.integers(0, n_ex, size=(where[0].size, n_ex))
        e = (s["entropy_sum"][draws].sum(1) / s["entropy_n"][draws].sum(1)
             - s["logloss_sum"][draws].sum(1) / s["logloss_n"][draws].sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            yb[where] = np.where(e > 0, np.log(np.where(e > 0, e, 1.0)), np.nan)
    xc = xb - xb.mean(axis=1, keepdims=True)
    var = np.sum(xc * xc, axis=1)
    degenerate = ~(var > 1e-12 * max(1.0, float(np.var(x)) * x.size))
    nonpositive = ~degenerate & np.isnan(yb).any(axis=1)
    ok = ~degenerate & ~nonpositive
    counts = dict(n_boot=int(n_boot), n_used=int(ok.sum()), dropped_nonpositive=int(nonpositive.sum()),
                  dropped_degenerate=int(degenerate.sum()))
    if ok.sum() < max(2, MIN_USED_SHARE * n_boot):
        return ScalingFit(**fit, **counts, slope_ci_low=None, slope_ci_high=None, no_ci=(
            f"only {ok.sum()} of {n_boot} resamples usable ({nonpositive.sum()} had a model with EntCE ≤ 0, "
            f"{degenerate.sum()} drew a single model)"))
    slopes = np.sum(xc[ok] * (yb[ok] - yb[ok].mean(axis=1, keepdims=True)), axis=1) / var[ok]
    lo, hi = (float(v) for v in np.quantile(slopes, [(1 - ci_level) / 2, (1 + ci_level) / 2]))
    distinct = np.array([len(set(row)) for row in idx[ok].tolist()])
    return ScalingFit(**fit, **counts, slope_ci_low=lo, slope_ci_high=hi,
                      few_models_share=float((distinct < x.size).mean()))


@dataclass(frozen=True)
class FamilyFit:
    """The scaling fit of one model family on one dataset at τ = 1, untruncated: ``points`` are
    (parameter count, EntCE, model label); ``fit`` is None when no fit is possible, ``error`` says why."""

    family: str
    dataset: str
    points: list[tuple[float, float, str]]
    fit: ScalingFit | None
    error: str | None = None

    @property
    def figure(self) -> str | None:
        """The file name of its plot in the report's folder (None without a fit)."""
        return None if self.fit is None else f"scaling__{self.family}__{self.dataset}.png"


def family_fits(families: Mapping[str, Sequence[str]], datasets: Sequence[str], rows: Sequence[Mapping],
                params: Mapping[str, float], sums: Mapping[tuple[str, str], Mapping[str, np.ndarray]], *,
                n_boot: int, ci_level: float, seed: int) -> list[FamilyFit]:
    """For every family of ≥ 2 models and every dataset: fit_scaling over the family's τ = 1, untruncated
    ``rows`` (dicts with model, dataset, temperature, truncated, entce), ``params[model]`` its parameter count,
    ``sums[(model, dataset)]`` its per-example sums (the CI's nested bootstrap; no CI when one is missing)."""
    out = []
    for family, models in families.items():
        if len(models) < 2:
            continue
        for dataset in datasets:
            pts = [(float(params[r["model"]]), r["entce"], r["model"]) for r in rows if r["dataset"] == dataset
                   and r["model"] in models and r["temperature"] == 1.0 and not r["truncated"]]
            examples = [sums.get((name, dataset)) for _, _, name in pts]
            try:
                fit = fit_scaling([p for p, _, _ in pts], [e for _, e, _ in pts],
                                  examples=None if None in examples else examples, n_boot=n_boot,
                                  ci_level=ci_level, seed=seed)
            except ValueError as err:
                out.append(FamilyFit(family, dataset, pts, None, str(err)))
                continue
            out.append(FamilyFit(family, dataset, pts, fit))
    return out


def study_fits(config, pairs: Sequence, params: Mapping[str, float]) -> list[FamilyFit]:
    """family_fits of a study (docs/SCIENCE.md §2): its models grouped by ``family``, on each of its datasets,
    log EntCE on log parameters (``params``: by model label) at τ = 1, untruncated, the slope's CI resampling
    each model's examples (the pairs' sums; ``config.bootstrap`` resamples at ``config.ci_level``).
    ``config``: a StudyConfig; ``pairs``: its PairResults."""
    families: dict[str, list[str]] = {}
    for m in config.models:
        if m.family:
            families.setdefault(m.family, []).append(m.label)
    sums = {(p.model, p.dataset): p.sums for p in pairs if p.decoding.temperature == 1.0 and not p.decoding.truncated}
    return family_fits(families, [d.label for d in config.datasets], [p.row() for p in pairs], params, sums,
                       n_boot=config.bootstrap, ci_level=config.ci_level, seed=config.seed)


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    return slope, float(y.mean() - slope * x.mean())


def fit_exponent(ms: Sequence[float], values: Sequence[float]) -> float:
    """Slope of log value on log m (OLS): the power-law exponent of values(m). Values must be > 0."""
    m = np.asarray(ms, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if m.shape != v.shape or m.size < 2:
        raise ValueError(f"expected ≥ 2 matching (m, value) pairs, got {m.size} and {v.size}")
    if np.any(m <= 0) or np.any(~(v > 0)):
        raise ValueError("fit_exponent needs m > 0 and values > 0 (log undefined otherwise)")
    return _ols(np.log(m), np.log(v))[0]
