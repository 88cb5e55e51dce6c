"""The data that crosses stage boundaries: table schemas, typed records, and the knobs of each stage.

Every stage reads and writes only these. A table is a polars DataFrame with exactly one of the
schemas below (one row per example, or per example × sample × decoding; per-step values are lists
aligned with the steps). A record is a frozen dataclass. The knobs are built once from the
StudyConfig (``Knobs.of``), so a new knob is one field here and one use where it matters. The
record of a stored generation part, PartRecord, lives with the store that writes it (storage/parts.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass, field

import polars as pl

from entcal.tasks.config import DecodingSpec, StudyConfig

# ---------------------------------------------------------------- tables
PROMPTS_SCHEMA = {  # tasks.datasets.prepare_prompts: one row per example
    "example_id": pl.String,
    "dataset": pl.String,
    "prompt_ids": pl.List(pl.Int32),
    "reference_ids": pl.List(pl.Int32),  # the human continuation
    "prompt_text": pl.String,
    "reference_text": pl.String,
}
GENERATIONS_SCHEMA = {  # tasks.generate: one row per example × sample
    "example_id": pl.String,
    "sample": pl.Int32,
    "decoding": pl.String,
    "token_ids": pl.List(pl.Int32),
    "step_entropy": pl.List(pl.Float32),  # H of the sampling distribution q_t, nats
    "step_logprob": pl.List(pl.Float32),  # log q_t of the drawn token
    "finish_reason": pl.String,  # "eos" | "length"
    "text": pl.String,
    "tokens": pl.List(pl.String),
}
REFERENCE_SCHEMA = {  # tasks.score: one row per example × decoding
    "example_id": pl.String,
    "decoding": pl.String,
    "step_logloss": pl.List(pl.Float32),  # −log q_ε(y_t): q mixed with p at weight ε when truncated
    "step_logloss_untruncated": pl.List(pl.Float32),  # −log p_τ(y_t)
    "step_entropy": pl.List(pl.Float32),  # H(q_t) on the human prefix
    "step_truncated": pl.List(pl.Boolean),  # y_t outside the truncated support
}


def frame_digest(df: pl.DataFrame) -> str:
    """sha256 (hex) of a table's content: its Arrow IPC bytes, uncompressed."""
    buf = io.BytesIO()
    df.write_ipc(buf, compression="uncompressed")
    return hashlib.sha256(buf.getvalue()).hexdigest()


EPS_COLUMNS = ("logloss_eps_x10", "logloss_eps_div10")  # a sweep point's L̄ re-mixed at ε×10 and ε/10


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class Summary:
    """EntCE of one (model, dataset, decoding) over the first ``steps`` steps; nats per token."""

    entce: float
    entropy: float
    logloss: float
    entce_ci_low: float
    entce_ci_high: float
    ci_level: float
    logloss_untruncated: float
    truncated_share: float
    sampled_surprisal: float  # diagnostic: −mean log q(drawn token), a noisier estimate of H̄
    steps: int
    generated_tokens: int
    reference_tokens: int
    n_examples: int
    eos_share: float
    # the shape of miscalibration (metrics.shape_stats): (1/T)·Σ_t |h̃_t − l̃_t| of the smoothed curves, nats,
    # and the slope of h_t − l_t, nats per 100 steps, each with its bootstrap CI over examples
    calib_error_per_step: float = float("nan")
    calib_error_per_step_ci: tuple[float, float] = (float("nan"), float("nan"))
    entce_slope: float = float("nan")
    entce_slope_ci: tuple[float, float] = (float("nan"), float("nan"))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recalibration:
    """One calibration method (docs/SCIENCE.md §4): its calibrated decoding fitted on the fit split, compared
    on the evaluation split with the base decoding (τ = 1), the two sides paired (same prompts, shared draws).

    fitted: the Reweighting its fit found (knob: α, a schedule's scale or a target's offset)
    before / after: metrics.comparison's numbers: entce_before/after, logloss_before/after, entropy_before/after,
        delta_entce, delta_logloss (after − before) with their paired CIs (``*_ci``), detectable (the ΔEntCE CI
        excludes 0), calib_error_per_step_before/after, entce_slope_before/after
    zero: the knob where EntCE = 0 on the evaluation split (a root search, as τ*) and what it costs there:
        knob, entce, logloss, delta_logloss against τ = 1 with its paired CI, eos_share, converged; None where no knob in
        its bracket zeroes EntCE (``zero_note`` says why)"""

    method: str
    fitted: Reweighting
    comparison: dict
    zero: dict | None = None
    zero_note: str | None = None

    def as_dict(self) -> dict:
        """calibration.json's entry for the method: ``alpha`` (the fitted knob; the schedule or target in
        ``schedule``), the comparison's numbers, ``alpha_zero_entce`` with ``logloss_at_zero_entce`` and its
        cost ``delta_logloss_at_zero_entce`` (paired CI), and the fit's diagnostics (held-out R², gradient at
        0, ...)."""
        zero = self.zero or {}
        clash = set(self.fitted.fit) & (set(self.comparison) | {"alpha", "knob"})
        if clash:  # the fit's own numbers (on the fit split) must not pass for the evaluation split's
            raise ValueError(f"{self.method}: fit diagnostics {sorted(clash)} shadow the comparison's fields")
        doc = {"alpha": self.fitted.knob, "knob": self.fitted.knob_name, **self.comparison,
               "alpha_zero_entce": zero.get("knob"), "logloss_at_zero_entce": zero.get("logloss"),
               "delta_logloss_at_zero_entce": zero.get("delta_logloss"),
               "delta_logloss_at_zero_entce_ci": zero.get("delta_logloss_ci"),
               "eos_share_at_zero_entce": zero.get("eos_share"),
               "zero_entce_converged": zero.get("converged"), "zero_entce_note": self.zero_note,
               **self.fitted.fit}
        if self.method in ("tau_schedule", "entropy_feedback"):
            doc["schedule"] = self.fitted.params
        return doc


