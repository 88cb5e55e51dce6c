"""kernels.truncation.truncated_token_stats: same kept set as kernels.reference, float64 sums.

A token kept by one side and not the other moves the logsumexp by its probability, far beyond the
tolerances here, so matching statistics (and matching -inf target log-probs) check the kept set;
the "ties" rows put equal logits on every top-k / top-p / min-p boundary.
"""
from __future__ import annotations

import math

import pytest
import torch

from entcal import kernels
from entcal.kernels import reference, truncation
from entcal.kernels.truncation import compact, kth_largest, truncated_token_stats

from kernel_cases import DEVICE, DTYPES, TEMPERATURES, assert_stats_close, make_logits, make_targets

TRUNCATIONS = (
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=20),  # run maxima + gather path (2*k*16 <= V)
    dict(top_k=300),  # torch.topk path
    dict(top_k=5000),  # >= V: nothing truncated
    dict(top_p=0.5),
    dict(top_p=0.9),
    dict(top_p=0.99),
    dict(min_p=0.05),
    dict(min_p=0.3),
    dict(top_nsigma=1.0),
    dict(top_nsigma=2.5),
    dict(top_k=20, top_p=0.8),
    dict(top_k=50, top_p=0.95, min_p=0.02),
    dict(top_p=0.9, min_p=0.05, top_nsigma=1.5),
    dict(top_k=10, top_p=0.7, min_p=0.1, top_nsigma=1.0),
)
KINDS = ("randn", "ties", "neg_inf", "one_hot", "uniform", "offset-300")
KTH_CASES = ((1, "randn"), (7, "ties"), (20, "ties"), (31, "randn"), (200, "ties"))


def _name(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trunc", TRUNCATIONS, ids=_name)
def test_matches_reference(trunc, kind, temperature):
    x = make_logits(kind, 4, 1000, torch.bfloat16, seed=21)
    t = make_targets(x)
    got = truncated_token_stats(x, t, temperature=temperature, **trunc)
    assert_stats_close(got, x, t, temperature=temperature, **trunc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trunc", (dict(top_k=20, top_p=0.8), dict(min_p=0.1, top_nsigma=2.0)),
                         ids=_name)
def test_dtypes_split_rows_and_odd_v(trunc, dtype):
    x = make_logits("randn", 3, 1031, dtype, seed=22)
    t = make_targets(x)
    got = truncated_token_stats(x, t, temperature=0.9, block=128, splits=3, **trunc)
    assert_stats_close(got, x, t, temperature=0.9, **trunc)


def test_non_contiguous_and_single_row():
    big = make_logits("ties", 4, 1600, torch.float32, seed=23)
    x = big[1::2, 7:1207]
    t = make_targets(x)
    for trunc in (dict(top_k=9, top_p=0.6), dict(min_p=0.2), dict(top_p=0.3)):
        assert_stats_close(truncated_token_stats(x, t, block=256, splits=2, **trunc), x, t, **trunc)
        assert_stats_close(truncated_token_stats(x[:1], t[:1], **trunc), x[:1], t[:1], **trunc)


def test_ties_follow_stable_descending_order():
    """Uniform rows: top-p keeps the lowest indices first; top-k keeps every tie."""
    x = torch.zeros(4, 16, device=DEVICE)
    t = torch.tensor([1, 2, 3, 15], device=DEVICE)
    got = truncated_token_stats(x, t, top_p=0.2)  # mass 1/16 each: keep 4 (0.1875 < 0.2)
    exp = torch.tensor([-math.log(4), -math.log(4), -math.log(4), -math.inf], device=DEVICE)
    torch.testing.assert_close(got.target_logprob, exp)
    torch.testing.assert_close(got.entropy, torch.full((4,), math.log(4), device=DEVICE))
    got = truncated_token_stats(x, t, top_p=0.25)  # mass before the 5th is 0.25, not < 0.25
    exp = torch.tensor([-math.log(4), -math.log(4), -math.log(4), -math.inf], device=DEVICE)
    torch.testing.assert_close(got.target_logprob, exp)
    got = truncated_token_stats(x, t, top_k=3)  # all 16 tie with the 3rd largest
    torch.testing.assert_close(got.entropy, torch.full((4,), math.log(16), device=DEVICE))


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    x = torch.full((2, 40), -5.0, device=DEVICE)
    x[:, 3] = 1.0
    x[:, 9] = (torch.tensor(1.0) + math.log(0.5)).item()  # == max + log(min_p) in float32
    t = torch.tensor([9, 8], device=DEVICE)
    got = truncated_token_stats(x, t, min_p=0.5)
    assert got.target_logprob[0].item() > -math.inf
    assert got.target_logprob[1].item() == -math.inf
    assert_stats_close(got, x, t, min_p=0.5)


def test_target_truncated_away_is_minus_inf():
    x = make_logits("randn", 6, 700, torch.float32, seed=24)
    t = make_targets(x)
    t[1:] = x[1:].argmin(-1)
    for trunc in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.1), dict(top_nsigma=1.0)):
        got = truncated_token_stats(x, t, **trunc)
        assert got.target_logprob[0].item() > -math.inf
        assert bool(torch.isneginf(got.target_logprob[1:]).all()), trunc
        assert_stats_close(got, x, t, **trunc)
        assert bool(torch.isnan(truncated_token_stats(x, None, **trunc).target_logprob).all())


