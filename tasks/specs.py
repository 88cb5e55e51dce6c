"""What a study reads and how it samples: a model, a dataset, a decoding (closed pydantic records).

tasks/config.py puts them together into a StudyConfig; they are also the Prefect form's fields.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from entcal.kernels.decoding import DECODING_DESCRIPTIONS, DECODING_RANGES
from entcal.storage.errors import UserError

BUILTIN_MODELS = ("smollm2-135m",)
BUILTIN_DATASETS = ("python-docs", "python-stdlib")
PRESETS = ("wikitext-103", "writingprompts", "codecontests")
FINGERPRINT = Field(  # ModelSpec's and DatasetSpec's: how identity() names local files (tasks/identity.py)
    "stat", description="local files' identity in cache keys (docs/DESIGN.md 'Inputs by identity'): stat = each "
    "file's path under the root, size and mtime (cheap; a touch re-keys); content = sha256 of its bytes")


class ConfigError(UserError, ValueError):
    """A user mistake in a config: the message is one line that says what to fix."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Closed):
    """Which model to study. Give exactly one source: a built-in ``name``, ``hf``, ``path`` or ``gguf``."""

    name: str | None = Field(None, description="built-in alias (smollm2-135m) or a label for the run")
    hf: str | None = Field(None, description="Hugging Face hub id, e.g. Qwen/Qwen2.5-0.5B (needs network)")
    path: str | None = Field(None, description="local directory saved with save_pretrained")
    gguf: str | None = Field(None, description="path to a .gguf file (dequantised on load)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the sampler's decode step over its static KV cache (CUDA graphs on "
        "CUDA); auto = on for CUDA, off on CPU")
    family: str | None = Field(None, description="model family, for scaling fits")
    params: float | None = Field(None, description="parameter count (counted from weights if unset)")
    engine: Literal["entcal", "vllm"] = Field(
        "entcal", description="who samples: entcal's own exact sampler, or vLLM (continuous batching, paged "
        "attention), whose generations entcal then re-scores teacher-forced with its kernels")
    revision: str | None = Field(None, description="hub revision of an hf: model (branch, tag or commit), e.g. a "
                                 "training checkpoint")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one copy of the model spans: vLLM's tensor parallel size; above 1 the entcal "
        "engine and scoring spread the model over the GPUs (device_map auto); under executor: ray each "
        "model-bound task asks for this many GPUs")
    device_map: Literal["auto"] | None = Field(
        None, description="auto: accelerate spreads the weights over the machine's GPUs (then CPU memory), for "
        "models bigger than one GPU; used by the entcal engine and by scoring")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=0.95, description="engine: vllm, on CUDA: vLLM's share of each GPU's memory (weights and KV "
        "cache); the rest holds the copy that re-scores its generations")
    fingerprint: Literal["stat", "content"] = FINGERPRINT

    @property
    def spread(self) -> bool:
        """Whether transformers loads the model across devices (device_map auto)."""
        return self.device_map == "auto" or self.tensor_parallel_size > 1

    @model_validator(mode="after")
    def _placement(self) -> "ModelSpec":
        if self.revision and not self.hf:
            raise ValueError(f"revision {self.revision!r} applies to hub models (hf:); a local directory or GGUF "
                             "file has one version: drop revision, or point path: at that checkpoint's directory")
        if self.tensor_parallel_size > 1 and self.device == "cpu":
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs GPUs, but device is cpu: "
                             "set tensor_parallel_size: 1 or device: auto")
        if self.spread and self.device not in ("auto", "cuda"):
            why = "device_map: auto" if self.device_map else f"tensor_parallel_size {self.tensor_parallel_size}"
            raise ValueError(f"{why} places the model over all GPUs itself, but device is {self.device}: "
                             "leave device: auto")
        if self.engine == "vllm" and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device}: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES, not a device "
                             "index; set device: auto (and CUDA_VISIBLE_DEVICES) for engine: vllm")
        if self.spread and self.compile == "on":
            raise ValueError("compile: on needs the whole model on one device; with device_map: auto or "
                             "tensor_parallel_size > 1 set compile: auto or off")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        sources = [s for s in ("hf", "path", "gguf") if getattr(self, s)]
        if len(sources) > 1:
            raise ValueError(f"give one of hf/path/gguf, got {sources}")
        if not sources:
            if not self.name:
                raise ValueError("give a model: name (built-in alias), hf, path or gguf")
            if self.name not in BUILTIN_MODELS:
                raise ValueError(
                    f"unknown built-in model {self.name!r}; built-ins are {list(BUILTIN_MODELS)} "
                    "(for other models set hf:, path: or gguf:)"
                )
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        src = self.hf or self.path or self.gguf or "model"
        return Path(src.rstrip("/")).name.removesuffix(".gguf")