@dataclass(frozen=True)
class Reweighting:
    """A calibrated decoding fitted on the fit split (docs/SCIENCE.md §4): a family's rule with the
    parameters its fit found, at a scalar ``knob`` that the evaluation may move (the search for the knob
    where EntCE = 0 reuses the τ* root search). JSON-able throughout: it is a cached stage's parameter.

    method: lookahead | future_entropy | tau_schedule | entropy_feedback
    params: the numbers that define the rule (f̂'s baseline and weights, the schedule's step buckets and
            temperatures, the target curve); {} for lookahead
    knob:   the fitted value of the family's one scalar: α (lookahead, future_entropy; α = 0 is the base
            decoding itself), the schedule's scale (tau_schedule: τ(s)·knob), the target's offset in nats
            (entropy_feedback: target(s) + knob)
    fit:    diagnostics of the fit (fit-split L̄ at the knob and at the base decoding, held-out R², ...)"""

    method: str
    params: dict
    knob: float
    fit: dict = field(default_factory=dict)

    KNOBS = {"lookahead": "alpha", "future_entropy": "alpha", "tau_schedule": "scale", "entropy_feedback": "offset"}

    @property
    def knob_name(self) -> str:
        return self.KNOBS[self.method]

    def at(self, knob: float) -> "Reweighting":
        """The same rule at another value of its knob."""
        return dataclasses.replace(self, knob=float(knob))


@dataclass(frozen=True)
class CalibrationResult:
    """Everything calibration.json holds for one (model, dataset)."""

    label: str
    tau_star: float | None
    tau_star_ci: tuple[float | None, float | None]
    tau_converged: bool | None
    logloss_at_tau_star: float | None
    logloss_at_tau_1: float | None
    truncation: list[dict]  # EntCE-zeroing setting per method
    sweep: list[dict]  # every evaluated (method, param)
    pareto_front: list[dict]
    fit_examples: int
    eval_examples: int
    epsilon: float
    recalibrations: dict[str, Recalibration] = field(default_factory=dict)  # method -> its result

    SPLITS = {"tau_star": "evaluation", "sweep": "evaluation", "truncation": "evaluation",
              "pareto_front": "evaluation", "recalibrations": "fitted on fit; compared (paired) and zeroed on "
              "evaluation"}

    @property
    def pareto_figure(self) -> str:
        """The file name of its Pareto figure in the report's folder."""
        return f"pareto__{self.label}.png"

    def as_dict(self) -> dict:
        """calibration.json: the fields, one entry per recalibration method that ran (lookahead,
        future_entropy, tau_schedule, entropy_feedback: Recalibration.as_dict), ``splits`` (which split each
        number comes from) and ``figures``."""
        doc = {k: v for k, v in dataclasses.asdict(self).items() if k != "recalibrations"}
        doc.update({m: r.as_dict() for m, r in self.recalibrations.items()})
        return {**doc, "splits": dict(self.SPLITS), "figures": {"pareto": self.pareto_figure}}


