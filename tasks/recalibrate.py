"""Calibration methods that change the distribution (docs/SCIENCE.md §4), behind one door: ``fit(method, ...)``
returns the calibrated decoding as a Reweighting and ``tables_at(...)`` samples and scores it at a knob.
METHODS: lookahead (Braverman et al., here), future-entropy scaling (Cao et al., Alg. 1 made practical:
tasks/future.py), a per-step temperature schedule and entropy feedback (tasks/schedules.py). The
reweighted decodings (candidate passes, the human text under q̃, the α fit, reweighted sampling) live
in tasks/atoms.py; τ* and the truncation fronts in tasks/fronts.py.

The two reweightings reweight the untruncated base p̂ = softmax(logits/τ) of EVERY token w of the vocabulary,
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

α is fitted on the fit split's human text; flows/calibration.py compares q̃ with p̂ (τ = 1) on the
evaluation split, paired. The pipeline hands in the fit split's tables its generate and score stages
have cached (BeforeTables) instead of having them computed again here.
"""
from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from entcal.tasks.atoms import decoding_key, entropy_phi, fit_alpha, human_atoms, reweighted_generate
from entcal.tasks.config import CalibrationSpec, DecodingSpec
from entcal.tasks.contracts import RecalibrationKnobs, Reweighting
from entcal.tasks.future import BASE, fit_future_entropy, future_tables
from entcal.tasks.models import LoadedModel

LOOKAHEAD_BOUNDS = (-1.0, 4.0)


@dataclass(frozen=True)
class BeforeTables:
    """The fit split's tables at the base decoding (BASE: τ = 1, untruncated), from the pipeline's cached
    stages, so that a method's fit reads them instead of computing them again.

    train_generations: GENERATIONS_SCHEMA, the model's own generations of the fit split (every sample;
    future entropy's f̂ is fitted on them). train_reference: REFERENCE_SCHEMA, the score stage's table of
    the fit split's human text. None: the method computes what it needs. Rows of other decodings or of
    examples outside the split are ignored (``rows``)."""

    train_generations: pl.DataFrame | None = None
    train_reference: pl.DataFrame | None = None

    def rows(self, name: str, prompts: pl.DataFrame) -> pl.DataFrame | None:
        """Table ``name``'s rows of BASE and of ``prompts``' examples; None when it has none."""
        table = getattr(self, name)
        if table is None:
            return None
        rows = table.filter((pl.col("decoding") == BASE.key)
                            & pl.col("example_id").is_in(prompts["example_id"].to_list()))
        return None if rows.is_empty() else rows


# ---------------------------------------------------------------- the methods' one door
METHODS = CalibrationSpec.METHODS


def fit(method: str, lm: LoadedModel, train: pl.DataFrame, before: BeforeTables,
        knobs: RecalibrationKnobs) -> Reweighting:
    """Fit one calibration method on the fit split ``train`` (its human text; ``before``'s fit-split tables):
    the calibrated decoding as a Reweighting (tasks.contracts)."""
    if method == "lookahead":
        return fit_lookahead(lm, train, knobs)
    if method == "future_entropy":
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
