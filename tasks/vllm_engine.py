"""``engine: vllm``: vLLM samples the tokens, entcal re-scores every step exactly.

vLLM's offline ``LLM.generate`` draws each (example, sample) row with its own seed (``row_seed``,
as the entcal sampler seeds its rows) under temperature, top-k, top-p and min-p, with continuous
batching and paged attention; ``batch_size`` is its ``max_num_seqs``. It reports the processed
log-prob of each sampled token (``logprobs_mode="processed_logprobs"``: after temperature and
truncation), but never the full distribution. So entcal then feeds prompt + generation
teacher-forced through the transformers copy of the model and computes H(q_t) and log q_t(token)
at every step with the kernels (``tasks.score.q_stats``: fused with the LM head when nothing is
truncated, so no [tokens × vocabulary] float32 logits exist): the paper's method, and the same
numbers the entcal sampler records. The generations table has the same schema either way.

The fidelity check between the two engines is ``agreement``: |log q_t(token) re-scored − vLLM's|
over the sampled tokens (mean, max), how many tokens vLLM drew that entcal's truncation excludes
("support mismatches": a top-p boundary that rounds differently), and for truncated decodings whether
vLLM sampled each step from a larger or smaller set than entcal re-scores and the entropy that difference
implies (``tasks.vllm_support``: vLLM's processed log-probs of its top ``TOP_L`` tokens per step against
the re-score's kept set on the same logits). It is logged to the child run.

Weights: a hub id or a ``save_pretrained`` directory goes to vLLM as it is. A GGUF file (the bundled
SmolLM2 included) is dequantised once by transformers into a plain safetensors directory under
``$ENTCAL_STATE_DIR/weights/`` (written to a temporary name, then renamed: never half-written).

Engines are cached per process (one at a time: it holds the device's memory), so the shards of a
(model, decoding) that run in one warm worker start vLLM once.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from entcal.storage.settings import state_dir
from entcal.tasks.config import ConfigError, DecodingSpec, ModelSpec
from entcal.tasks.contracts import GENERATIONS_SCHEMA, GenerationKnobs
from entcal.tasks.generate import row_seed, token_strings
from entcal.tasks.models import LoadedModel, load_model, max_positions, pick_device, pinned, source_of
from entcal.tasks.score import q_stats, teacher_forced
from entcal.tasks.vllm_support import TOP_L, StepSupport, compare, entcal_side, summarize, top_l

log = logging.getLogger(__name__)

RESCORE_TOKENS = 32768  # tokens per teacher-forced re-scoring forward (vLLM's batch may be far larger)
CPU_KV_CACHE_SLACK = 2.0  # CPU: KV cache bytes = this × what max_num_seqs full-length rows need,
CPU_KV_CACHE_MIN = 64 << 20  # and at least this (vLLM needs whole cache blocks)


def weights(spec: ModelSpec) -> str:
    """What vLLM loads: the hub id, the model directory, or a GGUF file dequantised to safetensors once."""
    src, gguf = source_of(spec)
    if gguf is None:
        return src
    path = Path(src) / gguf
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}\x00{stat.st_size}\x00{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = state_dir() / "weights" / f"{path.stem}-{digest}"
    if not (out / "config.json").is_file():
        _dequantise(spec, out)
    return str(out)


def _dequantise(spec: ModelSpec, out: Path) -> None:
    """The GGUF model as a plain (unquantised) transformers model in ``out``: weights, config, tokenizer."""
    import copy

    from transformers import AutoModelForCausalLM

    lm = load_model(spec)  # the re-scoring copy: transformers dequantises GGUF weights on load
    config = copy.deepcopy(lm.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what is saved is plain, in the copy's dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=lm.model.dtype)
    plain.load_state_dict(lm.model.state_dict())
    plain.generation_config = lm.model.generation_config
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantised %s to %s for vLLM", spec.label, out)


def max_model_len(prompt_len: int, max_new_tokens: int, limit: int | None = None) -> int:
    """vLLM's context length for a shard: prompt + generation, rounded up to 1024 so every shard of a
    study shares one engine, at most the model's ``limit`` (its max_position_embeddings)."""
    need = prompt_len + max_new_tokens
    rounded = -(-need // 1024) * 1024
    return max(need, min(rounded, limit) if limit else rounded)


_ENGINE: dict = {}  # the one engine of this process: {"key": (spec json, context, max_num_seqs), "llm": LLM}
_STARTS = [0]


def engine(spec: ModelSpec, context: int, max_num_seqs: int):
    """The vLLM engine for ``spec`` in this process: started once, kept warm for the next shard; another
    model (or context / batch size) first shuts the old one down (two engines would share one device)."""
    key = (spec.model_dump_json(), context, max_num_seqs)
    if _ENGINE.get("key") != key:
        close()
        _ENGINE["llm"] = _start(spec, context, max_num_seqs)
        _ENGINE["key"] = key
        _STARTS[0] += 1
    return _ENGINE["llm"]


def starts() -> int:
    """vLLM engines started by this process so far."""
    return _STARTS[0]


def current():
    """This process's warm vLLM engine (an ``LLM``), or None."""
    return _ENGINE.get("llm")


def close() -> None:
    """Shut down this process's engine, if any, and free its device memory and distributed state."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.pop("key", None)
    if llm is None:
        return
    core = getattr(llm.llm_engine, "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()
    del llm, core
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


def _start(spec: ModelSpec, context: int, max_num_seqs: int):
    device = pick_device(spec.device)
    cpu = device.type == "cpu"
    if cpu:
        # the engine core in this process: a CPU engine starts in seconds, and a Ray worker needs no spawn
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoConfig
    from vllm import LLM

    src = weights(spec)
    eager = spec.compile == "off" or (spec.compile == "auto" and cpu)
    kw: dict = dict(model=src, tokenizer=src, revision=spec.revision, tokenizer_revision=spec.revision,
                    dtype={"auto": "float32" if cpu else "bfloat16"}.get(spec.dtype, spec.dtype), seed=0,
                    max_model_len=context, max_num_seqs=max_num_seqs, logprobs_mode="processed_logprobs",
                    max_logprobs=max(20, TOP_L),
                    tensor_parallel_size=spec.tensor_parallel_size, enforce_eager=eager,
                    generation_config="vllm", disable_log_stats=True)
    if eager:
        kw["compilation_config"] = {"mode": 0}  # no torch.compile either: CPU start-up drops from ~90 s to ~5 s
    if cpu:  # on CPU vLLM reads gpu_memory_utilization as a share of RAM: size the KV cache instead
        cfg = AutoConfig.from_pretrained(src, revision=spec.revision)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_token = 2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", heads) * head_dim * 4
        kw["kv_cache_memory_bytes"] = max(CPU_KV_CACHE_MIN, int(CPU_KV_CACHE_SLACK * per_token * context * max_num_seqs))
    else:
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
    log.info("starting vLLM for %s from %s (%s, tensor parallel %d, context %d, %d sequences at once)",
             spec.label, src, kw["dtype"], spec.tensor_parallel_size, context, max_num_seqs)
    try:
        llm = LLM(**kw)
    except (OSError, ValueError) as err:  # pydantic's ValidationError too: its last line says what is wrong
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = lines[-1] if len(lines) > 1 and "validation error" in lines[0] else (lines or [repr(err)])[0]
        raise ConfigError(f"model {spec.label}: vLLM cannot start with it from {src} ({why[:240]})") from None
    return llm


def sampling_params(decoding: DecodingSpec, *, max_new_tokens: int, seed: int, eos_ids: tuple[int, ...],
                    logprobs: int = 0):
    """vLLM's SamplingParams for one row: the decoding, its seed, the sampled token's processed log-prob and
    those of vLLM's top ``logprobs`` tokens at each step (flat: a few lists per row, not a dict per step)."""
    from vllm import SamplingParams

    # ignore_eos: stop at entcal's EOS ids (the model's generation config), not also at the tokenizer's
    return SamplingParams(temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p,
                          min_p=decoding.min_p, max_tokens=max_new_tokens, seed=seed, logprobs=logprobs,
                          flat_logprobs=True, stop_token_ids=list(eos_ids), ignore_eos=True, detokenize=False)


def drawn_logprobs(flat) -> list[float]:
    """vLLM's processed log-prob of the drawn token at each step (the first entry of each position) from
    a row's FlatLogprobs."""
    return [flat.logprobs[a] for a in flat.start_indices]


@torch.inference_mode()
def rescore(model, prompts: list[list[int]], generated: list[list[int]], decoding: DecodingSpec, *,
            batch_size: int, pad_id: int, reports: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            ) -> tuple[list[tuple[list[float], list[float]]], StepSupport | None]:
    """(H(q_t), log q_t(token)) at every generated step of every row, teacher-forced, ``batch_size`` rows
    at a time (longest first); and, given ``reports`` (per row vLLM's top-L report, ``vllm_support.top_l``)
    for a truncated decoding, the support check of every step from the same logits (steps in re-score
    order), else None."""
    check = reports is not None and decoding.truncated
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(generated[i])))
    out: dict[int, tuple[list[float], list[float]]] = {}
    parts: list[StepSupport] = []
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        tf = teacher_forced(model, [prompts[i] for i in idx], [generated[i] for i in idx], pad_id=pad_id)
        sides: list[tuple[torch.Tensor, ...]] = []
        ids = torch.cat([reports[i][0] for i in idx]) if check else None

        def entcal_block(start: int, logits: torch.Tensor) -> None:  # entcal's side, from the stats' logits
            sides.append(entcal_side(logits, ids[start : start + len(logits)], decoding))

        stats = q_stats(tf.rows, tf.weight, tf.targets, decoding, on_block=entcal_block if check else None)
        ent, lp = stats.entropy.cpu().split(tf.lengths), stats.target_logprob.cpu().split(tf.lengths)
        out.update({i: (e.tolist(), p.tolist()) for i, e, p in zip(idx, ent, lp)})
        if check:
            kept, logw, n_kept, q2 = (torch.cat(c) for c in zip(*sides))
            parts.append(compare(ids, torch.cat([reports[i][1] for i in idx]), kept, logw, n_kept, q2,
                                 stats.entropy.cpu()))
    return [out[i] for i in range(len(prompts))], (StepSupport.cat(parts) if check else None)


