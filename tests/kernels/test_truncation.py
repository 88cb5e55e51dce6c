"""kernels.truncation.truncated_token_stats: same kept set as kernels.reference, float64 sums;
kernels.reference's typical / ε / η keep what transformers' warpers keep; top-p, typical, ε and η
follow the float64 rule at boundaries float32 sums get wrong.

A token kept by one side and not the other moves the logsumexp by its probability, far beyond the
tolerances here, so matching statistics (and matching -inf target log-probs) check the kept set;
the "ties" rows put equal logits on every top-k / top-p / min-p boundary.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entcal import kernels
from entcal.kernels import reference, truncation
from entcal.kernels.truncation import compact, kth_largest, truncated_token_stats

from kernel_cases import (DEVICE, DTYPES, TEMPERATURES, assert_stats_close, float32_flip,
                          make_logits, make_targets, np_cutoff_keep, np_top_p_keep, np_typical_keep,
                          transformers_keep)

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
NEW_RULES = (  # typical, ε, η alone
    dict(typical_p=0.9),
    dict(typical_p=0.3),
    dict(typical_p=0.999),
    dict(epsilon_cutoff=3e-4),
    dict(epsilon_cutoff=0.02),
    dict(eta_cutoff=3e-4),
    dict(eta_cutoff=0.02),
)
COMBINED = (  # with top-k, top-p, min-p (transformers' order), and top-nσ last
    dict(top_k=50, typical_p=0.9),
    dict(top_p=0.9, typical_p=0.8),
    dict(top_p=0.95, epsilon_cutoff=1e-3),
    dict(min_p=0.01, epsilon_cutoff=3e-4, eta_cutoff=1e-3),
    dict(top_k=40, top_p=0.9, min_p=0.02, typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=2e-3),
    dict(typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=3e-3, top_nsigma=1.0),
)
TRUNCATIONS = TRUNCATIONS + NEW_RULES + COMBINED
KINDS = ("randn", "ties", "neg_inf", "one_hot", "uniform", "offset-300")
# rows that break naive code, for the comparison with transformers' warpers
HF_KINDS = ("randn", "ties", "neg_inf", "one_hot", "uniform", "near_uniform", "offset+300",
            "offset-300")
HF_RULES = NEW_RULES + tuple(c for c in COMBINED if "top_nsigma" not in c)
# (rule, kind, dtype); not top-p on rows with ties: transformers' top-p breaks them by an unstable
# sort, ours (as before) by the lower index first. bf16 rows have many ties.
HF_CASES = tuple(
    (rule, kind, dtype) for rule in HF_RULES for kind in HF_KINDS
    for dtype in (torch.float32, torch.bfloat16)
    if not ("top_p" in rule
            and (dtype == torch.bfloat16 or kind in ("ties", "uniform", "near_uniform")))
)
V_QWEN = 151936
KTH_CASES = ((1, "randn"), (7, "ties"), (20, "ties"), (31, "randn"), (200, "ties"))


def _name(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


def _id(value):
    return _name(value) if isinstance(value, dict) else str(value)


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


@pytest.mark.parametrize("v,top_p,kept", ((1000, 0.8, 800), (1000, 0.9, 900), (3000, 0.7, 2100)))
def test_a_prefix_mass_exactly_p_is_decided_as_in_exact_arithmetic(v, top_p, kept):
    """v equal tokens: the mass before token kept + 1 is exactly p, so it is dropped; float64 sums
    of fl(1/v) land on either side of p by rounding alone (reference.MASS_TOL decides them)."""
    x = torch.zeros(2, v, device=DEVICE)
    t = torch.tensor([kept - 1, kept], device=DEVICE)
    assert int(reference.truncation_mask(x, top_p=top_p).sum(1)[0]) == kept
    for got in (truncated_token_stats(x, t, top_p=top_p), reference.token_stats(x, t, top_p=top_p)):
        torch.testing.assert_close(got.entropy, torch.full((2,), math.log(kept), device=DEVICE))
        assert got.target_logprob[1].item() == -math.inf


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
    (dict(top_p=0.9995), truncation.MAX_BUFFER, 0),  # float64 masses: no float32 slack needed
    (dict(top_p=1 - 1e-9), truncation.MAX_BUFFER, 4),  # 1 - p within the (float64) slack
    (dict(typical_p=0.9), truncation.MAX_BUFFER, 0),
    (dict(typical_p=0.9), 4, 4),
    (dict(epsilon_cutoff=1e-3, eta_cutoff=1e-3), 4, 0),  # thresholds: never a buffer
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
    for kw in (dict(top_k=12, temperature=0.8), dict(top_p=0.9), dict(min_p=0.05, top_nsigma=2.0),
               dict(typical_p=0.9, temperature=0.8), dict(epsilon_cutoff=1e-3),
               dict(eta_cutoff=1e-3, top_p=0.95)):
        tri = kernels.token_stats(x, t, impl="triton", **kw)
        ref = kernels.token_stats(x, t, impl="reference", **kw)
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name,value", (("typical_p", 0.0), ("typical_p", 1.5),
                                        ("epsilon_cutoff", -0.1), ("eta_cutoff", 1.0)))
def test_dispatch_checks_the_new_knobs(name, value):
    x = make_logits("randn", 2, 50, torch.float32)
    with pytest.raises(ValueError, match=f"^{name} must be "):
        kernels.token_stats(x, **{name: value})


# ---- typical, ε, η: the kept set of transformers' own warpers ---------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("rule,kind,dtype", HF_CASES, ids=_id)
def test_reference_keeps_what_transformers_warpers_keep(rule, kind, dtype, temperature):
    x = make_logits(kind, 6, 777, dtype, seed=31)
    z = reference.scaled_logits(x, temperature=temperature)
    got = reference.truncation_mask(z, **rule) & ~torch.isneginf(z)
    exp = transformers_keep(z, **rule) & ~torch.isneginf(z)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", HF_KINDS)
@pytest.mark.parametrize("rule", NEW_RULES, ids=_name)
def test_triton_keeps_what_transformers_warpers_keep(rule, kind, dtype):
    x = make_logits(kind, 4, 600, dtype, seed=32)
    t = make_targets(x)
    t[1] = x[1].float().argmin()  # the least likely token: dropped by every rule here
    z = reference.scaled_logits(x, temperature=0.8)
    keep = transformers_keep(z, **rule)
    got = truncated_token_stats(x, t, temperature=0.8, **rule)
    assert_stats_close(got, x, t, temperature=0.8, keep=keep, **rule)


def _typical_drops_the_max(v=1000):
    """One token at q = 0.3, a group of 100 at 0.006, the rest share 0.1: H ~ 4.3 nats, the group
    is the most typical, so typical_p = 0.5 keeps the group only (the argmax is dropped)."""
    q = torch.full((v,), 0.1 / (v - 101), dtype=torch.float64)
    q[0], q[1:101] = 0.3, 0.6 / 100
    return q.log().float()[None].to(DEVICE)


def test_typical_can_drop_the_most_likely_token_and_top_nsigma_follows_the_survivors():
    x = _typical_drops_the_max().repeat(2, 1)
    t = torch.tensor([0, 5], device=DEVICE)
    for rule in (dict(typical_p=0.5), dict(typical_p=0.5, top_nsigma=0.5),
                 dict(typical_p=0.5, epsilon_cutoff=1e-3, eta_cutoff=1e-3)):
        keep = reference.truncation_mask(x.float(), **rule)
        assert not keep[0, 0] and bool(keep[0, 1:101].all()) and not keep[0, 101:].any(), rule
        hf = transformers_keep(x, **{k: v for k, v in rule.items() if k != "top_nsigma"})
        torch.testing.assert_close(keep, hf, rtol=0, atol=0)  # (top-nσ drops nothing more here)
        got = truncated_token_stats(x, t, **rule)
        assert got.target_logprob[0].item() == -math.inf
        torch.testing.assert_close(got.entropy, torch.full((2,), math.log(100), device=DEVICE))
        assert_stats_close(got, x, t, **rule)


# ---- the float64 rule at the float32 boundary -------------------------------------------------

def _top_p_flip(v: int, p: float, seed: int):
    """Two float32 rows, equal but for their max logit (a few float32 steps apart), on either side
    of a top-p decision of the float64 rule, the flipping token's prefix mass 1e-9 or more from p
    (closer is within reference.MASS_TOL's reach); and the token that flips."""
    g = np.random.default_rng(seed)
    row = (g.standard_normal(v) * 3).astype(np.float32)
    top = int(row.argmax())
    ra, rb = float32_flip(row, top, lambda r: np_top_p_keep(r, p)[0], row[top], row[top] + 0.5)
    flip = int(np.flatnonzero(np_top_p_keep(ra, p)[0] != np_top_p_keep(rb, p)[0])[0])
    for r, way in ((ra, -np.inf), (rb, np.inf)):  # lower max: less mass before the flip token
        while abs(np_top_p_keep(r, p)[1][flip] - p) < 1e-9:
            r[top] = np.nextafter(r[top], np.float32(way))
    ka, kb = np_top_p_keep(ra, p)[0], np_top_p_keep(rb, p)[0]
    assert ka[flip] and not kb[flip]
    return ra, rb, ka, kb, flip


@pytest.mark.parametrize("seed", (0, 2))
def test_reference_top_p_is_the_float64_rule_at_152k(seed):
    """V = 151,936: the boundary token's prefix mass within 1e-5 of p (here 1e-9 to ~1e-8: a few
    float32 steps of the max logit away); a float32 softmax / cumsum errs by ~5e-6 on such rows,
    and the float32 reference this replaced got 11 of 12 of them wrong (seeds 0-5)."""
    ra, rb, ka, kb, flip = _top_p_flip(V_QWEN, 0.95, seed)
    for row, want in ((ra, ka), (rb, kb)):
        assert 1e-9 <= abs(np_top_p_keep(row, 0.95)[1][flip] - 0.95) < 1e-5
        keep = reference.truncation_mask(torch.from_numpy(row)[None], top_p=0.95)[0]
        torch.testing.assert_close(keep, torch.from_numpy(want), rtol=0, atol=0)


ON_CUDA_ONLY = (pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: V = 151,936 is too slow interpreted"))


@pytest.mark.parametrize("v,margin", ((3001, 1e-7), pytest.param(V_QWEN, 1e-5, marks=ON_CUDA_ONLY)))
def test_triton_top_p_is_the_float64_rule_at_the_boundary(v, margin):
    ra, rb, ka, kb, flip = _top_p_flip(v, 0.95, seed=3)
    x = torch.from_numpy(np.stack([ra, rb])).to(DEVICE)
    keep = torch.from_numpy(np.stack([ka, kb])).to(DEVICE)
    for row in (ra, rb):
        assert 1e-9 <= abs(np_top_p_keep(row, 0.95)[1][flip] - 0.95) < margin
    t = torch.full((2,), flip, device=DEVICE)
    got = truncated_token_stats(x, t, top_p=0.95)
    assert (got.target_logprob > -math.inf).tolist() == [bool(ka[flip]), bool(kb[flip])]
    assert_stats_close(got, x, t, keep=keep, top_p=0.95)


CUTOFF_FLIPS = (dict(epsilon_cutoff=3e-4), dict(epsilon_cutoff=2e-3), dict(eta_cutoff=3e-4),
                dict(eta_cutoff=2e-3))


@pytest.mark.parametrize("rule", CUTOFF_FLIPS, ids=_name)
def test_epsilon_and_eta_are_the_float64_rule_at_the_boundary(rule):
    """The token nearest the threshold moved one float32 step either side of the float64 rule's
    decision: reference and Triton keep it exactly when the float64 rule does."""
    row = (np.random.default_rng(4).standard_normal(2000) * 2).astype(np.float32)
    eps, eta = rule.get("epsilon_cutoff", 0.0), rule.get("eta_cutoff", 0.0)
    keeps = lambda r: np_cutoff_keep(r, eps, eta)
    logq = row - row.max() - np.log(np.exp(row - row.max()).sum())
    thr = eps or min(eta, np.sqrt(eta) * np.exp((np.exp(logq) * logq).sum()))
    j = int(np.abs(logq - np.log(thr)).argmin())
    ra, rb = float32_flip(row, j, keeps, row[j] - 3, row[j] + 3)
    assert not keeps(ra)[j] and keeps(rb)[j]
    x = torch.from_numpy(np.stack([ra, rb])).to(DEVICE)
    t = torch.full((2,), j, device=DEVICE)
    keep = torch.from_numpy(np.stack([keeps(ra), keeps(rb)])).to(DEVICE)
    torch.testing.assert_close(reference.truncation_mask(x, **rule), keep, rtol=0, atol=0)
    got = truncated_token_stats(x, t, **rule)
    assert (got.target_logprob > -math.inf).tolist() == [False, True]
    assert_stats_close(got, x, t, keep=keep, **rule)


@pytest.mark.parametrize("delta", (-1e-8, 1e-8))
def test_typical_is_the_float64_rule_at_the_boundary(delta):
    """typical_p 1e-8 below / above a cumulative mass of the float64 rule's order: the next token
    is dropped / kept, by the reference and by Triton (float32 sums err by ~1e-6 here)."""
    row = (np.random.default_rng(5).standard_normal(3001) * 2).astype(np.float32)
    _, cum = np_typical_keep(row, 0.9)
    j = int((cum < 0.9).sum())
    mass = float(cum[j] + delta)
    keep = np_typical_keep(row, mass)[0]
    flip = np.flatnonzero(keep != np_typical_keep(row, float(cum[j] - delta))[0])
    assert flip.size == 1, "the two masses should differ by one token"
    x = torch.from_numpy(row)[None].to(DEVICE)
    torch.testing.assert_close(reference.truncation_mask(x, typical_p=mass)[0],
                               torch.from_numpy(keep).to(DEVICE), rtol=0, atol=0)
    t = torch.tensor([int(flip[0])], device=DEVICE)
    got = truncated_token_stats(x, t, typical_p=mass)
    assert bool(got.target_logprob[0] > -math.inf) == bool(keep[flip[0]]) == (delta > 0)
    assert_stats_close(got, x, t, keep=torch.from_numpy(keep)[None].to(DEVICE), typical_p=mass)


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
