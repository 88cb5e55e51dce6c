"""Calibration methods that change the distribution (docs/SCIENCE.md §4): lookahead (Braverman et al.) and
future-entropy scaling (Cao et al., Alg. 1 made practical). Plain functions. The reweighted decodings they
fit and sample (candidate passes, the human text under q̃, the α fit, reweighted sampling) live in
tasks/atoms.py; τ* and the truncation fronts in tasks/fronts.py.

Both methods reweight the untruncated base p̂ = softmax(logits/τ) of EVERY token w of the vocabulary,
q̃(w) ∝ p̂(w)·exp(α·u_w), u_w = γ·log p̂(w) − φ(w):
  lookahead        γ = 0, φ(w) = H(next | context, w)          q̃ ∝ p̂·exp(−α·H)
  future entropy   γ = 1, φ(w) = f̂(context, w)                 q̃ ∝ p̂^{1+α}·exp(−α·f̂)
φ is computed for the top-k candidates of p̂ only, every other token gets their p̂-weighted mean, and
φ(EOS) = 0 (H(next | EOS) := 0, f̂(EOS) := 0): tasks/atoms.py. With f̂ constant and no EOS ids, future
entropy is exactly temperature τ/(1+α) (an EOS id gains e^{α·f̂} over it).
H(next | context, w) is the entropy of softmax(logits/τ) after appending w (tasks.atoms.entropy_phi).
f̂ (tasks/future.py: a baseline in the steps left plus a cross-validated ridge residual) predicts F = the
SUM of the step entropies of the rest of the generation within the horizon, fitted on the model's own
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

from entcal.tasks.atoms import entropy_phi, fit_alpha, human_atoms, reweighted_generate
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import Recalibration, RecalibrationKnobs
from entcal.tasks.future import BASE, FUTURE_BOUNDS, fit_future_entropy, future_tables
from entcal.tasks.metrics import entce_summary
from entcal.tasks.models import LoadedModel

LOOKAHEAD_BOUNDS = (-1.0, 4.0)


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
def future_entropy_calibration(lm: LoadedModel, prompts_train, prompts_eval, before: BeforeTables,
                               knobs: RecalibrationKnobs, *, bounds=FUTURE_BOUNDS, chunk: int | None = None
                               ) -> Recalibration:
    """tasks.future.fit_future_entropy on ``prompts_train``; EntCE / L̄ (nats/token) before (``before``'s
    evaluation tables) and after (tasks.future.future_tables at the fitted α; the before tables when α = 0)
    on ``prompts_eval``. extra: lookahead's, plus the fit's diagnostics (held-out R², gradient at α = 0,
    EntCE of the fit split, skill, verdict)."""
    gens0 = _rows_of(before.eval_generations, prompts_eval, BASE, "eval_generations")
    ref0 = _rows_of(before.eval_reference, prompts_eval, BASE, "eval_reference")
    rw = fit_future_entropy(lm, prompts_train, before, knobs, bounds=bounds, chunk=chunk)
    gens1, ref1 = (gens0, ref0) if rw.knob == 0 else future_tables(lm, prompts_eval, rw, knobs, chunk=chunk)
    s0, s1 = (entce_summary(g, r, knobs.summary) for g, r in ((gens0, ref0), (gens1, ref1)))
    fit = {k: v for k, v in rw.fit.items() if k not in ("fit_logloss", "fit_logloss_alpha0")}
    return Recalibration(
        alpha=rw.knob, entce_before=s0.entce, entce_after=s1.entce, logloss_before=s0.logloss,
        logloss_after=s1.logloss,
        extra={"alpha_buckets": [], "entropy_before": s0.entropy, "entropy_after": s1.entropy,
               "entce_ci_before": [s0.entce_ci_low, s0.entce_ci_high],
               "entce_ci_after": [s1.entce_ci_low, s1.entce_ci_high],
               "fit_logloss": rw.fit["fit_logloss"], "fit_logloss_alpha0": rw.fit["fit_logloss_alpha0"], **fit})
