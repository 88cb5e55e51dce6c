"""Statistics of a truncated sampling distribution without a full sort of the row.

Shapes, dtypes, units: logits [N, V] float32/bf16/fp16 (any strides), targets [N] int or None;
returns TokenStats of [N] float32 in nats, restricted to the kept set exactly as
kernels.reference.truncation_mask defines it: z = logits/temperature, then top-k, top-p, min-p,
typical, ε, η (transformers' order, each on the renormalised survivors), then top-nσ.

Passes (per-element work over V is Triton; torch touches [N], [N, V/16], [N, k*16] or [N, C]):
 1. `row_state` (kernels.stats): max m, s, w and the moments of the finite z. min-p is the
    threshold m + log(min_p); top-nσ's σ comes from the moments.
 2. top-k: a Triton pass writes the max of every run of 16 columns; torch.topk over those V/16
    maxima picks k runs, and torch.topk over their k*16 tokens gives the k-th largest z exactly
    (see kth_largest). Short rows (2*k*16 > V) use torch.topk on the row (a radix select).
 3. Without top-p and typical (threshold path): every step is a threshold on z. ε: one float64
    pass (`row_sums64`) gives lse of the survivors, ε keeps z >= min(lse + log ε, m); η: another
    gives lse and H of ε's survivors, η keeps z >= min(lse + log min(η, √η·e^−H), m); top-nσ:
    z >= m - n·σ. The float64 thresholds become float32 ones exactly (candidates.ceil_f32). A
    last masked `row_state` pass gives S_K, W_K.
 4. With top-p or typical (buffer path): a float64 "mass" pass gives, for G radii r_g around a
    centre c, the mass and count of {|z - c| <= r_g} in the set the rule applies to. top-p:
    c = m (so the band is z >= m - r_g); typical: c = lse - H of min-p's survivors (one more
    float64 pass gives them), since |−log q − H| = |z − c|. The smallest r_g whose mass is
    >= (p + SLACK) of the total provably holds the kept set; its tokens (count known) are
    compacted (atomics + in-block cumsum) into a buffer of C <= MAX_BUFFER slots, and
    kernels.candidates sorts and cumsums only that buffer, in float64, then applies the later
    steps there. Rows whose buffer would exceed MAX_BUFFER, and every row when the rule's
    1 - p <= 2*SLACK, fall back to kernels.reference on those rows (full sort, exact).

Exactness: z, m, the min-p threshold and the k-th value are bitwise the reference's. The top-p,
typical, ε and η decisions are float64 sums of float64 exps of the float32 z, as in the
reference, in a different order (< 1e-13 apart; SLACK covers that with room to spare), with the
reference's MASS_TOL on prefix masses: they agree unless a margin is below 1e-10 of the mass.
top-nσ's σ is a float32 sum in a different order than torch's: a token within ~1e-6 (relative)
of that threshold may differ.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from entcal.kernels import reference
from entcal.kernels.candidates import Rules, buffer_stats, ceil_f32
from entcal.kernels.reference import F64, TokenStats
from entcal.kernels.stats import (_scale, finalize, launch_config, row_state, rows_view,
                                  scale_logits, scale_mode, target_z)

G = 16  # radii tried by the mass pass
MAX_BUFFER = 8192  # per-row candidate slots for top-p / typical before the reference fallback
# float64 sums of <= 151,936 terms err by < V * 2^-53 ~ 2e-11 (relative) at worst: SLACK is far
# above that (a float32 cumsum needed ~1e-5 here)
SLACK = 1e-9
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
def _mass_kernel(X, stride_n, stride_v, V, cols_per_split, scale, M, LO, C, R, OUT,
                 MODE: tl.constexpr, G: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): float64 sums over its columns with z >= LO[row], e = exp(z - M[row]):
    OUT[row, split, 0] = sum of e, [1] = sum of e * (z - M); with BAND, for g < G,
    [2 + g] = sum of e over |z - C[row]| <= R[row, g] and [2 + G + g] = their count."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    m = tl.load(M + row).to(tl.float64)
    lo = tl.load(LO + row)
    gs = tl.arange(0, G)
    c = tl.zeros([], dtype=tl.float64)
    r = tl.zeros([G], dtype=tl.float64)
    if BAND:
        c = tl.load(C + row)
        r = tl.load(R + row * G + gs)
    total = tl.zeros([], dtype=tl.float64)
    wsum = tl.zeros([], dtype=tl.float64)
    mass = tl.zeros([G], dtype=tl.float64)
    cnt = tl.zeros([G], dtype=tl.float64)
    for off in range(start, stop, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < stop
        x = tl.load(X + row * stride_n + cols * stride_v, mask=inb, other=-float("inf"))
        z = _scale(x.to(tl.float32), scale, MODE)
        keep = inb & (z > -float("inf")) & (z >= lo)
        z64 = tl.where(keep, z, 0.0).to(tl.float64)
        d = tl.where(keep, z64 - m, 0.0)
        e = tl.where(keep, tl.exp(d), 0.0)
        total += tl.sum(e, 0)
        wsum += tl.sum(e * d, 0)
        if BAND:
            within = keep[:, None] & (tl.abs(z64 - c)[:, None] <= r[None, :])
            mass += tl.sum(tl.where(within, e[:, None], 0.0), 0)
            cnt += tl.sum(within.to(tl.float64), 0)
    base = OUT + (row * nsplit + split) * (2 * G + 2)
    tl.store(base, total)
    tl.store(base + 1, wsum)
    tl.store(base + 2 + gs, mass)
    tl.store(base + 2 + G + gs, cnt)


@triton.jit
def _compact_kernel(X, stride_n, stride_v, V, cols_per_split, scale, LO, C, R, BUF, CNT, CAP,
                    MODE: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): append the column ids with z >= LO[row] (and, with BAND,
    |z - C[row]| <= R[row] in float64, as _mass_kernel decides it) to BUF[row, 0:CAP].

    CNT[row] (zero-initialised int32) ends as the number of such columns, even past CAP. Blocks
    reserve slots with an atomic add, so the order between blocks is arbitrary (sorted later).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    lo = tl.load(LO + row)
    c = tl.zeros([], dtype=tl.float64)
    r = tl.zeros([], dtype=tl.float64)
    if BAND:
        c = tl.load(C + row)
        r = tl.load(R + row)
    for off in range(start, stop, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < stop
        x = tl.load(X + row * stride_n + cols * stride_v, mask=inb, other=-float("inf"))
        z = _scale(x.to(tl.float32), scale, MODE)
        sel = inb & (z > -float("inf")) & (z >= lo)
        if BAND:
            z64 = tl.where(sel, z, 0.0).to(tl.float64)
            sel = sel & (tl.abs(z64 - c) <= r)
        flag = sel.to(tl.int32)
        n_sel = tl.sum(flag, 0)
        if n_sel > 0:
            base = tl.atomic_add(CNT + row, n_sel)
            pos = base + tl.cumsum(flag, 0) - 1
            tl.store(BUF + row * CAP + pos, cols, mask=sel & (pos < CAP))


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


def row_sums64(logits, temperature, m, lo, *, center=None, radii=None, block=None,
               splits=None):
    """One float64 pass over z = logits/temperature restricted to z >= lo [N] (float32).

    m [N] float32 (finite) is the shift. Returns (S, W) [N] float64: S = sum exp(z - m),
    W = sum exp(z - m) * (z - m); with center [N] and radii [N, G] (float64) also
    (mass [N, G], count [N, G]) of the tokens with |z - center| <= radii[:, g].
    """
    n, v = logits.shape
    band = center is not None
    block = None if block is None else min(block, 1024)  # [BLOCK, G] tiles: keep them small
    cfg = launch_config(n, v, logits.device, block, splits, max_block=1024 if band else None)
    out = torch.empty((n, cfg.splits, 2 * G + 2), dtype=F64, device=logits.device)
    mode, scale = scale_mode(temperature, logits.device)
    c = center.contiguous() if band else out
    r = radii.contiguous() if band else out
    _mass_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, cfg.cols_per_split, scale,
        m.contiguous(), lo.to(torch.float32).contiguous(), c, r, out,
        MODE=mode, G=G, BAND=band, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    out = out.sum(1)
    if not band:
        return out[:, 0], out[:, 1]
    return out[:, 0], out[:, 1], out[:, 2:2 + G], out[:, 2 + G:]


def compact(logits: torch.Tensor, temperature: float, lo: torch.Tensor, capacity: int,
            block: int | None = None, splits: int | None = None, *, center=None, radius=None):
    """(ids [N, capacity] int32 padded with -1, count [N] int32) of the columns with z >= lo
    (and |z - center| <= radius, float64 [N] each, when given)."""
    n, v = logits.shape
    cfg = launch_config(n, v, logits.device, block, splits)
    buf = torch.full((n, capacity), -1, dtype=torch.int32, device=logits.device)
    cnt = torch.zeros(n, dtype=torch.int32, device=logits.device)
    mode, scale = scale_mode(temperature, logits.device)
    band = center is not None
    c = center.contiguous() if band else cnt
    r = radius.contiguous() if band else cnt
    _compact_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, cfg.cols_per_split, scale,
        lo.to(torch.float32).contiguous(), c, r, buf, cnt, capacity, MODE=mode, BAND=band,
        BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return buf, cnt


def _threshold_path(logits, targets, temperature, st, rules: Rules, block, splits):
    """Kept set = {z >= L}: ε and η thresholds from float64 sums, then top-nσ; one last pass.
    st: the row's RowState (its max m survives every step here)."""
    m = st.m
    alive = m > -INF  # rows with no finite z keep their -inf bound (NaN entropy, as the reference)
    m_use = torch.where(alive, m, torch.zeros_like(m))
    m64 = m_use.to(F64)
    lo = rules.min_lo
    if rules.epsilon > 0.0:
        s, _ = row_sums64(logits, temperature, m_use, lo, block=block, splits=splits)
        t = m64 + s.log() + math.log(rules.epsilon)  # q >= ε  <=>  z >= lse + log ε
        lo = torch.where(alive, torch.maximum(lo, ceil_f32(torch.minimum(t, m64))), lo)  # max kept
    if rules.eta > 0.0:
        s, w = row_sums64(logits, temperature, m_use, lo, block=block, splits=splits)
        ent = s.log() - w / s
        thr = torch.clamp(math.sqrt(rules.eta) * torch.exp(-ent), max=rules.eta)
        t = m64 + s.log() + thr.log()
        lo = torch.where(alive, torch.maximum(lo, ceil_f32(torch.minimum(t, m64))), lo)
    if rules.top_nsigma > 0.0:
        lo = torch.maximum(lo, m - rules.top_nsigma * rules.std)
    if bool((lo > -INF).any()):  # else nothing is truncated: the first pass is the answer
        st = row_state(logits, temperature, lo=lo, block=block, splits=splits)
    zt = None if targets is None else target_z(logits, targets, temperature)
    return finalize(m, st.c, st.r, st.w, zt, lo)


