"""The kept set inside a candidate buffer (torch, float64 decisions), for kernels.truncation.

A candidate buffer holds, per row, the column ids of a provable superset of what top-p (or, without
top-p, typical) keeps: at most MAX_BUFFER tokens, found by the Triton mass and compaction passes.
Everything after that rule works on the survivors, all inside the buffer, so the steps after it
(min-p, typical, ε, η, top-nσ) run here on [R, C] tensors with kernels.reference's own rules: the
same float64 decisions as the reference, on C columns instead of V.

Shapes: rows [R] (row ids into logits), ids [R, C] int32 column ids (-1 = empty slot), m [R] the
row max (float32), everything else per row [R]; returns TokenStats of [R] float32 and a [R] bool
"redo" flag (rows whose buffer turned out not to hold the rule's whole kept set: rounding only;
kernels.truncation sends them to the reference).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from entcal.kernels import reference
from entcal.kernels.reference import F64, TokenStats
from entcal.kernels.stats import finalize, scale_logits

INF = math.inf


class Rules(NamedTuple):
    """The decoding steps after top-p, with what they need from the whole row."""

    min_lo: torch.Tensor  # [N] float32: min-p's (and top-k's) lower bound on z, -inf if off
    typical_p: float
    epsilon: float
    eta: float
    top_nsigma: float
    std: torch.Tensor | None  # [N] float32: std of the row's finite z (top-nσ)


def ceil_f32(t: torch.Tensor) -> torch.Tensor:
    """The smallest float32 f >= t (t float64): for float32 z, z >= f exactly when z >= t."""
    f = t.to(torch.float32)
    up = torch.nextafter(f, torch.full_like(f, INF))
    return torch.where(f.to(F64) < t, up, f)


def gather_buffer(logits, rows, ids, temperature):
    """(cols [R, C] long, sorted, V on empty slots; z [R, C] float32, -inf on empty slots)."""
    v = logits.shape[1]
    cols = torch.where(ids < 0, torch.full_like(ids, v), ids).long()
    cols = torch.sort(cols, dim=-1).values  # column order: a stable sort breaks ties by index
    valid = cols < v
    z = scale_logits(logits[rows[:, None], cols.clamp_max(v - 1)], temperature)
    return cols, torch.where(valid, z, torch.full_like(z, -INF))


def top_p_in_buffer(z, m, total, top_p):
    """top-p keep [R, C] of a buffer holding a z-prefix of the row (all z >= some t): the prefix
    masses exp(z - m) / total in float64, total = Σ exp(z - m) over the top-k set (float64)."""
    zs, order = torch.sort(z.to(F64), dim=-1, descending=True, stable=True)
    probs = (zs - m.to(F64)[:, None]).exp() / total[:, None]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = mass_before < top_p - reference.MASS_TOL
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def typical_in_buffer(z, keep, lse, ent, typical_p):
    """(typical keep [R, C], reached [R]) of a buffer holding the tokens nearest the centre
    lse - H; lse and H (float64 [R]) are those of the whole set the rule applies to."""
    logq = torch.where(keep, z.to(F64) - lse[:, None], torch.full_like(lse[:, None], -INF))
    return reference.typical_rule(logq, ent[:, None], typical_p)


def buffer_stats(logits, rows, targets, temperature, ids, m, rules: Rules, *, top_p=None,
                 total=None, typical=None):
    """TokenStats of rows `rows` whose first buffered rule's kept set lies in buffers ids [R, C].

    top_p / total: top-p is the buffered rule (total [R] float64 over the top-k set);
    typical = (lse [R], H [R]) float64 of the min-p survivors: typical is the buffered rule.
    """
    cols, z = gather_buffer(logits, rows, ids, temperature)
    keep = (z > -INF) & (z >= rules.min_lo[rows][:, None])
    redo = torch.zeros(rows.shape[0], dtype=torch.bool, device=z.device)
    if top_p is not None:
        keep &= top_p_in_buffer(z, m, total, top_p)
    if typical is not None:
        kt, reached = typical_in_buffer(z, keep, typical[0], typical[1], rules.typical_p)
        keep &= kt
        redo |= ~reached
    elif rules.typical_p < 1.0:
        keep &= reference.typical_keep(reference.masked64(z, keep), rules.typical_p)
    if rules.epsilon > 0.0:
        keep &= reference.epsilon_keep(reference.masked64(z, keep), rules.epsilon)
    if rules.eta > 0.0:
        keep &= reference.eta_keep(reference.masked64(z, keep), rules.eta)
    if rules.top_nsigma > 0.0:
        mk = z.masked_fill(~keep, -INF).max(-1, keepdim=True).values
        keep &= z >= mk - rules.top_nsigma * rules.std[rows][:, None]
    return _stats(logits, rows, targets, temperature, cols, z, keep), redo


def _stats(logits, rows, targets, temperature, cols, z, keep) -> TokenStats:
    """Entropy, logsumexp, target log-prob of the kept buffer tokens (shifted float32 sums)."""
    mk = z.masked_fill(~keep, -INF).max(-1).values
    mk = torch.where(mk > -INF, mk, torch.zeros_like(mk))
    d = torch.where(keep, z - mk[:, None], torch.zeros_like(z))
    below = keep & (d < 0)
    e = torch.where(below, d.exp(), torch.zeros_like(z))
    c_k, r_k, w_k = (keep & (d == 0)).sum(1).float(), e.sum(1), (e * d).sum(1)
    if targets is None:
        return finalize(mk, c_k, r_k, w_k, None)
    t = targets.to(device=cols.device, dtype=torch.long)[rows]
    hit = ((cols == t[:, None]) & keep).any(1)
    zt = scale_logits(logits[rows, t], temperature)
    st = finalize(mk, c_k, r_k, w_k, zt)
    lp = torch.where(hit, st.target_logprob, torch.full_like(zt, -INF))
    return TokenStats(st.entropy, st.logsumexp, lp)


__all__ = ["Rules", "ceil_f32", "gather_buffer", "top_p_in_buffer", "typical_in_buffer",
           "buffer_stats"]
