"""Fused LM head: token statistics of hidden @ weight^T without materialising the [N, V] logits.

Shapes, dtypes, units
    hidden  [N, D]  float32 / bfloat16 / float16 (any strides)
    weight  [V, D]  same dtype as hidden, else both are cast to float32 (any strides)
    targets [N]     integer token ids in [0, V), or None
    returns TokenStats of three [N] float32 tensors, in nats (see kernels.reference)

Each program owns BLOCK_N rows and one range of the vocabulary. For every [BLOCK_N, BLOCK_V]
tile it accumulates logits = hidden @ weight^T over D with tl.dot into float32 registers,
scales by 1/temperature and folds the tile straight into the per-row shifted state
(m, c + r = sum e^(z-m), w = sum e^(z-m)(z-m); docs/KERNELS.md) with kernels.stats'
_streaming_update, the update the logits-row kernel uses, plus the target's logit when the
target column is in the tile. Partial states of the vocabulary ranges are merged on the host
(kernels.stats.merge_states): extra memory is N * splits * 5 floats, never N * V.

Launch order: program ids run vocabulary-range-major inside groups of GROUP_N row tiles, so the
programs resident at the same time stream the same weight tiles (L2 reuse on a GPU; the hidden
rows of a group stay in L2 as well). Vocabulary ranges exist for parallelism when N is small.

Precision: half-precision tiles go to tl.dot as they are on a GPU (products exact in the float32
accumulator); float32 inputs use input_precision="ieee" (no TF32), like the float32 reference.
Under TRITON_INTERPRET=1 tiles are cast to float32 before tl.dot, because the interpreter's
bf16 dot is wrong; the result differs from the GPU path only by accumulation rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from entcal.kernels.reference import TokenStats
from entcal.kernels.stats import (_scale, _streaming_update, finalize, interpreting, merge_states,
                           scale_mode)

INF = float("inf")


@triton.jit
def _fused_kernel(
    H, W, T, OUT, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, cols_per_split, scale,
    MODE: tl.constexpr, HAS_T: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program -> (row tile, vocab range); OUT[row, range, 0:5] = (m, c, r, w, z_target or 0)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    n_splits = tl.cdiv(V, cols_per_split)
    per_group = GROUP_N * n_splits
    group = pid // per_group
    first = group * GROUP_N
    size = tl.minimum(n_tiles - first, GROUP_N)
    local = pid % per_group
    split = local // size
    tile = first + local % size

    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.full([BLOCK_N], -1, dtype=tl.int64)
    if HAS_T:
        tgt = tl.load(T + rows64, mask=row_ok, other=-1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    c = tl.zeros([BLOCK_N], dtype=tl.float32)
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    w = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    for off in range(start, stop, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        col_ok = cols < stop
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + dd
            d_ok = dk < D
            h = tl.load(H + rows64[:, None] * stride_hn + dk[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(W + cols64[None, :] * stride_wv + dk[:, None] * stride_wd,
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
            if CAST_F32:
                h = h.to(tl.float32)
                wt = wt.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, wt, acc)
        z = _scale(acc, scale, MODE)
        keep = col_ok[None, :] & (z > -float("inf"))
        m, c, r, w = _streaming_update(m, c, r, w, z, keep, 1)
        if HAS_T:
            zt += tl.sum(tl.where(cols64[None, :] == tgt[:, None], z, 0.0), 1)
    base = OUT + (rows64 * n_splits + split) * 5
    tl.store(base + 0, m, mask=row_ok)
    tl.store(base + 1, c, mask=row_ok)
    tl.store(base + 2, r, mask=row_ok)
    tl.store(base + 3, w, mask=row_ok)
    tl.store(base + 4, zt, mask=row_ok)


def _config(n: int, v: int, d: int, device: torch.device, splits: int | None,
            block_n: int | None, block_v: int | None):
    """Tile sizes, vocabulary split and warps (untuned defaults: 128x128x64 tiles on a GPU)."""
    cuda = device.type == "cuda"
    bn = block_n or (128 if cuda else min(64, triton.next_power_of_2(max(n, 16))))
    bv = block_v or (128 if cuda else min(128, triton.next_power_of_2(max(v, 16))))
    bd = 64 if cuda else min(64, triton.next_power_of_2(max(d, 16)))
    n_tiles = triton.cdiv(n, bn)
    n_vblk = triton.cdiv(v, bv)
    if splits is None:
        splits = 1
        if cuda:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(n_vblk, triton.cdiv(2 * sms, n_tiles)))
    splits = max(1, min(int(splits), n_vblk))
    cols_per_split = triton.cdiv(n_vblk, splits) * bv
    splits = triton.cdiv(v, cols_per_split)
    return bn, bv, bd, n_tiles, splits, cols_per_split


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    splits: int | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    group_n: int = 16,
) -> TokenStats:
    """TokenStats of softmax((hidden @ weight^T) / temperature) without the [N, V] logits.

    hidden [N, D], weight [V, D] (float32/bf16/fp16), targets [N] int or None -> TokenStats of
    [N] float32, nats. `splits`, `block_n`, `block_v`, `group_n` override the launch (tests).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden[N, D], weight[V, D]: got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:  # e.g. bf16 weight, fp32 hidden: exact in float32
        hidden, weight = hidden.float(), weight.float()
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0 or v == 0:
        e = torch.zeros(n, dtype=torch.float32, device=dev)
        return TokenStats(e, e - INF, e + float("nan"))
    bn, bv, bd, n_tiles, n_splits, cols_per_split = _config(n, v, d, dev, splits, block_n,
                                                            block_v)
    out = torch.empty((n, n_splits, 5), dtype=torch.float32, device=dev)
    mode, scale = scale_mode(temperature, dev)
    t = out if targets is None else targets.to(dev).contiguous()
    _fused_kernel[(n_tiles * n_splits,)](
        hidden, weight, t, out, n, v, d, hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1), cols_per_split, scale,
        MODE=mode, HAS_T=targets is not None, CAST_F32=interpreting(),
        IEEE=hidden.dtype == torch.float32, GROUP_N=max(1, int(group_n)),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=8 if dev.type == "cuda" else 4,
        num_stages=3 if dev.type == "cuda" else 1,
    )
    st = torch.cat([out[..., :4], torch.zeros_like(out[..., :3])], -1)  # no moments
    merged = merge_states(st)
    zt = None if targets is None else out[..., 4].sum(1)
    return finalize(merged.m, merged.c, merged.r, merged.w, zt)


__all__ = ["fused_token_stats"]
