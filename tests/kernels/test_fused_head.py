"""kernels.fused_head.fused_token_stats (tl.dot tiles into the running state) vs float64 truth.

The float32 baseline is kernels.reference.fused_token_stats (float32 matmul, then the stats);
the truth is the float64 product hidden @ weight^T followed by float64 statistics.
"""
from __future__ import annotations

import math

import pytest
import torch

from entcal.kernels import reference
from entcal.kernels.fused_head import fused_token_stats

from kernel_cases import DTYPES, TEMPERATURES, assert_stats_close, make_logits, make_targets

# (N, V, D, launch overrides): V/D not multiples of the tiles, N = 1, split vocabulary, groups
SHAPES = (
    (1, 50, 16, {}),
    (37, 1003, 72, {}),
    (130, 515, 64, dict(splits=3, block_n=32, block_v=64, group_n=2)),
    (5, 300, 48, dict(splits=4, block_n=16, block_v=32, group_n=1)),
)
GPU_SHAPES = ((256, 49152, 576), (256, 151936, 896), (3, 151936, 896))


def _inputs(n, v, d, dtype, seed=0):
    h = make_logits("randn", n, d, torch.float32, seed=seed) / 3
    w = make_logits("randn", v, d, torch.float32, seed=seed + 1) / math.sqrt(d)
    return h.to(dtype), w.to(dtype)


def _check(got, h, w, t, temperature=1.0, **tol):
    logits = h.double() @ w.double().T
    ref = reference.fused_token_stats(h, w, t, temperature=temperature)
    assert_stats_close(got, logits, t, ref=ref, temperature=temperature, **tol)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,d,launch", SHAPES)
def test_matches_truth(n, v, d, launch, dtype, temperature):
    h, w = _inputs(n, v, d, dtype)
    t = make_targets(h.double() @ w.double().T)
    got = fused_token_stats(h, w, t, temperature=temperature, **launch)
    _check(got, h, w, t, temperature)


def test_non_contiguous_inputs_and_no_targets():
    h, w = _inputs(40, 333, 40, torch.bfloat16, seed=2)
    hs = h[::2]  # row stride 80
    wt = w.t().contiguous().t()  # [V, D] view with column-major storage (tied-embedding-like)
    assert not hs.is_contiguous() and not wt.is_contiguous()
    t = make_targets(hs.double() @ wt.double().T)
    _check(fused_token_stats(hs, wt, t, splits=2), hs, wt, t)
    got = fused_token_stats(hs, wt, None)
    assert bool(torch.isnan(got.target_logprob).all())


def test_peaked_rows():
    """One logit 20+ above the rest: H ~ 1e-5, kept to ~1e-5 relative (shifted state)."""
    h, w = _inputs(8, 400, 32, torch.float32, seed=3)
    w = w / 10
    w[17] = 0.0
    w[17, 0] = 1.0
    h[:, 0] = 25.0
    got = fused_token_stats(h, w, None, splits=2, block_v=64)
    logits = h.double() @ w.double().T
    z = logits - torch.logsumexp(logits, -1, keepdim=True)
    exp = -(z.exp() * z).sum(-1)
    assert bool((exp < 1e-4).all())
    torch.testing.assert_close(got.entropy.double(), exp, rtol=1e-4, atol=0.0)


def test_empty_batch():
    h, w = _inputs(1, 64, 16, torch.float32)
    got = fused_token_stats(h[:0], w, None)
    assert all(f.shape == (0,) for f in got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: large V x D is too slow interpreted")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("n,v,d", GPU_SHAPES)
def test_large_vocabulary_gpu(n, v, d, dtype):
    h, w = _inputs(n, v, d, dtype, seed=4)
    t = make_targets(h.double() @ w.double().T)
    got = fused_token_stats(h, w, t, temperature=0.9)
    _check(got, h, w, t, 0.9, atol=2e-5, rtol=2e-5)
