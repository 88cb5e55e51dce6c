"""Teacher-forced scoring of human continuations under each decoding distribution.

For every reference token y_t (the human continuation, prompt fed in) and every decoding q:
  step_logloss            = −log((1−ε)·q_t(y_t) + ε·p_t(y_t))   (p_t: temperature only, untruncated;
                             equals −log q_t(y_t) when nothing is truncated)
  step_logloss_untruncated = −log p_t(y_t)
  step_entropy            = H(q_t) along the human text
  step_truncated          = y_t was truncated away by q_t (its share is the diversity cost)

One forward pass per batch serves every decoding. When the LM head is a plain linear layer the
stats come from the final hidden states through ``kernels.fused_token_stats`` (Triton on CUDA:
the [tokens, vocabulary] logits never exist); truncated decodings materialise logits a block
of rows at a time. Memory is proportional to tokens, not tokens × vocabulary.

``right_pad`` and ``teacher_forced`` (the one teacher-forced forward: right-padded context +
continuation, the states that predict each continuation token) also serve tasks/atoms.py and the
future-entropy regressor (tasks/future.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import polars as pl
import torch

from entcal import kernels
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import REFERENCE_SCHEMA, ScoringKnobs
from entcal.tasks.models import LoadedModel, input_device

ROW_BLOCK = 512  # rows of logits materialised at once for truncated decodings
_SOFTCAP_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_lm_head(model) -> torch.Tensor | None:
    """The [V, D] weight when logits = decoder(x) @ W.T exactly, else None."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.device.type == "meta":
        return None  # (meta: accelerate offloaded the head; the model's own logits are used)
    if any(getattr(model.config, k, None) not in (None, 1, 1.0) for k in _SOFTCAP_KEYS):
        return None
    return head.weight


def q_stats(rows: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
            decoding: DecodingSpec, on_block: Callable[[int, torch.Tensor], None] | None = None) -> kernels.TokenStats:
    """H(q) and log q(target) per row under the decoding: fused with the LM head when nothing is truncated
    (``rows`` hidden states [N, D], ``weight`` [V, D]), else from logits ``ROW_BLOCK`` rows at a time;
    then ``on_block(first row, logits [≤ ROW_BLOCK, V])`` sees each block's logits (engine: vllm's support
    check reads the same logits as the statistics)."""
    if weight is not None and not decoding.truncated:
        return kernels.fused_token_stats(rows, weight, targets, temperature=decoding.temperature)
    weight = None if weight is None else weight.float()  # once, not per block
    blocks = []
    for i in range(0, rows.shape[0], ROW_BLOCK):
        logits = _logits(rows[i : i + ROW_BLOCK], weight)
        blocks.append(kernels.token_stats(logits, targets[i : i + ROW_BLOCK], **decoding.kernel_kwargs()))
        if on_block is not None:
            on_block(i, logits)
    return kernels.TokenStats(*(torch.cat(c) for c in zip(*blocks)))