@pytest.mark.parametrize("k,kind", KTH_CASES)
def test_kth_largest_is_exact(k, kind):
    x = make_logits(kind, 3, 4001, torch.bfloat16, seed=25)
    for temperature in (1.0, 0.3):
        z = reference.scaled_logits(x, temperature=temperature)
        exp = torch.topk(z, k, dim=-1).values[:, -1]
        got = kth_largest(x, k, temperature, block=512, splits=2)
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_compact_returns_exactly_the_columns_above_lo():
    x = make_logits("ties", 3, 2000, torch.float32, seed=26)
    lo = torch.tensor([4.0, 3.0, -math.inf], device=DEVICE)
    ids, cnt = compact(x, 1.0, lo, 2048, block=256, splits=3)
    for i in range(3):
        want = (x[i] >= lo[i]).nonzero()[:, 0].int()
        assert cnt[i].item() == want.numel()
        torch.testing.assert_close(ids[i, : cnt[i]].sort().values, want)
        assert bool((ids[i, cnt[i]:] == -1).all())


class _Spy:
    """Stands in for kernels.reference inside kernels.truncation; counts fallback rows."""

    def __init__(self):
        self.rows = 0

    def token_stats(self, logits, *a, **kw):
        self.rows += logits.shape[0]
        return reference.token_stats(logits, *a, **kw)


@pytest.mark.parametrize("trunc,max_buffer,fallback_rows", (
    (dict(top_p=0.9), truncation.MAX_BUFFER, 0),
    (dict(top_k=40, top_p=0.95), truncation.MAX_BUFFER, 0),
    (dict(top_p=0.9), 4, 4),  # buffer too small: exact full-sort fallback
    (dict(top_p=0.9995), truncation.MAX_BUFFER, 4),  # 1 - p within the rounding slack
), ids=str)
def test_top_p_buffer_and_fallback(monkeypatch, trunc, max_buffer, fallback_rows):
    x = make_logits("randn", 4, 1500, torch.bfloat16, seed=27)
    t = make_targets(x)
    spy = _Spy()
    monkeypatch.setattr(truncation, "reference", spy)
    got = truncated_token_stats(x, t, max_buffer=max_buffer, **trunc)
    monkeypatch.undo()
    assert spy.rows == fallback_rows
    assert_stats_close(got, x, t, **trunc)


def test_top_p_mixed_buffer_and_fallback_rows(monkeypatch):
    x = make_logits("randn", 5, 1500, torch.float32, seed=30)
    x[1] = 0.5  # flat row: all 1500 tokens are candidates, more than the buffer
    t = make_targets(x)
    spy = _Spy()
    monkeypatch.setattr(truncation, "reference", spy)
    got = truncated_token_stats(x, t, top_p=0.8, max_buffer=1024, block=256, splits=2)
    monkeypatch.undo()
    assert spy.rows == 1
    assert_stats_close(got, x, t, top_p=0.8)


def test_dispatch_triton_matches_reference():
    x = make_logits("ties", 5, 900, torch.bfloat16, seed=28)
    t = make_targets(x)
    for kw in (dict(top_k=12, temperature=0.8), dict(top_p=0.9), dict(min_p=0.05, top_nsigma=2.0)):
        tri = kernels.token_stats(x, t, impl="triton", **kw)
        ref = kernels.token_stats(x, t, impl="reference", **kw)
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: large V is too slow interpreted")
@pytest.mark.parametrize("v", (50257, 151936))
@pytest.mark.parametrize("trunc", TRUNCATIONS, ids=_name)
def test_large_vocabulary_gpu(trunc, v):
    x = make_logits("randn", 32, v, torch.bfloat16, seed=29)
    t = make_targets(x)
    got = truncated_token_stats(x, t, temperature=0.8, **trunc)
    assert_stats_close(got, x, t, atol=1e-5, rtol=1e-5, temperature=0.8, **trunc)
