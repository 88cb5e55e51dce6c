"""Streaming entropy / logsumexp / target log-prob of logits rows, in one Triton pass.

Shapes, dtypes, units
    logits   [N, V]  float32 / bfloat16 / float16, any row and column stride
    targets  [N]     integer token ids in [0, V), or None
    outputs  TokenStats of three [N] float32 tensors, in nats (see kernels.reference)

Per row (and per column range when a row is split across programs) the kernel keeps a float32
running state in the *shifted* form (docs/KERNELS.md):

    m = max z,   s = sum e^(z - m) = c + r,   w = sum e^(z - m) (z - m),   z = logits / temperature

where c counts the tokens at the max (each e^0 = 1 exactly) and r sums the others, so that
lse = m + log s and H = log s - w / s with log s = log c + log1p(r / c): both terms of H are >= 0
and keep their relative precision on peaked rows (H ~ 1e-8, where s = 1 + r rounds to 1 in
float32). When the max moves from m to m' the state is rescaled by a = e^(m - m'):
w <- a (w + (m - m') s), r <- a (r + c), c <- 0: that per-block update is `_streaming_update`,
called by this kernel and by kernels.fused_head's. Partial states of one row (split rows, for
small N) merge the same way, on the host in torch (a few floats per row). -inf logits contribute
nothing; a row that is -inf except for a few tokens is fine.

Optionally the same pass keeps the moments of the finite z (count, mean, M2; Chan's parallel
update per block), used by top-nsigma, and a per-row lower threshold `lo` (only z >= lo count),
used by the truncated statistics (kernels.truncation) for S_K, W_K over a kept set.

z is computed bitwise as the reference computes it on the same device: on CUDA torch divides a
float32 tensor by a Python scalar as x * (1/tau) (a float32 reciprocal), on CPU with an IEEE
division; `scale_mode` picks the matching form so thresholds (min-p, top-k) agree exactly.
Only tl.exp / tl.log are used (libdevice fails under TRITON_INTERPRET=1); every load is cast to
float32 right away (bf16 arithmetic is wrong in the interpreter).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from entcal.kernels.reference import TokenStats

NSTAT = 7  # per (row, split): m, c, r, w, count, mean, m2
INF = float("inf")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def scale_mode(temperature: float, device: torch.device) -> tuple[int, float]:
    """(MODE, scale) for `_scale`: 0 = identity, 1 = x * scale (CUDA), 2 = x / scale (CPU, IEEE)."""
    temperature = float(temperature)
    if temperature == 1.0:
        return 0, 1.0
    if device.type == "cuda":
        one = torch.tensor(1.0, dtype=torch.float32)
        return 1, (one / torch.tensor(temperature, dtype=torch.float32)).item()
    return 2, temperature


def scale_logits(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = x / temperature in float32, the reference's expression (bitwise equal to the kernels)."""
    return x.to(torch.float32) / temperature


@triton.jit
def _scale(x, scale, MODE: tl.constexpr):
    if MODE == 1:
        z = x * scale
    elif MODE == 2:
        z = tl.math.div_rn(x, scale)
    else:
        z = x
    return z


@triton.jit
def _streaming_update(m, c, r, w, z, keep, AXIS: tl.constexpr):
    """Fold one block of z into the running shifted state (m, c, r, w) of each row; returns it.

    z, keep: the block and which of its entries count, laid out with the columns along AXIS
    ([BLOCK] and AXIS=0 for one row, [ROWS, BLOCK] and AXIS=1 for ROWS rows). m, c, r, w: float32
    state of each row (0-d for one row, [ROWS]), m = -inf before the first counted token. Both
    streaming kernels (_stats_kernel and kernels.fused_head) call this one update.
    """
    m_new = tl.maximum(m, tl.max(tl.where(keep, z, -float("inf")), AXIS))
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    m_col = tl.expand_dims(m_use, AXIS)  # broadcasts against z
    # tokens at the running max (e^0 = 1) are counted in c. Decide with z, not z - m: with
    # FMA contraction z * scale - m may not be exactly 0 for them on a GPU.
    top = keep & (z == m_col)
    below = keep & (z < m_col)
    d = tl.where(below, z - m_col, 0.0)
    e = tl.where(below, tl.exp(d), 0.0)
    alive = m > -float("inf")
    shift = tl.where(alive, m - m_use, 0.0)
    a = tl.where(alive, tl.exp(shift), 0.0)
    moved = shift < 0.0
    w = a * (w + shift * (c + r)) + tl.sum(e * d, AXIS)
    r = a * r + tl.where(moved, a * c, 0.0) + tl.sum(e, AXIS)
    c = tl.where(moved, 0.0, c) + tl.sum(top.to(tl.float32), AXIS)
    return m_new, c, r, w


