"""Calibration methods that change the distribution (docs/SCIENCE.md §4): lookahead (Braverman et al.) and
future-entropy scaling (Cao et al., Alg. 1 made practical). Plain functions. The reweighted decodings they
fit and sample (candidate passes, the human text under q̃, the α fit, reweighted sampling) live in
tasks/atoms.py; τ* and the truncation fronts in tasks/fronts.py.

Both methods reweight the untruncated base p̂ = softmax(logits/τ) of EVERY token w of the vocabulary,
q̃(w) ∝ p̂(w)·exp(α·u_w), u_w = γ·log p̂(w) − φ(w):
  lookahead        γ = 0, φ(w) = H(next | context, w)          q̃ ∝ p̂·exp(−α·H)
  future entropy   γ = 1, φ(w) = f̂(context, w)                 q̃ ∝ p̂^{1+α}·exp(−α·f̂)
φ is computed for the top-k candidates of p̂ only, every other token gets their p̂-weighted mean, and
φ(EOS) = 0 (H(next | EOS) := 0, f̂(EOS) := 0): tasks/atoms.py. With f̂ constant, future entropy is
exactly temperature τ/(1+α).
H(next | context, w) is the entropy of softmax(logits/τ) after appending w (tasks.atoms.entropy_phi).
f̂ is a ridge regressor on the hidden state after a token, fitted to F = the SUM of the step entropies
of the rest of that generation within the horizon (future_entropy_targets), on the model's own
generations of the fit split.

α (one, or one per step bucket) is fitted on the fit split's human text; EntCE and L̄ are measured
before (p̂: tasks.generate's sampler, and the human text scored at α = 0) and after (q̃) on the
evaluation split. The pipeline hands in the "before" tables its generate and score stages have cached
(BeforeTables) instead of having them computed again here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from entcal.tasks.atoms import entropy_phi, fit_alpha, human_atoms, reweighted_generate
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import Recalibration, RecalibrationKnobs
from entcal.tasks.metrics import entce_summary
from entcal.tasks.models import LoadedModel
from entcal.tasks.score import teacher_forced

BASE = DecodingSpec()  # τ = 1, untruncated: the decoding both methods reweight
LOOKAHEAD_BOUNDS = (-1.0, 4.0)
FUTURE_BOUNDS = (-0.5, 4.0)  # (1 + α) stays > 0


@dataclass(frozen=True)
class BeforeTables:
    """The base decoding's tables, from the pipeline's cached stages, for ``before`` of the two methods.

    train_generations: GENERATIONS_SCHEMA, the model's own generations of the fit split at the method's
    decoding (future entropy's regressor is fitted on them; lookahead does not use them: None).
    eval_generations: GENERATIONS_SCHEMA, the evaluation split's generations at that decoding.
    eval_reference: REFERENCE_SCHEMA, the score stage's table of the evaluation split at that decoding.
    Rows of other decodings or of examples outside the split are ignored."""

    train_generations: pl.DataFrame | None
    eval_generations: pl.DataFrame
    eval_reference: pl.DataFrame
    train_reference: pl.DataFrame | None = None  # REFERENCE_SCHEMA: the fit split's human text at the decoding


def _rows_of(table: pl.DataFrame, prompts: pl.DataFrame, decoding: DecodingSpec, name: str) -> pl.DataFrame:
    """``table``'s rows of ``decoding`` and of the examples in ``prompts``; ValueError when there are none."""
    rows = table.filter((pl.col("decoding") == decoding.key)
                        & pl.col("example_id").is_in(prompts["example_id"].to_list()))
    if rows.is_empty():
        raise ValueError(f"BeforeTables.{name}: no rows of decoding {decoding.key} for the split's examples")
    return rows


def _key(decoding: DecodingSpec, tag: str, alpha) -> str:
    """The decoding column of q̃'s tables: ``t1-look0.25``, ``t1-fut0.1_0.3``."""
    return f"{decoding.key}-{tag}" + "_".join(f"{a:g}" for a in np.atleast_1d(alpha))


def _before_after(lm: LoadedModel, prompts_eval, decoding, phi, gamma, fit, tag, before: BeforeTables,
                  knobs: RecalibrationKnobs, *, chunk=None, extra=None) -> Recalibration:
    """EntCE on ``prompts_eval``: before = p̂ (``before``'s tables), after = q̃ (reweighted_generate, the
    human text at the fitted α)."""
    alpha, buckets = fit["alpha"], fit["buckets"]
    gens0 = _rows_of(before.eval_generations, prompts_eval, decoding, "eval_generations")
    ref0 = _rows_of(before.eval_reference, prompts_eval, decoding, "eval_reference")
    if np.all(np.asarray(alpha) == 0):
        gens1, ref1 = gens0, ref0
    else:
        atoms = human_atoms(lm, prompts_eval, decoding, phi, gamma, top_k=knobs.candidates,
                            max_tokens=knobs.summary.horizon, batch_size=knobs.generation.batch_size, chunk=chunk)
        gens1 = reweighted_generate(lm, prompts_eval, decoding, phi, gamma, alpha, buckets, top_k=knobs.candidates,
                                    key=_key(decoding, tag, alpha), knobs=knobs.generation, chunk=chunk)
        ref1 = atoms.table(alpha, buckets, key=_key(decoding, tag, alpha))
    s0, s1 = (entce_summary(g, r, knobs.summary) for g, r in ((gens0, ref0), (gens1, ref1)))
    return Recalibration(
        alpha=alpha, entce_before=s0.entce, entce_after=s1.entce, logloss_before=s0.logloss,
        logloss_after=s1.logloss,
        extra={"alpha_buckets": list(buckets), "entropy_before": s0.entropy, "entropy_after": s1.entropy,
               "entce_ci_before": [s0.entce_ci_low, s0.entce_ci_high],
               "entce_ci_after": [s1.entce_ci_low, s1.entce_ci_high],
               "fit_logloss": fit["logloss"], "fit_logloss_alpha0": fit["logloss_alpha0"], **(extra or {})})


# ---------------------------------------------------------------- lookahead (Braverman et al.)
def lookahead_calibration(lm: LoadedModel, prompts_train, prompts_eval, before: BeforeTables,
                          knobs: RecalibrationKnobs, *, decoding: DecodingSpec = BASE, bounds=LOOKAHEAD_BOUNDS,
                          chunk: int | None = None) -> Recalibration:
    """Fit α of q̃ ∝ p̂·exp(−α·H(next | ·, w)) on ``prompts_train``'s human text; EntCE / L̄ (nats/token,
    first T steps) before (``before``: the evaluation split's cached tables) and after on ``prompts_eval``.
    extra: alpha_buckets, entropy_before / after, entce_ci_before / after, fit_logloss, fit_logloss_alpha0."""
    phi = entropy_phi(decoding.temperature)
    fit = fit_alpha(human_atoms(lm, prompts_train, decoding, phi, 0.0, top_k=knobs.candidates,
                                max_tokens=knobs.summary.horizon, batch_size=knobs.generation.batch_size,
                                chunk=chunk), bounds=bounds)
    return _before_after(lm, prompts_eval, decoding, phi, 0.0, fit, "look", before, knobs, chunk=chunk)


# ---------------------------------------------------------------- future entropy (Cao et al., Alg. 1)
@dataclass
class FutureEntropyRegressor:
    """Ridge regression f̂(h) = ((h − mean)/scale)·w + b on final hidden states (post final norm), in nats.
    r2: its coefficient of determination on the fitting tokens; n: their count."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float
    r2: float
    n: int

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        d = hidden.device
        return ((hidden.float() - self.mean.to(d)) / self.scale.to(d)) @ self.weight.to(d) + self.bias

    def phi(self, logits, hidden):
        """φ for future entropy (tasks.atoms' phi signature): f̂ of the hidden state after the candidate."""
        return self(hidden)


def future_entropy_targets(step_entropy) -> np.ndarray:
    """F[s] = Σ_{t > s} H_t (float64 [n − 1], nats) for a generation's step entropies H [n]: the total
    entropy of the steps after token s (Cao et al.'s F_{t+1}, a sum, not a mean)."""
    h = np.asarray(step_entropy, dtype=np.float64)
    return np.cumsum(h[::-1])[::-1][1:].copy()


@torch.inference_mode()
def fit_future_regressor(lm: LoadedModel, prompts: pl.DataFrame, generations: pl.DataFrame, *, horizon: int,
                         ridge: float = 1e-2, batch_size: int = 8) -> FutureEntropyRegressor:
    """Target at generated token s (feature: the final hidden state at that token, i.e. after appending
    it, from tasks.score.teacher_forced over prompt + generation): future_entropy_targets, the SUM of
    step_entropy over steps s+1 … end of that generation within the first ``horizon`` steps (nats). The
    last token (EOS or the horizon) has no target: f̂(EOS) := 0. Features standardised; minimises mean
    squared error + ridge·|w|², closed form from float64 moments accumulated batch by batch (memory D²,
    not tokens × D)."""
    ctx = dict(zip(prompts["example_id"].to_list(), prompts["prompt_ids"].to_list()))
    gens = [(ctx[ex], toks[:horizon], ent[:horizon]) for ex, toks, ent in generations.select(
        "example_id", "token_ids", "step_entropy").iter_rows() if len(toks[:horizon]) >= 2]
    if not gens:
        raise ValueError("fit_future_regressor: no generation has 2 or more steps")
    n, sx, sxx, sy, syy, sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for b in range(0, len(gens), batch_size):
        part = gens[b : b + batch_size]
        tf = teacher_forced(lm.model, [c for c, _, _ in part], [t for _, t, _ in part], pad_id=lm.pad_id, hidden=True)
        # row j of a generation predicts its token j, so it is the state after token j − 1: drop each first row
        x = torch.cat([rows[1:] for rows in tf.rows.split(tf.lengths)]).double()
        y = torch.from_numpy(np.concatenate([future_entropy_targets(e) for _, _, e in part])).to(x.device)
        n, sx, sxx = n + len(x), sx + x.sum(0), sxx + x.T @ x
        sy, syy, sxy = sy + y.sum(), syy + (y * y).sum(), sxy + x.T @ y
    mean, ym = sx / n, sy / n
    cov = sxx / n - torch.outer(mean, mean)
    scale = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-6)
    czz = cov / torch.outer(scale, scale)
    czy = (sxy / n - mean * ym) / scale
    w = torch.linalg.solve(czz + ridge * torch.eye(len(mean), dtype=czz.dtype, device=czz.device), czy)
    var_y = float(syy / n - ym * ym)
    sse = var_y - float(2 * w @ czy - w @ czz @ w)
    r2 = 1 - sse / var_y if var_y > 0 else 0.0
    return FutureEntropyRegressor(mean.float().cpu(), scale.float().cpu(), w.float().cpu(), float(ym), r2, n)


def future_entropy_calibration(lm: LoadedModel, prompts_train, prompts_eval, before: BeforeTables,
                               knobs: RecalibrationKnobs, *, decoding: DecodingSpec = BASE, buckets=(),
                               bounds=FUTURE_BOUNDS, ridge: float = 1e-2, chunk: int | None = None) -> Recalibration:
    """Regressor f̂ on the model's own generations for ``prompts_train`` (``before.train_generations``),
    α of q̃ ∝ p̂^{1+α}·exp(−α·f̂) (one per step bucket, edges ``buckets``) on their human text; EntCE / L̄
    (nats/token) before and after on ``prompts_eval`` (as lookahead_calibration). extra: lookahead's, plus
    regressor_r2, regressor_n."""
    if before.train_generations is None:
        raise ValueError("future_entropy_calibration: BeforeTables.train_generations is None; the regressor is "
                         "fitted on the model's own generations of the fit split")
    _rows_of(before.eval_generations, prompts_eval, decoding, "eval_generations")  # refuse bad tables before fitting
    _rows_of(before.eval_reference, prompts_eval, decoding, "eval_reference")
    gens = _rows_of(before.train_generations, prompts_train, decoding, "train_generations")
    reg = fit_future_regressor(lm, prompts_train, gens, horizon=knobs.summary.horizon, ridge=ridge,
                               batch_size=knobs.generation.batch_size)
    atoms = human_atoms(lm, prompts_train, decoding, reg.phi, 1.0, top_k=knobs.candidates,
                        max_tokens=knobs.summary.horizon, batch_size=knobs.generation.batch_size, chunk=chunk)
    fit = fit_alpha(atoms, bounds=bounds, buckets=buckets)
    return _before_after(lm, prompts_eval, decoding, reg.phi, 1.0, fit, "fut", before, knobs, chunk=chunk,
                         extra={"regressor_r2": reg.r2, "regressor_n": reg.n})
