"""Pure-PyTorch reference for the statistics of one logits row.

This is the ground truth every Triton kernel is tested against, and the CPU path.
Semantics (docs/DESIGN.md, "Kernel API"): z = logits / temperature, then top-k, then top-p on the
renormalised result, then min-p, then top-nσ; each step keeps at least one token.

All outputs are float32 (or float64 with ``dtype=torch.float64``), in nats.
"""
from __future__ import annotations

import math

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-row statistics of the sampling distribution q; every field is [N] float32, nats."""

    entropy: torch.Tensor  # H(q) of the (truncated) sampling distribution
    logsumexp: torch.Tensor  # log Σ_kept exp(logit/τ)
    target_logprob: torch.Tensor  # log q(target); -inf if truncated away, NaN without targets


def truncation_mask(
    z: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
) -> torch.Tensor | None:
    """Boolean mask[N, V] of the tokens a decoding keeps, or None when nothing is truncated.

    ``z`` are temperature-scaled logits [N, V] (float32/float64). Ties follow transformers:
    top-k keeps every token equal to the k-th largest; top-p keeps the smallest prefix of a
    stable descending sort whose mass reaches p; min-p keeps z >= max + log(min_p); top-nσ keeps
    z >= max − n·σ with σ the standard deviation of the whole row's finite z (as in the top-nσ paper),
    not of the survivors of the steps before. A row with no finite entry has NaN entropy.
    """
    n, v = z.shape
    keep = None
    if top_k and top_k < v:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        keep = z >= kth
    if top_p < 1.0:
        zk = z if keep is None else z.masked_fill(~keep, -math.inf)
        order = torch.sort(zk, dim=-1, descending=True, stable=True).indices
        probs = torch.softmax(zk, dim=-1).gather(-1, order)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep_sorted = mass_before < top_p
        keep_sorted[:, 0] = True
        kp = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        keep = kp if keep is None else keep & kp
    if min_p > 0.0:
        m = z.max(dim=-1, keepdim=True).values  # the max token is kept by every step above
        kp = z >= m + math.log(min_p)
        keep = kp if keep is None else keep & kp
    if top_nsigma > 0.0:
        finite = torch.isfinite(z)
        zf = torch.where(finite, z, torch.zeros_like(z))
        cnt = finite.sum(-1, keepdim=True).clamp_min(1)
        mean = zf.sum(-1, keepdim=True) / cnt
        var = (torch.where(finite, (z - mean) ** 2, torch.zeros_like(z))).sum(-1, keepdim=True) / cnt
        m = z.max(dim=-1, keepdim=True).values
        kp = z >= m - top_nsigma * var.sqrt()
        keep = kp if keep is None else keep & kp
    return keep


def scaled_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits of the sampling distribution q: z = logits/τ with truncated tokens set to -inf."""
    z = logits.to(dtype) / temperature
    keep = truncation_mask(z, top_k=top_k, top_p=top_p, min_p=min_p, top_nsigma=top_nsigma)
    return z if keep is None else z.masked_fill(~keep, -math.inf)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
):
    """Entropy[N], logsumexp[N] and target log-prob[N] of q = truncate(softmax(logits/τ)).

    logsumexp is over the kept tokens of z = logits/τ. A target outside the kept set has
    log-prob -inf. Without targets, target_logprob is all NaN.
    """
    z = scaled_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        top_nsigma=top_nsigma, dtype=dtype,
    )
    lse = torch.logsumexp(z, dim=-1)
    logq = z - lse[:, None]
    q = logq.exp()
    entropy = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    if targets is None:
        target_logprob = torch.full_like(lse, math.nan)
    else:
        target_logprob = logq.gather(-1, targets.long()[:, None]).squeeze(-1)
    out = torch.float32 if dtype != torch.float64 else torch.float64
    return TokenStats(entropy.to(out), lse.to(out), target_logprob.to(out))


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    dtype: torch.dtype = torch.float32,
):
    """token_stats(hidden @ weight.T, ...) computed a block of rows at a time.

    Peak extra memory is chunk_rows × V floats (plus a float32 copy of a low-precision weight), not N × V.
    """
    parts = []
    w = weight.to(dtype)  # cast once, not per chunk
    for i in range(0, hidden.shape[0], chunk_rows):
        h = hidden[i : i + chunk_rows].to(dtype)
        logits = h @ w.T
        t = None if targets is None else targets[i : i + chunk_rows]
        parts.append(token_stats(logits, t, temperature=temperature, dtype=dtype))
    if not parts:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return TokenStats(empty, empty, empty)
    return TokenStats(*(torch.cat(x) for x in zip(*parts)))
