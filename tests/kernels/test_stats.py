"""kernels.stats.token_stats (one streaming pass per row) against float64 truth.

On CPU these run in Triton's interpreter (~0.3M elements/s), so shapes stay small; the large
vocabularies are GPU-only tests.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from entcal import kernels
from entcal.kernels import reference
from entcal.kernels.stats import token_stats

from kernel_cases import (DEVICE, DTYPES, ROW_KINDS, TEMPERATURES, assert_stats_close,
                          make_logits, make_targets, truth)

# (N, V, block, splits): V below / equal to / above the block, odd V, N = 1, split rows
SHAPES = (
    (1, 7, None, None),
    (3, 200, 256, None),
    (4, 256, 256, None),
    (4, 1031, 256, None),
    (2, 1031, 128, 3),
    (1, 4099, 512, 4),
    (5, 2053, None, None),
)
GPU_SHAPES = ((64, 50257), (16, 151936), (1, 151936))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,block,splits", SHAPES)
def test_shapes_and_dtypes(n, v, block, splits, dtype):
    x = make_logits("randn", n, v, dtype)
    t = make_targets(x)
    got = token_stats(x, t, temperature=1.0, block=block, splits=splits)
    assert_stats_close(got, x, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_row_kinds(kind, dtype):
    x = make_logits(kind, 4, 1000, dtype, seed=3)
    t = make_targets(x)
    got = token_stats(x, t, block=256, splits=2)
    assert_stats_close(got, x, t)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", ("randn", "offset-300", "neg_inf"))
def test_temperature(kind, temperature):
    x = make_logits(kind, 3, 777, torch.bfloat16, seed=4)
    t = make_targets(x)
    got = token_stats(x, t, temperature=temperature, block=256)
    assert_stats_close(got, x, t, temperature=temperature)


def test_uniform_rows_have_entropy_log_v():
    for v in (1, 2, 999, 1024):
        x = torch.full((2, v), -3.5, device=DEVICE)
        got = token_stats(x, None, block=256)
        torch.testing.assert_close(got.entropy, torch.full((2,), math.log(v), device=DEVICE))
        lse = torch.full((2,), math.log(v) - 3.5, device=DEVICE)
        torch.testing.assert_close(got.logsumexp, lse)


@pytest.mark.parametrize("margin", (8.0, 14.0, 20.0, 26.0))
def test_peaked_rows_keep_relative_precision(margin):
    """H ~ V e^-margin * margin down to ~1e-7: log s = log c + log1p(r/c) keeps H to ~1e-6
    relative, where the float32 reference (1 + r rounds to 1) is off by several percent."""
    x = make_logits("randn", 4, 1000, torch.float32, seed=5) / 10
    x[:, 17] = margin
    for offset in (0.0, 300.0, -300.0):
        xo = x + offset  # float32: truth is taken on the same rounded inputs
        got = token_stats(xo, None, block=256, splits=3)
        exp = truth(xo, None).entropy
        assert bool((exp > 0).all())
        torch.testing.assert_close(got.entropy.double(), exp, rtol=1e-5, atol=0.0)


def test_one_finite_token_and_targets_at_minus_inf():
    x = torch.full((3, 600), -math.inf, device=DEVICE)
    x[0, 5] = 2.0
    x[1, [5, 300, 599]] = torch.tensor([1.0, 1.0, -1.0], device=DEVICE)
    x[2, :] = torch.linspace(-4, 4, 600, device=DEVICE)
    t = torch.tensor([5, 7, 599], device=DEVICE)
    got = token_stats(x, t, block=128, splits=3)
    assert got.entropy[0].item() == 0.0
    assert got.logsumexp[0].item() == 2.0
    assert got.target_logprob[1].item() == -math.inf
    assert_stats_close(got, x, t)


def test_non_contiguous_rows_and_columns():
    big = make_logits("randn", 6, 1500, torch.bfloat16, seed=6)
    x = big[::2, 100:1333]  # row stride 3000, odd V
    assert not x.is_contiguous()
    t = make_targets(x)
    assert_stats_close(token_stats(x, t, block=256), x, t)
    xt = make_logits("randn", 700, 3, torch.float32, seed=7).t()  # column stride 3
    t = make_targets(xt)
    assert_stats_close(token_stats(xt, t, block=128, splits=2), xt, t)


def test_no_targets_gives_nan_and_empty_batch():
    x = make_logits("randn", 2, 300)
    got = token_stats(x, None)
    assert bool(torch.isnan(got.target_logprob).all())
    empty = token_stats(torch.empty(0, 300, device=DEVICE), None)
    assert all(f.shape == (0,) and f.dtype == torch.float32 for f in empty)


def test_targets_int32_and_int64_agree():
    x = make_logits("randn", 3, 500)
    t = make_targets(x)
    a = token_stats(x, t.int())
    b = token_stats(x, t.long())
    torch.testing.assert_close(a.target_logprob, b.target_logprob, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("randn", "neg_inf", "offset+300"))
def test_dispatch_triton_matches_reference(kind):
    x = make_logits(kind, 4, 1000, torch.bfloat16, seed=8)
    t = make_targets(x)
    for temperature in (1.0, 0.8):
        tri = kernels.token_stats(x, t, temperature=temperature, impl="triton")
        ref = kernels.token_stats(x, t, temperature=temperature, impl="reference")
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    h = make_logits("randn", 5, 48, torch.bfloat16, seed=9)
    w = make_logits("randn", 300, 48, torch.bfloat16, seed=10) / 5
    t = make_targets(h @ w.T)
    tri = kernels.fused_token_stats(h, w, t, temperature=0.9, impl="triton")
    ref = kernels.fused_token_stats(h, w, t, temperature=0.9, impl="reference")
    for a, b in zip(tri, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("knob,value,words", (
    ("temperature", 0.0, "temperature must be > 0, got 0.0"),
    ("top_k", -1, "top_k must be >= 0, got -1"),
    ("top_p", 1.5, "top_p must be <= 1, got 1.5"),
    ("min_p", 1.0, "min_p must be < 1, got 1.0"),
    ("top_nsigma", -2.0, "top_nsigma must be >= 0, got -2.0"),
))
def test_dispatch_refuses_a_knob_outside_its_range(knob, value, words):
    x = make_logits("randn", 2, 50)
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match=re.escape(words)):
            kernels.token_stats(x, None, impl=impl, **{knob: value})
    if knob == "temperature":
        with pytest.raises(ValueError, match=re.escape(words)):
            kernels.fused_token_stats(x, x, None, temperature=value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: large V is too slow interpreted")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", GPU_SHAPES)
def test_large_vocabulary_gpu(n, v, dtype):
    x = make_logits("randn", n, v, dtype, seed=11)
    t = make_targets(x)
    assert_stats_close(token_stats(x, t), x, t, atol=1e-5, rtol=1e-5)
    assert_stats_close(token_stats(x, t, temperature=0.7), x, t, atol=1e-5, rtol=1e-5,
                       temperature=0.7)
    ref = reference.token_stats(x, t)
    got = kernels.token_stats(x, t)  # impl="auto" is Triton on CUDA
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-4)