def truncated_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
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
    max_buffer = min(int(max_buffer), MAX_BUFFER)
    n, v = logits.shape
    dev = logits.device
    st = row_state(logits, temperature, moments=top_nsigma > 0, block=block, splits=splits)
    m = st.m
    lo = torch.full_like(m, -INF)
    if min_p > 0.0:
        lo = torch.maximum(lo, m + math.log(min_p))
    std = None
    if top_nsigma > 0.0:
        std = (st.m2 / st.count.clamp_min(1)).sqrt()
    lo_k = torch.full_like(m, -INF)
    if top_k and top_k < v:
        lo_k = kth_largest(logits, top_k, temperature)
    rules = Rules(torch.maximum(lo, lo_k), typical_p, epsilon_cutoff, eta_cutoff, top_nsigma, std)
    if top_p >= 1.0 and typical_p >= 1.0:
        return _threshold_path(logits, targets, temperature, st, rules, block, splits)

    # buffer path: the first of top-p / typical is decided on a candidate band |z - c| <= r_g
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    ent, lp = torch.empty_like(lse), torch.empty_like(lse)
    fallback = torch.ones(n, dtype=torch.bool, device=dev)
    p = top_p if top_p < 1.0 else typical_p
    tail = 1.0 - p - SLACK
    if tail > SLACK and n > 0:
        m_use = torch.where(m > -INF, m, torch.zeros_like(m))
        m64 = m_use.to(F64)
        frac = torch.arange(1, G + 1, dtype=F64, device=dev) / G
        kw = dict(block=block, splits=splits)
        typical = None
        if top_p < 1.0:  # top-p on the top-k set: band z >= m - r (every token within the set)
            center, set_lo = m64, lo_k
            span = torch.full_like(m64, math.log(v / tail))  # the mass below m - span is < tail
        else:  # typical on min-p's survivors: centre lse - H; beyond span the mass is < tail
            s3, w3 = row_sums64(logits, temperature, m_use, rules.min_lo, **kw)
            h3 = s3.log() - w3 / s3
            typical = (m64 + s3.log(), h3)
            center, set_lo = typical[0] - h3, rules.min_lo
            span = torch.maximum(m64 - center, math.log(v / tail) - h3)
        radii = span[:, None] * frac[None, :]
        total, _, mass, count = row_sums64(logits, temperature, m_use, set_lo, center=center,
                                           radii=radii, **kw)
        ok = mass >= (p + SLACK) * total[:, None]  # monotone in g: first True is the smallest r
        has = ok.any(1)
        g = torch.where(has, ok.int().argmax(1), torch.full_like(m, G - 1, dtype=torch.long))
        need = count.gather(1, g[:, None])[:, 0]
        fallback = ~has | (need > max_buffer) | (m == -INF) | ~torch.isfinite(center)
        rows = (~fallback).nonzero()[:, 0]
        if rows.numel():
            lo_c = torch.where(fallback, torch.full_like(m, INF), rules.min_lo)  # none for those
            cap = triton.next_power_of_2(max(int(need[rows].max().item()), 1))
            ids, cnt = compact(logits, temperature, lo_c, cap, block, splits, center=center,
                               radius=radii.gather(1, g[:, None])[:, 0])
            ids, cnt = ids[rows], cnt[rows]
            over = cnt > cap  # cannot happen (same z and test as the mass pass); stay exact anyway
            r, redo = buffer_stats(
                logits, rows, targets, temperature, ids, m_use[rows], rules,
                top_p=top_p if top_p < 1.0 else None, total=total[rows],
                typical=None if typical is None else (typical[0][rows], typical[1][rows]))
            ent[rows], lse[rows], lp[rows] = r.entropy, r.logsumexp, r.target_logprob
            fallback[rows[over | redo]] = True
    if bool(fallback.any()):
        rows = fallback.nonzero()[:, 0]
        r = reference.token_stats(
            logits[rows], None if targets is None else targets[rows], temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_nsigma=top_nsigma,
        )
        ent[rows], lse[rows], lp[rows] = r.entropy, r.logsumexp, r.target_logprob
    return TokenStats(ent, lse, lp)


__all__ = ["truncated_token_stats", "kth_largest", "compact", "row_sums64", "MAX_BUFFER", "SLACK"]
