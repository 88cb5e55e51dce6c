"""Triton kernel of kernels.sampling.gumbel_argmax: one program per row hashes the noise of every token,
adds it to z in float64 and keeps the running argmax (the first index among equal scores, as numpy's
argmax): one read of the row, nothing written but the winner."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from entcal.kernels.sampling import M1, M2, SALT, SPAN

BLOCK = 1024


@triton.jit
def _fmix(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(Z, stride_n, stride_v, V, WORDS, step, OUT, SALT0: tl.constexpr, SALT1: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.load(WORDS + 2 * row).to(tl.uint32, bitcast=True)
    hi = tl.load(WORDS + 2 * row + 1).to(tl.uint32, bitcast=True)
    k1 = _fmix(_fmix(_fmix(lo ^ SALT0) ^ hi) ^ step.to(tl.uint32))  # kernels.sampling.row_keys
    k2 = _fmix(k1 ^ SALT1)
    best = tl.full((), -float("inf"), tl.float64)  # (a loop-carried value keeps its first type)
    best_i = 0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < V
        z = tl.load(Z + row * stride_n + cols.to(tl.int64) * stride_v, mask=inb, other=-float("inf")).to(tl.float64)
        w = cols.to(tl.uint32)
        h1 = _fmix(_fmix(w) ^ k1)
        h2 = _fmix(_fmix(w ^ SALT0) ^ k2)
        u = ((h1 >> 6).to(tl.float64) * 67108864.0 + (h2 >> 6).to(tl.float64) + 0.5) / 4503599627370496.0
        s = z - tl.log(-tl.log(u))
        s = tl.where(inb, s, -float("inf"))
        m = tl.max(s, axis=0)
        i = tl.min(tl.where(s == m, cols, V), axis=0)  # the first column at the block's max
        take = m > best
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(OUT + row, best_i.to(tl.int64))


def gumbel_argmax_triton(z: torch.Tensor, words: torch.Tensor, step: int) -> torch.Tensor:
    """kernels.sampling.gumbel_argmax on Triton: z [N, V] (any strides), words [N, 2] int32 on z's device."""
    assert (M1, M2, SPAN) == (0x85EBCA6B, 0xC2B2AE35, 2.0**52)  # the constants written into the kernel
    n, v = z.shape
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n:
        _gumbel_argmax_kernel[(n,)](z, z.stride(0), z.stride(1), v, words.contiguous(), step & 0xFFFFFFFF, out,
                                    SALT0=SALT[0], SALT1=SALT[1], BLOCK=BLOCK)
    return out