class DatasetSpec(_Closed):
    """Human text to prompt with. One of a built-in ``name``, a local ``path``, a ``preset`` or ``hf``."""

    name: str | None = Field(None, description="built-in corpus (python-docs, python-stdlib) or a label")
    path: str | None = Field(None, description="local .txt / .jsonl / .parquet file")
    preset: Literal["wikitext-103", "writingprompts", "codecontests"] | None = None
    hf: str | None = Field(None, description="Hugging Face dataset id (needs network)")
    hf_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    prompt_format: Literal["auto", "raw", "qa", "chat"] = Field(
        "auto", description="raw text, 'Q: …\\nA: ' for base models, or the model's chat template"
    )
    fingerprint: Literal["stat", "content"] = FINGERPRINT

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        sources = [s for s in ("path", "preset", "hf") if getattr(self, s)]
        if len(sources) > 1:
            raise ValueError(f"give one of path/preset/hf, got {sources}")
        if not sources:
            if not self.name:
                raise ValueError("give a dataset: name (built-in corpus), path, preset or hf")
            if self.name not in BUILTIN_DATASETS:
                raise ValueError(
                    f"unknown built-in dataset {self.name!r}; built-ins are {list(BUILTIN_DATASETS)} "
                    "(for your own text set path:)"
                )
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        src = self.preset or self.hf or self.path or "dataset"
        return Path(src.rstrip("/")).stem


def _decoding_field(name: str, default: float):
    """A pydantic Field for decoding knob `name` with its bounds and description from kernels.decoding."""
    return Field(default, description=DECODING_DESCRIPTIONS[name], **DECODING_RANGES[name])


class DecodingSpec(_Closed):
    """The sampling distribution: temperature, then top-k, top-p, min-p, typical, ε, η (transformers'
    order), then top-nσ.

    The ranges are ``Field`` constraints, so they are part of the JSON schema the Prefect UI builds its
    form from and a deployment run with an out-of-range value is refused when it is created."""

    # ranges and descriptions: kernels.DECODING_RANGES / DECODING_DESCRIPTIONS, the one table that
    # kernels.token_stats also checks its arguments against
    temperature: float = _decoding_field("temperature", 1.0)
    top_k: int = _decoding_field("top_k", 0)
    top_p: float = _decoding_field("top_p", 1.0)
    min_p: float = _decoding_field("min_p", 0.0)
    top_nsigma: float = _decoding_field("top_nsigma", 0.0)
    typical_p: float = _decoding_field("typical_p", 1.0)
    epsilon_cutoff: float = _decoding_field("epsilon_cutoff", 0.0)
    eta_cutoff: float = _decoding_field("eta_cutoff", 0.0)

    @property
    def truncated(self) -> bool:
        return (self.top_k > 0 or self.top_p < 1 or self.min_p > 0 or self.top_nsigma > 0
                or self.typical_p < 1 or self.epsilon_cutoff > 0 or self.eta_cutoff > 0)

    @property
    def key(self) -> str:
        """Canonical short name, e.g. ``t0.9``, ``t1-p0.95`` or ``t1-typ0.9-eps0.0003``: the `decoding`
        column of tables."""
        parts = [f"t{self.temperature:g}"]
        for flag, value, off in (("k", self.top_k, 0), ("p", self.top_p, 1.0), ("minp", self.min_p, 0.0),
                                 ("nsigma", self.top_nsigma, 0.0), ("typ", self.typical_p, 1.0),
                                 ("eps", self.epsilon_cutoff, 0.0), ("eta", self.eta_cutoff, 0.0)):
            if value != off:
                parts.append(f"{flag}{value:g}")
        return "-".join(parts)

    def kernel_kwargs(self) -> dict:
        return self.model_dump()
