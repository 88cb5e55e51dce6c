"""Typed, closed study configuration.

The same pydantic models are the Prefect flow's parameters (the Prefect UI renders them as a
form), the YAML schema (`entcal run --config FILE`) and what the CLI flags fill in. Unknown keys
are errors (``extra="forbid"``): a typo fails in a second, not after an hour of generation.
The records a study is made of (ModelSpec, DatasetSpec, DecodingSpec) live in tasks/specs.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from entcal.kernels.decoding import DECODING_RANGES
from entcal.tasks.specs import ConfigError, DatasetSpec, DecodingSpec, ModelSpec, _Closed  # noqa: F401 (re-exported)


def _sweep(name: str, *, off: float):
    """A sweep's settings: each within the knob's range (kernels.decoding), and never its "off" value."""
    bounds = dict(DECODING_RANGES[name])
    if off == 0:
        bounds = {k: v for k, v in bounds.items() if k not in ("ge", "gt")} | {"gt": 0}
    else:
        bounds = {k: v for k, v in bounds.items() if k not in ("le", "lt")} | {"lt": off}
    return list[Annotated[int if name == "top_k" else float, Field(**bounds)]]


class CalibrationSpec(_Closed):
    """Which calibrations to fit (docs/SCIENCE.md §4), on a fit split and an evaluation split of the prompts."""

    tau_bracket: tuple[float, float] = Field((0.7, 1.2), description="temperatures that bracket τ* (EntCE = 0): "
                                             "low < high")
    tau_rounds: int = Field(5, ge=2, le=12, description="generation rounds of the τ* root search")
    tau_tol: float = Field(0.02, gt=0, description="stop when the bracket is this narrow")
    top_k: _sweep("top_k", off=0) = [100, 1000]
    top_p: _sweep("top_p", off=1.0) = [0.95, 0.98]
    min_p: _sweep("min_p", off=0.0) = [0.01, 0.05]
    top_nsigma: _sweep("top_nsigma", off=0.0) = [1.5, 3.0]
    typical_p: _sweep("typical_p", off=1.0) = [0.9, 0.95]
    eta_cutoff: _sweep("eta_cutoff", off=0.0) = [3e-4, 2e-3]
    epsilon_cutoff: _sweep("epsilon_cutoff", off=0.0) = [3e-4, 1e-3]
    lookahead: bool = Field(True, description="Braverman et al.'s lookahead: p̂·exp(−α·H(next | ·, w))")
    future_entropy: bool = Field(True, description="Cao et al.'s future-entropy scaling: p̂^(1+α)·exp(−α·f̂)")
    tau_schedule: bool = Field(True, description="a per-step temperature schedule fitted so h_t tracks l_t")
    entropy_feedback: bool = Field(True, description="each step's temperature set so H(q_t) meets the human "
                                   "log loss curve (Mirostat-v2 / entropy-based dynamic temperature style)")
    candidates: int = Field(8, ge=2, description="top-k candidates whose lookahead features are computed")
    regressor_samples: int = Field(4, ge=1, le=64, description="the model's own generations per fit prompt that "
                                   "future entropy's f̂ is trained on (cheap: the human fit split stays as it is)")
    zero_rounds: int = Field(4, ge=2, le=12, description="rounds of each method's search for the knob where "
                             "EntCE = 0 (as τ*'s)")
    fit_fraction: float = Field(0.5, gt=0, lt=1, description="share of prompts used to fit α (the rest evaluates)")

    SWEEPS: ClassVar[tuple[str, ...]] = ("top_k", "top_p", "min_p", "top_nsigma", "typical_p", "eta_cutoff",
                                         "epsilon_cutoff")  # truncations and reweightings swept on a grid
    METHODS: ClassVar[tuple[str, ...]] = ("lookahead", "future_entropy", "tau_schedule", "entropy_feedback")  # fitted

    @property
    def sweeps(self) -> list[str]:
        """The configured sweeps (a non-empty grid), in SWEEPS order."""
        return [k for k in self.SWEEPS if getattr(self, k)]

    @property
    def methods(self) -> list[str]:
        """The configured calibration methods (tasks.recalibrate fits them), in METHODS order."""
        return [k for k in self.METHODS if getattr(self, k)]

    @model_validator(mode="after")
    def _bracket(self) -> "CalibrationSpec":
        lo, hi = self.tau_bracket
        if not 0 < lo < hi <= DECODING_RANGES["temperature"]["le"]:
            raise ValueError(f"tau_bracket [{lo:g}, {hi:g}]: expected two temperatures 0 < low < high that bracket "
                             "τ* (e.g. [0.7, 1.2])")
        if self.tau_tol >= hi - lo:
            raise ValueError(f"tau_tol {self.tau_tol:g} is not narrower than tau_bracket [{lo:g}, {hi:g}]: the search "
                             "would stop before its first step; lower tau_tol or widen the bracket")
        return self


# decoding knobs vLLM's sampler does not have: (field, what it is, its "off" value)
_NOT_IN_VLLM = (("typical_p", "typical sampling", 1.0), ("epsilon_cutoff", "ε-sampling", 0.0),
                ("eta_cutoff", "η-sampling", 0.0))


class StudyConfig(_Closed):
    """One study: models × datasets × decodings."""

    name: str = "study"
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name="smollm2-135m")])
    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(name="python-docs")])
    decodings: list[DecodingSpec] = Field(default_factory=lambda: [DecodingSpec()])
    num_examples: int = Field(32, ge=1, description="prompts per dataset, taken in dataset order")
    prompt_tokens: int = Field(64, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    min_reference_tokens: int = Field(256, ge=1, description="drop examples with a shorter continuation")
    horizon: int | None = Field(None, ge=1, description="T: steps pooled into H̄ and L̄; empty = the smaller of "
                                "max_new_tokens and min_reference_tokens (it may not exceed either)")
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(0, ge=0, description="prompts per cached generation shard (0 = one shard): a crash "
                            "loses at most one shard's work")
    executor: Literal["local", "ray"] = Field(
        "local", description="where generation shards, scoring and calibration fits run: one after another in the "
        "flow's process, or as Ray tasks, shards all at once (prefect-ray; the cluster at RAY_ADDRESS, else a local "
        "Ray), one GPU each when the cluster has GPUs")
    epsilon: float = Field(1e-4, gt=0, lt=1, description="weight of the untruncated distribution when scoring truncated decodings")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for the EntCE CI")
    ci_level: float = Field(0.95, gt=0, lt=1)
    smoothing: float = Field(0.2, gt=0, le=1, description="exponential smoothing of plotted curves")
    calibration: CalibrationSpec | None = Field(None, description="also fit τ*, truncations, lookahead, future entropy")

    @model_validator(mode="before")
    @classmethod
    def _default_horizon(cls, data):
        if isinstance(data, dict) and data.get("horizon") is None:
            fields = cls.model_fields
            new = data.get("max_new_tokens", fields["max_new_tokens"].default)
            ref = data.get("min_reference_tokens", fields["min_reference_tokens"].default)
            if isinstance(new, int) and isinstance(ref, int):
                data = {**data, "horizon": min(new, ref)}
        return data

    @model_validator(mode="after")
    def _horizon_fits(self) -> "StudyConfig":
        # H̄ pools at most max_new_tokens steps and L̄ at most min_reference_tokens for the shortest
        # reference: a longer T pools H̄ and L̄ over different steps, and since h_t rises with t EntCE
        # would be biased low while the summary claims T steps.
        for field, value, what in (("max_new_tokens", self.max_new_tokens, "generations"),
                                   ("min_reference_tokens", self.min_reference_tokens, "references")):
            if self.horizon > value:
                raise ValueError(f"horizon ({self.horizon}) > {field} ({value}): H̄ and L̄ would pool different "
                                 f"steps because {what} stop at {value}; set horizon <= {value}, raise {field}, "
                                 "or leave horizon empty")
        return self

    @model_validator(mode="after")
    def _nonempty(self) -> "StudyConfig":
        for field in ("models", "datasets", "decodings"):
            if not getattr(self, field):
                raise ValueError(f"{field} is empty: give at least one")
        labels = [m.label for m in self.models]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise ValueError(f"models.{i}: its label {label!r} repeats models.{labels.index(label)}'s (runs, "
                                 "tables and fits are named by it): give each model its own name:")
        keys = [d.key for d in self.decodings]
        if len(set(keys)) != len(keys):
            raise ValueError(f"decodings repeat: {keys}")
        return self

    @model_validator(mode="after")
    def _engine_fits(self) -> "StudyConfig":
        """engine: vllm samples with vLLM's own sampler: only what it can do exactly as entcal does."""
        for m in self.models:
            if m.engine != "vllm":
                continue
            for i, d in enumerate(self.decodings):
                if d.top_nsigma > 0:
                    raise ValueError(f"decodings.{i}: top_nsigma is not a vLLM sampling parameter, and model "
                                     f"{m.label} has engine: vllm; use engine: entcal for top-nσ")
                for knob, what, off in _NOT_IN_VLLM:
                    if getattr(d, knob) != off:
                        raise ValueError(f"decodings.{i}: {knob} is not a vLLM sampling parameter, and model "
                                         f"{m.label} has engine: vllm; use engine: entcal for {what}")
                if d.min_p > 0 and d.top_p < 1:  # (with top_k the two orders keep the same tokens)
                    raise ValueError(f"decodings.{i}: vLLM applies min_p before top_p, entcal after it "
                                     f"(transformers' order), and model {m.label} has engine: vllm; drop one "
                                     "of them, or use engine: entcal")
                if d.temperature < 0.01 or 0 < d.min_p <= 1e-5:
                    raise ValueError(f"decodings.{i}: vLLM raises a temperature below 0.01 to 0.01 and ignores a "
                                     f"min_p of 1e-5 or less, and model {m.label} has engine: vllm; use larger "
                                     "values, or engine: entcal")
            c = self.calibration
            own = c.methods if c else []
            if own:
                raise ValueError(f"calibration: {', '.join(own)} sample{'s' if len(own) == 1 else ''} through entcal's "
                                 f"own sampler, and model "
                                 f"{m.label} has engine: vllm; set calibration.{own[0]}: false (and the others), or "
                                 "engine: entcal")
            if c and c.top_nsigma:
                raise ValueError(f"calibration.top_nsigma: top-nσ is not a vLLM sampling parameter, and model "
                                 f"{m.label} has engine: vllm; set calibration.top_nsigma: [] or engine: entcal")
            for knob, what, _ in _NOT_IN_VLLM:
                if c and getattr(c, knob):
                    raise ValueError(f"calibration.{knob}: {what} is not a vLLM sampling parameter, and model "
                                     f"{m.label} has engine: vllm; set calibration.{knob}: [] or engine: entcal")
        return self

    def digest(self) -> str:
        """A short content hash of the whole config (provenance, cache keys)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def loc_name(loc: tuple) -> str:
    """The field's own name in a pydantic error location (``decodings.0.temperature`` -> ``temperature``)."""
    names = [str(p) for p in loc if not isinstance(p, int)]
    return names[-1] if names else "value"


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    bound = _BOUNDS.get(first["type"])
    if bound and first.get("ctx"):
        limit = next(iter(first["ctx"].values()))
        msg = f"{loc_name(first['loc'])} must be {bound} {limit:g}, got {first.get('input')!r}"
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `entcal run --help` for the fields)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where + ': ' if where else ''}{msg}{more}"


def parse_config(data: dict, source: str = "config") -> StudyConfig:
    """Validate a dict into a StudyConfig; a mistake raises ConfigError with one line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of study fields, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> StudyConfig:
    """Read a YAML (or JSON) study config; ``overrides`` (from CLI flags) win over the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config {p}: no such file (give a YAML study config; see README 'Knobs')")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config {p}: cannot read it ({err.__class__.__name__}: {err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {p}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if isinstance(data, dict):
        data = {**data, **(overrides or {})}
    return parse_config(data, source=f"config {p}")