def _logits(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Float32 logits of a block of rows: hidden states through the plain LM head, or logits as they are."""
    return rows.float() @ weight.float().T if weight is not None else rows


def decoding_stats(rows: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
                   decoding: DecodingSpec, epsilon: float) -> dict[str, torch.Tensor]:
    """Per-row scores for one decoding. ``rows`` are hidden states [N, D] (weight given) or logits [N, V]."""
    t = decoding.temperature
    if weight is not None and not decoding.truncated:
        full = kernels.fused_token_stats(rows, weight, targets, temperature=t)
        return {"logloss": -full.target_logprob, "logloss_untruncated": -full.target_logprob,
                "entropy": full.entropy, "truncated": torch.zeros_like(full.entropy, dtype=torch.bool)}
    parts = []
    for i in range(0, rows.shape[0], ROW_BLOCK):
        block = rows[i : i + ROW_BLOCK]
        logits = _logits(block, weight)
        y = targets[i : i + ROW_BLOCK]
        q = kernels.token_stats(logits, y, **decoding.kernel_kwargs())
        p = kernels.token_stats(logits, y, temperature=t)
        mixed = torch.logaddexp(math.log1p(-epsilon) + q.target_logprob, math.log(epsilon) + p.target_logprob)
        parts.append((-mixed, -p.target_logprob, q.entropy, torch.isneginf(q.target_logprob)))
    cols = [torch.cat(c) for c in zip(*parts)]
    return dict(zip(("logloss", "logloss_untruncated", "entropy", "truncated"), cols))


def right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] (each sequence, then ``pad_id`` up to the longest) and attention mask [B, L]
    (1 on the sequence's tokens), int64 on ``device``."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


@dataclass
class TeacherForced:
    """One forward over each context + continuation (right-padded, batch rows in order).

    rows [N, ·], N = all continuation tokens (row by row): the state at position len(context) − 1 + j,
    the one that predicts continuation token j: final hidden states [N, D] when ``weight`` (the plain LM
    head's [V, D]) is given or hidden states were asked for, else logits [N, V]. targets [N]: the
    continuation tokens. lengths: continuation length per batch row. mask [B, L]: the batch's attention
    mask. cache: the batch's KV cache when asked for, else None."""

    rows: torch.Tensor
    weight: torch.Tensor | None
    targets: torch.Tensor
    lengths: list[int]
    mask: torch.Tensor
    cache: object | None


@torch.inference_mode()
def teacher_forced(model, contexts: list[list[int]], continuations: list[list[int]], *, pad_id: int = 0,
                   hidden: bool = False, use_cache: bool = False) -> TeacherForced:
    """Feed every context + continuation in one batch. Through the decoder alone (final hidden states)
    when the LM head is plain or ``hidden``; through the whole model (logits) otherwise."""
    device = input_device(model)
    ids, mask = right_pad([c + r for c, r in zip(contexts, continuations)], pad_id, device)
    weight = plain_lm_head(model)
    if weight is not None or hidden:
        out = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=use_cache)
        states = out.last_hidden_state
    else:
        out = model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
        states = out.logits
    rows = torch.cat([states[i, len(c) - 1 : len(c) - 1 + len(r)]
                      for i, (c, r) in enumerate(zip(contexts, continuations))])
    if weight is not None:  # spread over GPUs (device_map auto): the last layer's GPU -> the LM head's
        rows = rows.to(weight.device)
    targets = torch.cat([torch.tensor(r, dtype=torch.long) for r in continuations]).to(rows.device)
    return TeacherForced(rows, weight, targets, [len(r) for r in continuations], mask,
                         out.past_key_values if use_cache else None)


@torch.inference_mode()
def score_batch(model, contexts: list[list[int]], continuations: list[list[int]],
                decodings: list[DecodingSpec], *, epsilon: float, pad_id: int = 0) -> list[dict[str, dict]]:
    """Score each continuation after its context. Returns, per example, {decoding key: column lists}."""
    tf = teacher_forced(model, contexts, continuations, pad_id=pad_id)
    out = [dict() for _ in contexts]
    for dec in decodings:
        cols = decoding_stats(tf.rows, tf.weight, tf.targets, dec, epsilon)
        split = {k: v.cpu().split(tf.lengths) for k, v in cols.items()}
        for i in range(len(contexts)):
            out[i][dec.key] = {k: split[k][i].tolist() for k in split}
    return out


def score(lm: LoadedModel, prompts: pl.DataFrame, decodings: list[DecodingSpec], knobs: ScoringKnobs, *,
          progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """The reference table: the human references of ``prompts`` scored under every decoding, one row per
    example × decoding, over the first ``knobs.max_tokens`` reference tokens, ``knobs.batch_size`` examples
    per forward (longest first); truncated decodings are ε-mixed (``knobs.epsilon``)."""
    ids = prompts["example_id"].to_list()
    ctx = prompts["prompt_ids"].to_list()
    ref = [r[: knobs.max_tokens] for r in prompts["reference_ids"].to_list()]
    order = sorted(range(len(ids)), key=lambda i: -(len(ctx[i]) + len(ref[i])))
    scored: dict[int, dict] = {}
    for b in range(0, len(order), knobs.batch_size):
        idx = order[b : b + knobs.batch_size]
        res = score_batch(lm.model, [ctx[i] for i in idx], [ref[i] for i in idx], decodings, epsilon=knobs.epsilon,
                          pad_id=lm.pad_id)
        scored.update(zip(idx, res))
        if progress:
            progress(len(scored), len(ids))
    data = []
    for dec in decodings:
        for i, ex in enumerate(ids):
            c = scored[i][dec.key]
            data.append({"example_id": ex, "decoding": dec.key, "step_logloss": c["logloss"],
                         "step_logloss_untruncated": c["logloss_untruncated"],
                         "step_entropy": c["entropy"], "step_truncated": c["truncated"]})
    return pl.DataFrame(data, schema=REFERENCE_SCHEMA)