@triton.jit
def _stats_kernel(
    X, stride_n, stride_v, V, cols_per_split, scale, LO, OUT,
    MODE: tl.constexpr, HAS_LO: tl.constexpr, MOMENTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, split): state of z[row, split*cols_per_split : ...] -> OUT[row, split, 0:7]."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    x_row = X + row * stride_n
    lo = -float("inf")
    if HAS_LO:
        lo = tl.load(LO + row)
    zero = tl.zeros([], dtype=tl.float32)
    m = zero - float("inf")
    c = zero
    r = zero
    w = zero
    cnt = zero
    mean = zero
    m2 = zero
    for off in range(start, stop, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < stop
        x = tl.load(x_row + cols * stride_v, mask=inb, other=-float("inf")).to(tl.float32)
        z = _scale(x, scale, MODE)
        keep = inb & (z > -float("inf"))
        if HAS_LO:
            keep = keep & (z >= lo)
        m, c, r, w = _streaming_update(m, c, r, w, z, keep, 0)
        if MOMENTS:  # Chan et al.: merge (count, mean, M2) of this block into the running ones
            fin = inb & (z > -float("inf")) & (z < float("inf"))
            nb = tl.sum(fin.to(tl.float32), 0)
            mb = tl.sum(tl.where(fin, z, 0.0), 0) / tl.maximum(nb, 1.0)
            dz = tl.where(fin, z - mb, 0.0)
            m2b = tl.sum(dz * dz, 0)
            tot = cnt + nb
            delta = mb - mean
            frac = nb / tl.maximum(tot, 1.0)
            mean = mean + delta * frac
            m2 = m2 + m2b + delta * delta * cnt * frac
            cnt = tot
    base = OUT + (row * nsplit + split) * 7
    tl.store(base + 0, m)
    tl.store(base + 1, c)
    tl.store(base + 2, r)
    tl.store(base + 3, w)
    tl.store(base + 4, cnt)
    tl.store(base + 5, mean)
    tl.store(base + 6, m2)


class RowState(NamedTuple):
    """Merged per-row state, each [N] float32: max, shifted sums, and moments of the finite z."""

    m: torch.Tensor
    c: torch.Tensor
    r: torch.Tensor
    w: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


class Launch(NamedTuple):
    block: int
    splits: int
    cols_per_split: int
    num_warps: int


def launch_config(n_rows: int, v: int, device: torch.device, block: int | None = None,
                  splits: int | None = None, max_block: int | None = None) -> Launch:
    """Block size and split count for a [n_rows, v] streaming pass.

    On CUDA a row is split over several programs when there are fewer rows than ~4 programs per
    SM; in the interpreter (programs run one after another) rows are not split unless asked.
    """
    if block is None:
        cap = max_block or (4096 if device.type == "cuda" else 8192)
        block = min(cap, triton.next_power_of_2(max(v, 16)))
    nblk = triton.cdiv(v, block)
    if splits is None:
        splits = 1
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(nblk, triton.cdiv(4 * sms, max(n_rows, 1))))
    splits = max(1, min(int(splits), nblk))
    cols_per_split = triton.cdiv(nblk, splits) * block
    splits = triton.cdiv(v, cols_per_split)
    num_warps = 8 if block >= 2048 else 4
    return Launch(block, splits, cols_per_split, num_warps)


