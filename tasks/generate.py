"""Batched sampling with a KV cache, recording the entropy of the sampling distribution per step.

Not ``model.generate``: we own the loop so that, at every step, the full entropy H(q_t) of the
distribution we sample from (temperature, top-k, top-p, min-p, top-nσ) and the sampled token's
log-prob come out of ``kernels.token_stats`` on the same logits the token was drawn from.

One distribution, one rounding: those logits are float32, hidden.float() @ W.float().T from the
decoder's final hidden state when the LM head is plain (``tasks.score.plain_lm_head``), i.e. the
rounding tasks/score.py scores human text with, not the model-dtype (bf16) logits of ``model(...)``;
other heads fall back to the model's logits as float32.

Paired, reproducible draws: every (example, sample) row owns a seed (``row_seed``: seed, example_id,
sample), and its token at step t is the Gumbel-max draw argmax_w z_w + G(seed, t, w)
(``kernels.gumbel_argmax``: the noise is a hash of the three, in float64). A row's sample depends only on
its own logits, not on which rows share its batch, on batch order or on its shard; and two decodings of
one row share their noise, so a small change of q_t changes few draws (docs/SCIENCE.md §4b). Rows are
processed longest prompt first, and finished rows are compacted out of the batch (and out of the KV
cache) so no step is spent on them.

KV cache: preallocated for prompt + max_new_tokens and written in place (transformers'
StaticCache), so a step never copies the past: a growing cache concatenates every layer's keys
and values at every step (22% of the profiled CPU time of a SmolLM2 decode step at ~100 tokens;
1.08x end to end in benchmarks/bench_generate.py). Calibration hooks (``adjust``) and models
without a static cache layout use the growing cache.

Output schema (tasks/contracts.py, docs/DESIGN.md): example_id str, sample i32, decoding str, token_ids list[i32],
step_entropy list[f32], step_logprob list[f32], finish_reason str ("eos" | "length"), text str (the
continuation decoded, special tokens skipped), tokens list[str] (each token's own text, special tokens
included; "".join(tokens) is the full decode).
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from typing import Callable

import polars as pl
import torch

from entcal import kernels
from entcal.kernels.reference import scaled_logits
from entcal.storage.errors import UserError
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import GENERATIONS_SCHEMA, GenerationKnobs
from entcal.tasks.models import LoadedModel, input_device
from entcal.tasks.score import plain_lm_head

log = logging.getLogger(__name__)



# adjust(step, z[N, V], kv cache, attention mask[N, L], next positions[N, 1]) -> z̃[N, V]
Adjust = Callable[[int, torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLogits(UserError, RuntimeError):
    """The model produced NaN or +inf logits: the message names the example and the step."""


def row_seed(seed: int, example_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{example_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def new_cache(model, max_len: int, kind: str):
    """A KV cache of ``max_len`` positions written in place (``kind="static"``), or None: the model's
    own growing cache (``"dynamic"``, or a model whose layers have no static layout)."""
    if kind == "dynamic":
        return None
    if kind != "static":
        raise ValueError(f"cache: expected 'static' or 'dynamic', got {kind!r}")
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except (KeyError, ValueError, TypeError, NotImplementedError) as err:
        log.info("no static KV cache for %s (%s): using the growing cache", type(model).__name__, err)
        return None


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def decode_module(model, compiled: bool):
    """The module a decode step calls: the decoder alone when the LM head is plain (``plain_lm_head``: its
    final hidden states go through ``head_logits``), else the whole model; with ``compiled``,
    ``torch.compile`` of it (once per module and process) over the static cache, on CUDA in
    "reduce-overhead" mode: every step replays a CUDA graph instead of launching each layer's kernels
    from Python. The LM head stays outside the graph."""
    base = model if plain_lm_head(model) is None else model.get_decoder()
    if not compiled:
        return base
    if base not in _COMPILED:
        cuda = next(model.parameters()).device.type == "cuda"
        _COMPILED[base] = torch.compile(base, mode="reduce-overhead" if cuda else None)
    return _COMPILED[base]


def head_logits(out, weight: torch.Tensor | None) -> torch.Tensor:
    """Float32 logits [N, V] at each row's last position of a decode step's output: its final hidden state
    [N, D] @ weight[V, D].T in float32 (the rounding tasks/score.py scores with), or the model's own logits
    as float32 when ``weight`` (the plain LM head) is None."""
    if weight is None:
        return out.logits[:, -1].float()
    return out.last_hidden_state[:, -1].float().to(weight.device) @ weight.T  # spread: last GPU -> the head's


def _compact(cache, keep: torch.Tensor, static: bool, compiled: bool) -> None:
    """Drop finished rows from the KV cache (a static cache keeps its length: index_select per layer)."""
    if not static:
        cache.batch_select_indices(keep)
        return
    cache.reorder_cache(keep)
    if compiled:  # new tensors: tell the compiler their addresses stay fixed, so CUDA graphs keep replaying
        for layer in cache.layers:
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


@torch.inference_mode()
def sample_batch(
    lm: LoadedModel,
    prompts: list[list[int]],
    seeds: list[int],
    decoding: DecodingSpec,
    *,
    max_new_tokens: int,
    on_step: Callable[[int], None] | None = None,
    row_names: list[str] | None = None,
    adjust: Adjust | None = None,
    kv_cache: str = "static",
) -> list[dict]:
    """Sample one continuation per prompt from ``lm`` (its EOS ids end a row, its pad id pads, its
    ``compiled`` compiles the decode step over the static cache). Returns per row: token_ids, step_entropy,
    step_logprob, finish_reason. ``on_step(n_tokens)`` is called after each decode step with the tokens it made.

    Statistics and draw share one z[N, V] per step: ``scaled_logits`` of float32 logits from the final
    hidden state through the plain LM head (``head_logits``; the model's logits as float32 otherwise),
    then ``adjust``; entropy and log-prob by ``kernels.token_stats(z)``, the token by ``kernels.gumbel_argmax(z)``
    with the noise of (row seed, step, token).

    ``adjust(t, z, cache, mask, positions) -> z̃`` reshapes the sampling distribution's logits before
    the draw (reweighted sampling, tasks/atoms.py); entropy and log-prob are then those of z̃.
    ``kv_cache``: "static" (preallocated, in place; the growing cache when ``adjust`` is set) or "dynamic".

    Tokens and statistics stay on the device until the batch ends: the host waits on the device only
    to drop rows that hit EOS (when there are EOS ids) and once at the end; NaN / +inf logits are
    raised (naming the example and the first bad step) at the next such wait."""
    model, eos_ids, pad_id = lm.model, lm.eos_ids, lm.pad_id
    device = input_device(model)
    n, steps = len(prompts), max_new_tokens
    words = kernels.seed_words(seeds).to(device)  # each row's draws: a function of its seed, step and token
    ids, mask = left_pad(prompts, pad_id, device)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    static = new_cache(model, width + steps, "dynamic" if adjust is not None else kv_cache)
    compiled = lm.compiled and static is not None
    if static is not None:  # the mask spans the whole cache; column width + t opens when token t is fed
        mask = torch.cat([mask, torch.zeros((n, steps), dtype=mask.dtype, device=device)], dim=-1)
    head = plain_lm_head(model)
    head = None if head is None else head.float()  # once per batch: a no-op for a float32 model
    keep_last = {"logits_to_keep": 1} if head is None else {}
    out = decode_module(model, False)(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      past_key_values=static, use_cache=True, **keep_last)
    cache = out.past_key_values
    logits, next_pos = head_logits(out, head).to(device), positions[:, -1:] + 1  # spread: the head's GPU -> the rows'
    step_module = decode_module(model, compiled)
    graphs = compiled and device.type == "cuda"
    alive = torch.arange(n, device=device)  # original row index of each batch row
    tok_out = torch.zeros((n, steps), dtype=torch.long, device=device)
    ent_out = torch.zeros((n, steps), dtype=torch.float32, device=device)
    lp_out = torch.zeros((n, steps), dtype=torch.float32, device=device)
    length = torch.full((n,), steps, dtype=torch.long, device=device)  # tokens made, EOS included
    first_bad = torch.full((n,), steps, dtype=torch.long, device=device)  # first step with NaN / +inf logits
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    kw = decoding.kernel_kwargs()
    for t in range(steps):
        bad = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)  # -inf is a legitimate mask
        first_bad[alive] = torch.minimum(first_bad[alive], torch.where(bad, t, steps))
        z = scaled_logits(logits, **kw)  # temperature and truncation applied once per step
        if adjust is not None:
            z = adjust(t, z, cache, mask, next_pos)
        tok = kernels.gumbel_argmax(z, words[alive], t)
        stats = kernels.token_stats(z, tok)  # z is already q's logits: τ = 1, nothing left to truncate
        tok_out[alive, t], ent_out[alive, t], lp_out[alive, t] = tok, stats.entropy, stats.target_logprob
        if on_step:
            on_step(alive.numel())
        if t == steps - 1:
            break
        if eos is not None:
            done = torch.isin(tok, eos)
            if done.any():  # the one per-step wait on the device, and only with EOS ids
                _raise_if_bad(first_bad, steps, row_names)
                length[alive[done]] = t + 1
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                _compact(cache, keep, static is not None, compiled)
                alive, tok, mask, next_pos = alive[keep], tok[keep], mask[keep], next_pos[keep]
        if static is not None:
            mask[:, width + t] = 1
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = step_module(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                          use_cache=True, **keep_last)
        cache = out.past_key_values
        logits, next_pos = head_logits(out, head).to(device), next_pos + 1
    _raise_if_bad(first_bad, steps, row_names)
    finished = length < steps
    if eos is not None:  # a row whose token at the final step is EOS finished by EOS too
        finished |= torch.isin(tok_out[:, -1], eos)
    lengths, fin = length.tolist(), finished.tolist()
    toks, ents, lps = tok_out.tolist(), ent_out.tolist(), lp_out.tolist()
    return [
        {"token_ids": toks[i][:k], "step_entropy": ents[i][:k], "step_logprob": lps[i][:k],
         "finish_reason": "eos" if fin[i] else "length"}
        for i, k in enumerate(lengths)
    ]


def _raise_if_bad(first_bad: torch.Tensor, steps: int, row_names: list[str] | None) -> None:
    """NaN / +inf logits seen so far (``first_bad[row] < steps``): name the first such example and its step."""
    t = int(first_bad.min())
    if t >= steps:
        return
    row = int(first_bad.argmin())
    name = row_names[row] if row_names else str(row)
    raise NonFiniteLogits(f"NaN or +inf in the model's logits for example {name} at generation step {t} "
                          "(try dtype: float32, or check the model's weights)")


def generate(lm: LoadedModel, prompts: pl.DataFrame, decoding: DecodingSpec, knobs: GenerationKnobs, *,
             progress: Callable[[int, int], None] | None = None, adjust: Adjust | None = None,
             key: str | None = None, kv_cache: str = "static") -> pl.DataFrame:
    """The generations table of ``prompts`` under one decoding: ``knobs.samples_per_prompt`` rows per prompt,
    ``knobs.max_new_tokens`` steps at most, ``knobs.batch_size`` rows per batch, each row's draws seeded by
    (``knobs.seed``, example, sample). ``progress(done_rows, total_rows)`` after each batch; ``adjust`` and
    ``kv_cache`` as in sample_batch; ``key`` names the decoding column (default: the decoding's key)."""
    jobs = [
        (ex, s, p) for ex, p in zip(prompts["example_id"].to_list(), prompts["prompt_ids"].to_list())
        for s in range(knobs.samples_per_prompt)
    ]
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][2]))  # longest first: OOM on batch one
    results: dict[int, dict] = {}
    for b in range(0, len(order), knobs.batch_size):
        idx = order[b : b + knobs.batch_size]
        rows = sample_batch(lm, [jobs[i][2] for i in idx], [row_seed(knobs.seed, jobs[i][0], jobs[i][1]) for i in idx],
                            decoding, max_new_tokens=knobs.max_new_tokens, row_names=[jobs[i][0] for i in idx],
                            adjust=adjust, kv_cache=kv_cache)
        results.update(zip(idx, rows))
        if progress:
            progress(len(results), len(jobs))
    ids = [results[i]["token_ids"] for i in range(len(jobs))]
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    pieces = token_strings(lm.tokenizer, ids)
    data = [
        {"example_id": ex, "sample": s, "decoding": key or decoding.key, **results[i], "text": texts[i],
         "tokens": pieces[i]}
        for i, (ex, s, _) in enumerate(jobs)
    ]
    return pl.DataFrame(data, schema=GENERATIONS_SCHEMA)


def token_strings(tokenizer, rows: list[list[int]]) -> list[list[str]]:
    """Each token's own text, per row (special tokens included, so len(out[r]) == len(rows[r])).

    A character whose UTF-8 bytes span several byte-level tokens goes to the token that completes it
    (the tokens before it get ""), so "".join(out[r]) == decode(rows[r]) for valid UTF-8. Each distinct id is decoded
    once. SentencePiece decoders that strip a leading space do so per token here too."""
    uniq = sorted({i for r in rows for i in r})
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    piece = dict(zip(uniq, tokenizer.batch_decode([[i] for i in uniq], **kw)))
    out = []
    for ids in rows:
        strs: list[str] = []
        pending: list[int] = []
        for k, i in enumerate(ids):
            pending.append(i)
            s = piece[i] if len(pending) == 1 else tokenizer.decode(pending, **kw)
            if s.endswith("\ufffd") and len(pending) < 4 and k + 1 < len(ids):
                continue  # an incomplete character: its remaining bytes come in the next tokens
            strs += [""] * (len(pending) - 1) + [s]
            pending = []
        out.append(strs)
    return out
