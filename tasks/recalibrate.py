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
from entcal.tasks.contracts import RecalibrationKnobs, Reweighting
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


def decoding_key(decoding: DecodingSpec, tag: str, alpha) -> str:
    """The decoding column of q̃'s tables: ``t1-look0.25``, ``t1-fut0.1_0.3``."""
    return f"{decoding.key}-{tag}" + "_".join(f"{a:g}" for a in np.atleast_1d(alpha))


# ---------------------------------------------------------------- the methods' one door
METHODS = ("lookahead", "future_entropy", "tau_schedule", "entropy_feedback")


def fit(method: str, lm: LoadedModel, train: pl.DataFrame, before: BeforeTables,
        knobs: RecalibrationKnobs) -> Reweighting:
    """Fit one calibration method on the fit split ``train`` (its human text; ``before``'s fit-split tables):
    the calibrated decoding as a Reweighting (tasks.contracts)."""
    if method == "lookahead":
        return fit_lookahead(lm, train, knobs)
    if method == "future_entropy":
        from entcal.tasks.future import fit_future_entropy

        return fit_future_entropy(lm, train, before, knobs)
    from entcal.tasks import schedules

    if method == "tau_schedule":
        return schedules.fit_tau_schedule(lm, train, before, knobs)
    if method == "entropy_feedback":
        return schedules.fit_entropy_feedback(lm, train, before, knobs)
    raise ValueError(f"calibration method: expected one of {METHODS}, got {method!r}")


def tables_at(lm: LoadedModel, prompts: pl.DataFrame, rw: Reweighting,
              knobs: RecalibrationKnobs) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(generations, reference) of ``prompts`` under the calibrated decoding ``rw`` at ``rw.knob``: the model's
    own generations sampled from it (GENERATIONS_SCHEMA) and the human text scored under the same rule
    (REFERENCE_SCHEMA), over the first ``knobs.summary.horizon`` steps. At the base decoding's knob (α = 0)
    the generations are the base decoding's, token for token (the sampler's noise is shared)."""
    if rw.method == "lookahead":
        return lookahead_tables(lm, prompts, rw, knobs)
    if rw.method == "future_entropy":
        from entcal.tasks.future import future_tables

        return future_tables(lm, prompts, rw, knobs)
    from entcal.tasks.schedules import schedule_tables

    return schedule_tables(lm, prompts, rw, knobs)


# ---------------------------------------------------------------- lookahead (Braverman et al.)
def fit_lookahead(lm: LoadedModel, train: pl.DataFrame, knobs: RecalibrationKnobs, *, decoding: DecodingSpec = BASE,
                  bounds=LOOKAHEAD_BOUNDS, chunk: int | None = None) -> Reweighting:
    """α of q̃ ∝ p̂·exp(−α·H(next | ·, w)), fitted by minimising the log loss of ``train``'s human text (the first
    T tokens of each reference): convex in α, α = 0 allowed, so the fit never raises the fit split's L̄.
    Its feature looks one step ahead only: the α that fits human text moves EntCE little, by construction
    (the search for EntCE = 0 says what pushing it further costs)."""
    atoms = human_atoms(lm, train, decoding, entropy_phi(decoding.temperature), 0.0, top_k=knobs.candidates,
                        max_tokens=knobs.summary.horizon, batch_size=knobs.generation.batch_size, chunk=chunk)
    found = fit_alpha(atoms, bounds=bounds)
    return Reweighting("lookahead", {}, float(found["alpha"]),
                       {"fit_logloss": found["logloss"], "fit_logloss_alpha0": found["logloss_alpha0"],
                        "fit_tokens": found["tokens"], "bounds": list(bounds)})


def lookahead_tables(lm: LoadedModel, prompts: pl.DataFrame, rw: Reweighting, knobs: RecalibrationKnobs, *,
                     decoding: DecodingSpec = BASE, chunk: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """tables_at for lookahead: reweighted_generate at α = rw.knob, and the human text's atoms at that α."""
    phi, key = entropy_phi(decoding.temperature), decoding_key(decoding, "look", rw.knob)
    gens = reweighted_generate(lm, prompts, decoding, phi, 0.0, rw.knob, top_k=knobs.candidates, key=key,
                               knobs=knobs.generation, chunk=chunk)
    atoms = human_atoms(lm, prompts, decoding, phi, 0.0, top_k=knobs.candidates, max_tokens=knobs.summary.horizon,
                        batch_size=knobs.generation.batch_size, chunk=chunk)
    return gens, atoms.table(rw.knob, key=key)


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