@dataclass(frozen=True)
class PairResult:
    """One (model, dataset, decoding) measured: what its MLflow child run, its ``--out`` folder and the
    report show. ``sums``: metrics.example_sums (the scaling fit's nested bootstrap resamples them)."""

    model: str
    dataset: str
    decoding: DecodingSpec
    summary: Summary
    curves: pl.DataFrame  # metrics.step_curves: step, entropy_mean, logloss_mean and their counts
    examples: pl.DataFrame  # metrics.example_table: one row per example
    sums: dict
    tables: dict[str, pl.DataFrame]  # prompts, generations, reference
    agreement: dict | None = None  # engine: vllm: its log-probs against entcal's re-score

    def row(self) -> dict:
        """The report's and the CLI's row: names, decoding knobs and the summary's numbers."""
        return {"model": self.model, "dataset": self.dataset, "decoding": self.decoding.key,
                "temperature": self.decoding.temperature, "truncated": self.decoding.truncated,
                **self.summary.as_dict()}


@dataclass(frozen=True)
class StudyResult:
    """What a study produced, for the report: every pair, every calibration, the scaling fits (tasks.scaling
    FamilyFit), the corpora's α, and which stages ran or came from cache."""

    pairs: list[PairResult]
    calibrations: list[CalibrationResult]
    scaling: list
    corpus_alpha: dict[str, dict | None]
    cached: list[str]
    ran: list[str]


# ---------------------------------------------------------------- knobs
@dataclass(frozen=True)
class PromptKnobs:
    num_examples: int
    prompt_tokens: int
    min_reference_tokens: int
    max_reference_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class GenerationKnobs:
    max_new_tokens: int
    samples_per_prompt: int
    seed: int
    batch_size: int


@dataclass(frozen=True)
class ScoringKnobs:
    max_tokens: int  # the horizon T
    epsilon: float
    batch_size: int


@dataclass(frozen=True)
class SummaryKnobs:
    horizon: int
    bootstrap: int
    ci_level: float
    seed: int
    smoothing: float = 0.2  # exponential smoothing of the per-step curves (the plots', the shape's)


@dataclass(frozen=True)
class RecalibrationKnobs:
    candidates: int  # top-k candidates whose φ is computed exactly
    generation: GenerationKnobs  # the study's: "before" and "after" share their draws
    summary: SummaryKnobs  # the horizon T and the CIs


@dataclass(frozen=True)
class Knobs:
    """The knobs of every stage, built once from the study's config."""

    prompts: PromptKnobs
    generation: GenerationKnobs
    scoring: ScoringKnobs
    summary: SummaryKnobs
    recalibration: RecalibrationKnobs | None  # None: the study does not calibrate

    @classmethod
    def of(cls, config: StudyConfig) -> "Knobs":
        generation = GenerationKnobs(max_new_tokens=config.max_new_tokens, samples_per_prompt=config.samples_per_prompt,
                                     seed=config.seed, batch_size=config.batch_size)
        summary = SummaryKnobs(horizon=config.horizon, bootstrap=config.bootstrap, ci_level=config.ci_level,
                               seed=config.seed, smoothing=config.smoothing)
        return cls(
            prompts=PromptKnobs(num_examples=config.num_examples, prompt_tokens=config.prompt_tokens,
                                min_reference_tokens=config.min_reference_tokens,
                                max_reference_tokens=max(config.horizon, config.max_new_tokens),
                                max_new_tokens=config.max_new_tokens),
            generation=generation,
            scoring=ScoringKnobs(max_tokens=config.horizon, epsilon=config.epsilon, batch_size=config.batch_size),
            summary=summary,
            recalibration=None if config.calibration is None else RecalibrationKnobs(
                candidates=config.calibration.candidates, generation=generation, summary=summary),
        )