def agreement(rescored: list[list[float]], reported: list[list[float]], support: StepSupport | None = None) -> dict:
    """|re-scored − vLLM's| log-prob of the sampled tokens: mean and max over the tokens both give finite
    values, the count of tokens vLLM drew that the re-score puts outside the support, and the support check
    of every step (``vllm_support.summarize`` of ``support``; None: an untruncated decoding)."""
    diffs, mismatches = [], 0
    for ours, theirs in zip(rescored, reported):
        for a, b in zip(ours, theirs):
            if math.isinf(a) and not math.isinf(b):
                mismatches += 1
            elif math.isfinite(a) and math.isfinite(b):
                diffs.append(abs(a - b))
    d = torch.tensor(diffs, dtype=torch.float64)
    tokens = len(diffs) + mismatches
    return {"tokens": tokens, "logprob_abs_diff_mean": float(d.mean()) if diffs else 0.0,
            "logprob_abs_diff_max": float(d.max()) if diffs else 0.0, "support_mismatches": mismatches,
            **summarize(support, tokens)}


def generate(lm: LoadedModel, spec: ModelSpec, prompts: pl.DataFrame, decoding: DecodingSpec,
             knobs: GenerationKnobs, *, progress: Callable[[int, int], None] | None = None) -> tuple[pl.DataFrame, dict]:
    """The generations table for one decoding, sampled by vLLM (the engine of ``spec``) and re-scored by
    entcal on ``lm`` (the transformers copy of the same model: its tokenizer and EOS ids too), and the two
    engines' agreement (``agreement``). ``progress(done_rows, total_rows)`` after each chunk of rows."""
    spec = pinned(spec)  # a hub model's commit, as load_model reads it: vLLM and the re-scoring copy agree
    jobs = [(ex, s, p) for ex, p in zip(prompts["example_id"].to_list(), prompts["prompt_ids"].to_list())
            for s in range(knobs.samples_per_prompt)]
    longest = max((len(p) for _, _, p in jobs), default=1)
    llm = engine(spec, max_model_len(longest, knobs.max_new_tokens, max_positions(spec)), knobs.batch_size)
    chunk = max(8 * knobs.batch_size, 64)  # rows handed to vLLM at once: enough to keep its batch full
    width = TOP_L if decoding.truncated else 0  # untruncated: both engines keep the whole vocabulary
    ids, reported, reports, finish = [], [], [], []
    for b in range(0, len(jobs), chunk):
        part = jobs[b : b + chunk]
        params = [sampling_params(decoding, max_new_tokens=knobs.max_new_tokens, seed=row_seed(knobs.seed, ex, s),
                                  eos_ids=lm.eos_ids, logprobs=width) for ex, s, _ in part]
        for r in llm.generate([{"prompt_token_ids": list(p)} for _, _, p in part], params, use_tqdm=False):
            o = r.outputs[0]  # kept as lists and [steps, TOP_L + 1] tensors; vLLM's objects are dropped
            ids.append(list(o.token_ids))
            reported.append(drawn_logprobs(o.logprobs))
            reports.append(top_l(o.logprobs, len(o.token_ids)) if width else None)
            finish.append("eos" if o.finish_reason == "stop" else "length")
        if progress:
            progress(len(ids), len(jobs))
    rows = max(1, min(knobs.batch_size, RESCORE_TOKENS // (longest + knobs.max_new_tokens)))  # one forward's activations
    scored, support = rescore(lm.model, [p for _, _, p in jobs], ids, decoding, batch_size=rows, pad_id=lm.pad_id,
                              reports=reports if width else None)
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    pieces = token_strings(lm.tokenizer, ids)
    table = pl.DataFrame([
        {"example_id": ex, "sample": s, "decoding": decoding.key, "token_ids": ids[i], "step_entropy": scored[i][0],
         "step_logprob": scored[i][1], "finish_reason": finish[i], "text": texts[i], "tokens": pieces[i]}
        for i, (ex, s, _) in enumerate(jobs)], schema=GENERATIONS_SCHEMA)
    return table, agreement([lp for _, lp in scored], reported, support)
