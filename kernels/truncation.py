"""Statistics of a truncated sampling distribution (top-k, top-p, min-p, top-nsigma), no full sort.

Shapes, dtypes, units: logits [N, V] float32/bf16/fp16 (any strides), targets [N] int or None;
returns TokenStats of [N] float32 in nats, restricted to the kept set exactly as
kernels.reference.truncation_mask defines it (z = logits/temperature; top-k keeps ties at the k-th;
top-p on the top-k result keeps the smallest prefix of a stable descending sort whose mass reaches
p; min-p keeps z >= max + log(min_p); top-nsigma keeps z >= max - n*std over the finite z).

Passes (all per-element work over V is Triton; torch only touches [N], [N, V/B*k] or [N, C]):
 1. `row_state` (kernels.stats): max m, s, w and the moments of the finite z.
    min-p and top-nsigma become one threshold lo = max(m + log(min_p), m - n*std) in z units.
 2. top-k: a Triton pass writes the max of every run of 16 columns; torch.topk over those V/16
    maxima picks k runs, and torch.topk over their k*16 tokens gives the k-th largest z exactly
    (see kth_largest). Short rows (2*k*16 > V) use torch.topk on the row (a radix select).
 3a. no top-p: one masked pass of `row_state` with lo = max(lo, kth) gives S_K, W_K: done.
 3b. top-p: a "mass" pass gives, for G thresholds t_g between m and m + log((1-p-slack)/V), the
    mass and count of the top-k set above t_g. The largest t_g whose mass >= p + slack bounds the
    kept set from below (every kept token has z >= t_g; slack covers float32 cumsum rounding), so
    tokens with z >= max(t_g, lo, kth) are compacted (atomics + in-block cumsum) into a buffer of
    C <= MAX_BUFFER slots (C = exact count from the mass pass). Only that buffer is sorted and
    cumsummed in torch (stable, index order between ties, as the reference) and the statistics of
    the kept set are summed from it. Rows whose buffer would exceed MAX_BUFFER, and every row
    when 1 - p <= 2*slack, fall back to kernels.reference on those rows (full sort, exact).

Exactness: z, m, the min-p threshold and the k-th value are bitwise the reference's, so min-p and
top-k keep exactly the same tokens. top-nsigma's std and top-p's probabilities are float32 sums
in a different order than torch's: a token within ~1e-6 (relative) of those thresholds may differ.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from entcal.kernels import reference
from entcal.kernels.reference import TokenStats
from entcal.kernels.stats import (_scale, finalize, launch_config, row_state, rows_view,
                           scale_logits, scale_mode, target_z)

G = 16  # thresholds tried by the mass pass
MAX_BUFFER = 8192  # per-row candidate slots for top-p before the reference fallback
SLACK = 2 * MAX_BUFFER * 2.0**-24 + 1e-5  # >= float32 cumsum error over MAX_BUFFER terms
SUB_RUN = 16  # top-k: columns per run whose max is a candidate
INF = float("inf")


@triton.jit
def _submax_kernel(X, stride_n, stride_v, V, NSUB, cols_per_split, scale, OUT,
                   MODE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): OUT[row, j] = max z over columns [j*R, (j+1)*R) (-inf past V)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    sub = tl.arange(0, BLOCK // R)
    for off in range(start, stop, BLOCK):
        cols = off + sub[:, None] * R + tl.arange(0, R)[None, :]
        inb = cols < stop
        x = tl.load(X + row * stride_n + cols * stride_v, mask=inb, other=-float("inf"))
        z = tl.where(inb, _scale(x.to(tl.float32), scale, MODE), -float("inf"))
        j = off // R + sub
        tl.store(OUT + row * NSUB + j, tl.max(z, 1), mask=j < NSUB)


@triton.jit
def _mass_kernel(X, stride_n, stride_v, V, cols_per_split, scale, M, LO, T, OUT,
                 MODE: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): over z >= LO[row] in its columns, with e = exp(z - M[row]):
    OUT[row, split, 0:G] = sum of e over z >= T[row, g];  OUT[.., G:2G] = count of z >= T[row, g];
    OUT[.., 2G] = sum of e (the normaliser of the top-k set)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    m = tl.load(M + row)
    lo = tl.load(LO + row)
    gs = tl.arange(0, G)
    t = tl.load(T + row * G + gs)
    mass = tl.zeros([G], dtype=tl.float32)
    cnt = tl.zeros([G], dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    for off in range(start, stop, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < stop
        x = tl.load(X + row * stride_n + cols * stride_v, mask=inb, other=-float("inf"))
        z = _scale(x.to(tl.float32), scale, MODE)
        keep = inb & (z > -float("inf")) & (z >= lo)
        e = tl.where(keep, tl.exp(tl.where(keep, z - m, 0.0)), 0.0)
        total += tl.sum(e, 0)
        above = keep[:, None] & (z[:, None] >= t[None, :])
        mass += tl.sum(tl.where(above, e[:, None], 0.0), 0)
        cnt += tl.sum(above.to(tl.float32), 0)
    base = OUT + (row * nsplit + split) * (2 * G + 1)
    tl.store(base + gs, mass)
    tl.store(base + G + gs, cnt)
    tl.store(base + 2 * G, total)


@triton.jit
def _compact_kernel(X, stride_n, stride_v, V, cols_per_split, scale, LO, BUF, CNT, C,
                    MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): append the column ids with z >= LO[row] to BUF[row, 0:C].

    CNT[row] (zero-initialised int32) ends as the number of such columns, even past C. Blocks
    reserve slots with an atomic add, so the order between blocks is arbitrary (sorted later).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    lo = tl.load(LO + row)
    for off in range(start, stop, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < stop
        x = tl.load(X + row * stride_n + cols * stride_v, mask=inb, other=-float("inf"))
        z = _scale(x.to(tl.float32), scale, MODE)
        sel = inb & (z > -float("inf")) & (z >= lo)
        flag = sel.to(tl.int32)
        n_sel = tl.sum(flag, 0)
        if n_sel > 0:
            base = tl.atomic_add(CNT + row, n_sel)
            pos = base + tl.cumsum(flag, 0) - 1
            tl.store(BUF + row * C + pos, cols, mask=sel & (pos < C))


def kth_largest(logits: torch.Tensor, k: int, temperature: float, block: int | None = None,
                splits: int | None = None) -> torch.Tensor:
    """[N] float32: the k-th largest z = logits/temperature of each row (1 <= k <= V), exactly.

    A Triton pass writes the max of every run of R columns; torch.topk picks the k runs with the
    largest maxima and the k-th largest z among their k*R tokens. That is the row's k-th largest:
    every token above the k-th largest run max lies in a picked run, and the picked runs hold at
    least k tokens >= it. Rows too short for this (2*k*R > V) use torch.topk directly.
    """
    n, v = logits.shape
    if 2 * k * SUB_RUN > v:
        kth_x = torch.topk(logits, k, dim=-1).values[:, -1]
        return scale_logits(kth_x, temperature)  # x -> x/temperature is monotone: exact
    nsub = triton.cdiv(v, SUB_RUN)
    cfg = launch_config(n, v, logits.device, block, splits)
    if cfg.block < SUB_RUN:
        cfg = launch_config(n, v, logits.device, SUB_RUN, splits)
    submax = torch.empty((n, nsub), dtype=torch.float32, device=logits.device)
    mode, scale = scale_mode(temperature, logits.device)
    _submax_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, nsub, cfg.cols_per_split, scale, submax,
        MODE=mode, R=SUB_RUN, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    runs = torch.topk(submax, k, dim=-1, sorted=False).indices  # [N, k]
    cols = (runs[:, :, None] * SUB_RUN + torch.arange(SUB_RUN, device=logits.device)).flatten(1)
    z = scale_logits(logits.gather(1, cols.clamp_max(v - 1)), temperature)
    z = torch.where(cols < v, z, torch.full_like(z, -INF))
    return torch.topk(z, k, dim=-1).values[:, -1]


def _mass_above(logits, temperature, m, lo_k, thr, block, splits):
    """(mass [N, G] relative to exp(m), count [N, G], total [N]) of z >= lo_k above each thr."""
    n, v = logits.shape
    block = None if block is None else min(block, 1024)  # [BLOCK, G] tiles: keep them small
    cfg = launch_config(n, v, logits.device, block, splits, max_block=1024)
    out = torch.empty((n, cfg.splits, 2 * G + 1), dtype=torch.float32, device=logits.device)
    mode, scale = scale_mode(temperature, logits.device)
    _mass_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, cfg.cols_per_split, scale,
        m.contiguous(), lo_k.contiguous(), thr.contiguous(), out,
        MODE=mode, G=G, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    out = out.sum(1)
    return out[:, :G], out[:, G:2 * G], out[:, 2 * G]


def compact(logits: torch.Tensor, temperature: float, lo: torch.Tensor, capacity: int,
            block: int | None = None, splits: int | None = None):
    """(ids [N, capacity] int32 padded with -1, count [N] int32) of the columns with z >= lo."""
    n, v = logits.shape
    cfg = launch_config(n, v, logits.device, block, splits)
    buf = torch.full((n, capacity), -1, dtype=torch.int32, device=logits.device)
    cnt = torch.zeros(n, dtype=torch.int32, device=logits.device)
    mode, scale = scale_mode(temperature, logits.device)
    _compact_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, cfg.cols_per_split, scale,
        lo.contiguous(), buf, cnt, capacity, MODE=mode, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return buf, cnt


def _top_p_from_buffer(logits, rows, targets, temperature, ids, m, total, top_p, lo):
    """TokenStats of the rows `rows` [R] of logits, whose kept sets lie in their candidate
    buffers ids [R, C] (-1 = empty). m, total, lo are [R]: the row max, the sum of exp(z - m)
    over the top-k set (the top-p normaliser) and the min-p / top-nsigma / top-k lower bound.
    """
    v = logits.shape[1]
    ids = torch.where(ids < 0, torch.full_like(ids, v), ids).long()
    ids = torch.sort(ids, dim=-1).values  # column order, so a stable sort breaks ties by index
    valid = ids < v
    z = scale_logits(logits[rows[:, None], ids.clamp_max(v - 1)], temperature)
    z = torch.where(valid, z, torch.full_like(z, -INF))
    zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    probs = (zs - m[:, None]).exp() / total[:, None]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = mass_before < top_p
    keep[:, 0] = True
    keep &= (zs > -INF) & (zs >= lo[:, None])
    d = torch.where(keep, zs - m[:, None], torch.zeros_like(zs))
    below = keep & (d < 0)
    e = torch.where(below, d.exp(), torch.zeros_like(zs))
    c_k, r_k, w_k = (keep & (d == 0)).sum(1).float(), e.sum(1), (e * d).sum(1)
    if targets is None:
        return finalize(m, c_k, r_k, w_k, None)
    t = targets.to(device=ids.device, dtype=torch.long)[rows]
    hit = ((ids == t[:, None]) & keep).any(1)
    zt = scale_logits(logits[rows, t], temperature)
    st = finalize(m, c_k, r_k, w_k, zt)
    lp = torch.where(hit, st.target_logprob, torch.full_like(zt, -INF))
    return TokenStats(st.entropy, st.logsumexp, lp)


def truncated_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
    block: int | None = None,
    splits: int | None = None,
    max_buffer: int = MAX_BUFFER,
) -> TokenStats:
    """TokenStats of q = truncate(softmax(logits/temperature)), kept set as in the reference.

    logits [N, V] float32/bf16/fp16, targets [N] int or None -> TokenStats of [N] float32, nats.
    `block`, `splits` and `max_buffer` (<= MAX_BUFFER) override the launch / buffer size (tests).
    """
    logits = rows_view(logits)
    max_buffer = min(int(max_buffer), MAX_BUFFER)  # SLACK covers cumsums of MAX_BUFFER terms
    n, v = logits.shape
    dev = logits.device
    st = row_state(logits, temperature, moments=top_nsigma > 0, block=block, splits=splits)
    m = st.m
    lo = torch.full_like(m, -INF)
    if min_p > 0.0:
        lo = torch.maximum(lo, m + math.log(min_p))
    if top_nsigma > 0.0:
        std = (st.m2 / st.count.clamp_min(1)).sqrt()
        lo = torch.maximum(lo, m - top_nsigma * std)
    kth = None
    if top_k and top_k < v:
        kth = kth_largest(logits, top_k, temperature)
    lo_all = lo if kth is None else torch.maximum(lo, kth)

    if top_p >= 1.0:
        if kth is not None or min_p > 0.0 or top_nsigma > 0.0:  # else nothing is truncated
            st = row_state(logits, temperature, lo=lo_all, block=block, splits=splits)
        zt = None if targets is None else target_z(logits, targets, temperature)
        return finalize(m, st.c, st.r, st.w, zt, lo_all)

    # top-p: lower thresholds t_g from m down to the provable bound m + log((1 - p - slack) / V)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    ent, lp = torch.empty_like(lse), torch.empty_like(lse)
    fallback = torch.ones(n, dtype=torch.bool, device=dev)
    tail = 1.0 - top_p - SLACK
    if tail > SLACK and n > 0:
        m_use = torch.where(m > -INF, m, torch.zeros_like(m))
        span = math.log(v / tail)  # > 0
        frac = torch.arange(1, G + 1, dtype=torch.float32, device=dev) / G
        thr = m_use[:, None] - span * frac[None, :]
        lo_k = torch.full_like(m, -INF) if kth is None else kth
        mass, count, total = _mass_above(logits, temperature, m_use, lo_k, thr, block, splits)
        ok = mass >= (top_p + SLACK) * total[:, None]  # monotone in g: first True is the largest t
        has = ok.any(1)
        g = torch.where(has, ok.int().argmax(1), torch.full_like(m, G - 1, dtype=torch.long))
        need = count.gather(1, g[:, None])[:, 0]
        fallback = ~has | (need > max_buffer) | (m == -INF)
        rows = (~fallback).nonzero()[:, 0]
        if rows.numel():
            lo_c = torch.maximum(lo_all, thr.gather(1, g[:, None])[:, 0])
            lo_c = torch.where(fallback, torch.full_like(lo_c, INF), lo_c)  # no slots for those
            cap = triton.next_power_of_2(max(int(need[rows].max().item()), 1))
            ids, cnt = compact(logits, temperature, lo_c, cap, block, splits)
            ids, cnt = ids[rows], cnt[rows]
            over = cnt > cap  # cannot happen (same z as the mass pass); stay exact regardless
            r = _top_p_from_buffer(logits, rows, targets, temperature, ids, m_use[rows],
                                   total[rows], top_p, lo_all[rows])
            ent[rows], lse[rows], lp[rows] = r.entropy, r.logsumexp, r.target_logprob
            fallback[rows[over]] = True
    if bool(fallback.any()):
        rows = fallback.nonzero()[:, 0]
        r = reference.token_stats(
            logits[rows], None if targets is None else targets[rows], temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, top_nsigma=top_nsigma,
        )
        ent[rows], lse[rows], lp[rows] = r.entropy, r.logsumexp, r.target_logprob
    return TokenStats(ent, lse, lp)


__all__ = ["truncated_token_stats", "kth_largest", "compact", "MAX_BUFFER", "SLACK"]