def merge_states(st: torch.Tensor) -> RowState:
    """Merge partial states [N, S, 7] of the S column ranges of each row into a RowState."""
    if st.shape[1] == 1:
        return RowState(*st[:, 0].unbind(-1))
    m_j, c_j, r_j, w_j, n_j, mu_j, m2_j = st.unbind(-1)
    m = m_j.max(dim=1).values
    m_use = torch.where(m == -INF, torch.zeros_like(m), m)
    alive = m_j > -INF
    shift = torch.where(alive, m_j - m_use[:, None], torch.zeros_like(m_j))
    a = torch.where(alive, shift.exp(), torch.zeros_like(m_j))
    at_max = alive & (shift == 0)
    c = torch.where(at_max, c_j, torch.zeros_like(c_j)).sum(1)
    r = torch.where(at_max, r_j, a * (c_j + r_j)).sum(1)
    w = (a * (w_j + shift * (c_j + r_j))).sum(1)
    count = n_j.sum(1)
    mean = (n_j * mu_j).sum(1) / count.clamp_min(1.0)
    m2 = (m2_j + n_j * (mu_j - mean[:, None]) ** 2).sum(1)
    return RowState(m, c, r, w, count, mean, m2)


def row_state(logits: torch.Tensor, temperature: float = 1.0, *, lo: torch.Tensor | None = None,
              moments: bool = False, block: int | None = None,
              splits: int | None = None) -> RowState:
    """One Triton pass over logits[N, V]: merged RowState of z = logits/temperature.

    lo: optional [N] float32 per-row threshold in z units; only z >= lo enter m, c, r, w (the
    moments are always over all finite z).
    """
    n, v = logits.shape
    dev = logits.device
    if n == 0 or v == 0:
        z = torch.zeros(n, dtype=torch.float32, device=dev)
        return RowState(z - INF, z, z, z, z, z, z)
    cfg = launch_config(n, v, dev, block, splits)
    out = torch.empty((n, cfg.splits, NSTAT), dtype=torch.float32, device=dev)
    mode, scale = scale_mode(temperature, dev)
    lo_t = out if lo is None else lo.to(device=dev, dtype=torch.float32).contiguous()
    _stats_kernel[(n, cfg.splits)](
        logits, logits.stride(0), logits.stride(1), v, cfg.cols_per_split, scale, lo_t, out,
        MODE=mode, HAS_LO=lo is not None, MOMENTS=moments, BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return merge_states(out)


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """logits, or a contiguous copy when in-row offsets (int32 in the kernels) would overflow."""
    v = logits.shape[1]
    if v > 1 and logits.stride(1) * (v - 1) >= 2**31:
        return logits.contiguous()
    return logits


def target_z(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """z[i, targets[i]] as float32 [N], bitwise equal to the kernels' z."""
    x = logits.gather(1, targets.to(device=logits.device, dtype=torch.long)[:, None])[:, 0]
    return scale_logits(x, temperature)


def finalize(m: torch.Tensor, c: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
             zt: torch.Tensor | None, lo: torch.Tensor | None = None) -> TokenStats:
    """TokenStats from a merged shifted state (m, c, r, w); zt = target z [N] (None: NaN).

    With lo, the target's log-prob is -inf unless zt >= lo (the target was truncated away).
    """
    log_s = c.log() + torch.log1p(r / c)
    lse = m + log_s
    entropy = log_s - w / (c + r)
    if zt is None:
        lp = torch.full_like(lse, math.nan)
    else:
        lp = zt - lse
        if lo is not None:
            lp = torch.where(zt >= lo, lp, torch.full_like(lp, -INF))
    return TokenStats(entropy.float(), lse.float(), lp.float())


def token_stats(logits: torch.Tensor, targets: torch.Tensor | None = None, *,
                temperature: float = 1.0, block: int | None = None,
                splits: int | None = None) -> TokenStats:
    """Entropy, logsumexp and target log-prob of softmax(logits / temperature), one pass per row.

    logits [N, V] float32/bf16/fp16 (any strides), targets [N] int or None -> TokenStats of
    [N] float32 (nats). `block` and `splits` override the launch (tests use them to hit the
    block boundary and the split-row path); None picks them from the shape and device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [N, V], got shape {tuple(logits.shape)}")
    logits = rows_view(logits)
    st = row_state(logits, temperature, block=block, splits=splits)
    zt = None if targets is None else target_z(logits, targets, temperature)
    return finalize(st.m, st.c, st.r, st.w, zt)


__all__ = ["token_stats", "row_state", "RowState", "finalize", "target_z", "scale_logits",
           "rows_view", "scale_mode", "launch_config", "merge_states", "interpreting"]
