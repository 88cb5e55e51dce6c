"""kernels.sampling: paired Gumbel-max draws, token = argmax_w z_w + G(row seed, step, w), by the numpy
reference and by the Triton kernel (kernels.sampling_triton; in Triton's interpreter when there is no CUDA
device). What tasks.generate relies on: the two agree bit for bit, the draws are exact draws from softmax(z)
that never pick a −inf token, a row's draws are a function of its seed and step alone, and two close
distributions of one row share almost every draw."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from entcal.kernels import gumbel_argmax, sampling, seed_words
from kernel_cases import DEVICE

IMPLS = ("reference", "triton")
M32 = 1 << 32


def _seeds(n: int, seed: int) -> list[int]:
    """n row seeds over the full 63-bit range tasks.generate.row_seed produces."""
    return np.random.default_rng(seed).integers(0, 1 << 63, size=n, dtype=np.uint64).tolist()


def _logits(n: int, v: int, seed: int, *, inf_share: float = 0.3, dtype=torch.float32) -> torch.Tensor:
    """[n, v] logits with −inf entries (every row keeps one finite token, except one all −inf row when n > 2)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 3
    drop = torch.rand(n, v, generator=g) < inf_share
    drop[:, torch.randint(0, v, (1,), generator=g)] = False
    if n > 2:
        drop[1] = True
    return z.masked_fill(drop, -math.inf).to(dtype).to(DEVICE)


def _draw(z, words, step, impl):
    return gumbel_argmax(z, words, step, impl=impl)


# ---------------------------------------------------------------- (a) Triton == reference, bit for bit
@pytest.mark.parametrize("n, v", [(1, 1), (1, 7), (3, 1023), (4, 1025), (5, 3001), (2, 2 * 1024 + 1)],
                         ids=lambda x: str(x))
def test_triton_draws_equal_the_reference_bit_for_bit(n, v):
    z = _logits(n, v, seed=n * 7919 + v)
    seeds = _seeds(n, seed=v)
    if n > 1:
        seeds[-1] = seeds[0]  # two rows of one seed, other logits: each still its own draw
    words = seed_words(seeds)
    for step in (0, 1, 17, (1 << 31) - 1, M32 - 1, M32 + 5):
        ref = _draw(z, words, step, "reference")
        tri = _draw(z, words, step, "triton")
        assert ref.dtype == tri.dtype == torch.int64 and ref.device == tri.device == z.device
        assert torch.equal(tri, ref), (step, tri.tolist(), ref.tolist())
        finite = torch.isfinite(z).any(1)
        assert torch.isfinite(z[torch.arange(n, device=z.device), ref])[finite].all()  # never a −inf token
        assert (ref[~finite] == 0).all()  # a row with no finite token: index 0 (numpy's argmax of all −inf)


@pytest.mark.parametrize("layout", ["every-other-column", "transposed", "bfloat16"])
def test_triton_equals_the_reference_on_non_contiguous_rows(layout):
    n, v = 3, 1537
    base = _logits(n, 2 * v, seed=5) if layout == "every-other-column" else _logits(n, v, seed=5)
    if layout == "every-other-column":
        z = base[:, ::2]  # stride_v = 2
    elif layout == "transposed":
        z = base.t().contiguous().t()  # stride_n = 1, stride_v = n
    else:
        z = base.to(torch.bfloat16)
    assert layout == "bfloat16" or not z.is_contiguous()
    words = seed_words(_seeds(n, seed=11))
    for step in range(4):
        want = _draw(z.contiguous().float(), words, step, "reference")
        assert torch.equal(_draw(z, words, step, "triton"), want)
        assert torch.equal(_draw(z, words, step, "reference"), want)


# ---------------------------------------------------------------- (b) exact draws from softmax(z)
Z = [1.0, -math.inf, 0.0, 2.5, -math.inf, -1.0, 0.4, -5.0, -math.inf]  # V = 9, q(token 7) ≈ 4e-4


def _chi_square_p(counts: np.ndarray, q: np.ndarray) -> float:
    keep = q > 0
    return float(stats.chisquare(counts[keep], counts.sum() * q[keep]).pvalue)


def test_draws_over_many_steps_follow_softmax_and_never_pick_minus_inf():
    z = torch.tensor([Z], device=DEVICE)
    q = torch.softmax(torch.tensor(Z, dtype=torch.float64), 0).numpy()
    words = seed_words([20240611])
    steps = 20_000
    draws = np.array([int(_draw(z, words, t, "reference")) for t in range(steps)])
    counts = np.bincount(draws, minlength=len(Z))
    assert counts[q == 0].sum() == 0  # −inf tokens: never
    assert counts[7] > 0  # the 4e-4 token: drawn (≈ 8 times)
    p = _chi_square_p(counts, q)
    print(f"\n20k steps of one row: chi-square p = {p:.3g}, counts {counts.tolist()}")
    assert p > 1e-4, (p, counts.tolist(), (steps * q).round(1).tolist())


def test_draws_over_many_rows_follow_softmax_and_tiny_probabilities_are_drawn_at_their_rate():
    """20k rows of one step (the Triton kernel on 256 of them), and 2M rows of a two-token row whose second token
    has q = 1e-5: the Gumbel tail reaches it at its rate (20 expected: Poisson bounds at p ≈ 1e-5)."""
    rows = 20_000
    z = torch.tensor([Z], device=DEVICE).expand(rows, -1)
    words = seed_words(_seeds(rows, seed=3))
    draws = _draw(z, words, 0, "reference").cpu()
    q = torch.softmax(torch.tensor(Z, dtype=torch.float64), 0).numpy()
    counts = np.bincount(draws.numpy(), minlength=len(Z))
    assert counts[q == 0].sum() == 0 and _chi_square_p(counts, q) > 1e-4, counts.tolist()
    assert torch.equal(_draw(z[:256], words[:256], 0, "triton").cpu(), draws[:256])
    tiny = torch.tensor([[0.0, math.log(1e-5 / (1 - 1e-5))]], device=DEVICE)  # q = (1 − 1e-5, 1e-5)
    hits = 0
    for chunk in range(10):
        w = seed_words(_seeds(200_000, seed=100 + chunk))
        hits += int(_draw(tiny.expand(200_000, -1), w, 7, "reference").sum())
    print(f"\nq = 1e-5 over 2M draws: {hits} hits (20 expected)")
    assert 5 <= hits <= 45, hits


def _fmix_inverse(h: int) -> int:
    """kernels.sampling._fmix's inverse on one uint32 (murmur3's finaliser is a bijection)."""
    def unshift(x: int, s: int) -> int:
        y = x
        for _ in range(32 // s + 1):
            y = x ^ (y >> s)
        return y & (M32 - 1)
    h = unshift(h, 16)
    h = h * pow(sampling.M2, -1, M32) % M32
    h = unshift(h, 13)
    h = h * pow(sampling.M1, -1, M32) % M32
    return unshift(h, 16)


def _keys_for(token: int, h1: int, h2: int) -> np.ndarray:
    """[1, 2] row keys (kernels.sampling.row_keys' form) whose hashes of ``token`` are h1 and h2."""
    t1, t2 = sampling._token_hashes(token + 1)
    return np.array([[_fmix_inverse(h1) ^ int(t1[token]), _fmix_inverse(h2) ^ int(t2[token])]], dtype=np.uint32)


def test_gumbel_noise_range_at_the_extreme_hashes():
    """The noise's range sets which tokens can be drawn at all: from −log(53·ln 2) ≈ −3.61 (the lowest hash,
    u = 2^−53) up to ≈ 36.7 nats (a token ~40 nats below the row's top is never drawn, q < V·e^−40)."""
    for h1, h2 in ((0, 0), (0xFFFFFFFF, 0xFFFFFFBF), (0xFFFFFFDF, 0xFFFFFFFF)):
        assert int(sampling._fmix(np.array([_fmix_inverse(h1)], np.uint32))[0]) == h1
        g = sampling.gumbel_noise(_keys_for(2, h1, h2), 3)[0, 2]
        assert math.isfinite(g) and -3.63 < g < 37.5, (hex(h1), hex(h2), g)
    assert sampling.gumbel_noise(_keys_for(2, 0, 0), 3)[0, 2] == pytest.approx(-math.log(53 * math.log(2)))


def test_gumbel_noise_is_finite_at_the_top_hash():
    """At the top hash u = 1 − 2^−53 exactly (52 random bits + 0.5 is exact in float64): finite noise."""
    g = sampling.gumbel_noise(_keys_for(2, 0xFFFFFFFF, 0xFFFFFFFF), 3)[0, 2]
    assert math.isfinite(g) and g == pytest.approx(-math.log(-math.log1p(-(2.0 ** -53)))), g


# ---------------------------------------------------------------- (c) a row's draws: its seed and step only
@pytest.mark.parametrize("impl", IMPLS)
def test_a_rows_draws_depend_only_on_its_seed_and_step(impl):
    n, v, steps = 6, 257, 5
    z = _logits(n, v, seed=9, inf_share=0.2)
    seeds = _seeds(n, seed=21)
    words = seed_words(seeds)
    whole = torch.stack([_draw(z, words, t, impl) for t in range(steps)], 1)  # [n, steps]
    perm = torch.tensor([4, 0, 5, 2, 3, 1])
    for t in range(steps):
        assert torch.equal(_draw(z[perm], words[perm], t, impl), whole[perm.to(z.device), t])  # batch order
        for i in (0, 3, 5):  # alone, and beside other rows with other logits
            assert int(_draw(z[i : i + 1], words[i : i + 1], t, impl)) == int(whole[i, t])
            others = torch.cat([_logits(2, v, seed=100 + t), z[i : i + 1]])
            w = torch.cat([seed_words(_seeds(2, seed=200 + t)), words[i : i + 1]])
            assert int(_draw(others, w, t, impl)[-1]) == int(whole[i, t])
    assert torch.equal(_draw(z, words.to(DEVICE), 2, impl), whole[:, 2])  # seed words on the logits' device
    assert not (whole == whole[:, :1]).all()  # the step moves the draws
    flat = torch.zeros(1, v, device=DEVICE)  # q uniform: the draw is the noise's argmax alone
    hi_only = [seeds[0] ^ (1 << 40), seeds[0]]  # seeds that differ in the high word only
    a, b = (torch.stack([_draw(flat, seed_words([s]), t, impl) for t in range(8)]) for s in hi_only)
    assert not torch.equal(a, b)


def test_seed_words_are_the_seeds_bit_patterns():
    seeds = [0, 1, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 0x1234_5678_9ABC_DEF0 & ((1 << 63) - 1)]
    words = seed_words(seeds)
    assert words.dtype == torch.int32 and tuple(words.shape) == (len(seeds), 2)
    u = words.numpy().view(np.uint32).astype(np.uint64)
    assert [int(lo) | int(hi) << 32 for lo, hi in u] == seeds
    with pytest.raises(ValueError, match="expected z"):
        gumbel_argmax(torch.zeros(3, 5), seed_words([1, 2]), 0)


# ---------------------------------------------------------------- (d) paired draws of close distributions
def test_two_close_distributions_share_almost_every_draw():
    """p and q of total variation 0.6% on a 49,152-token row: with the noise keyed by (seed, step, token),
    about TV of the steps draw different tokens (at most 2·TV/(1 + TV) for Gumbel-max); inverse-CDF
    sampling in vocabulary order with shared uniforms moves with the CDF's total shift instead."""
    v, target_tv, steps = 49_152, 0.006, 2000
    g = torch.Generator().manual_seed(0)
    zp = torch.randn(v, generator=g, dtype=torch.float64) * 2
    direction = torch.randn(v, generator=g, dtype=torch.float64)

    def tv(eps: float) -> float:
        return 0.5 * float((torch.softmax(zp, 0) - torch.softmax(zp + eps * direction, 0)).abs().sum())

    lo, hi = 0.0, 1.0
    for _ in range(40):  # TV grows with the step eps: bisect to the target
        lo, hi = ((lo + hi) / 2, hi) if tv((lo + hi) / 2) < target_tv else (lo, (lo + hi) / 2)
    z = torch.stack([zp, zp + lo * direction]).float().to(DEVICE)
    measured_tv = tv(lo)
    assert abs(measured_tv - target_tv) < 1e-4
    words = seed_words([987_654_321] * 2)  # both rows: one seed
    draws = torch.stack([_draw(z, words, t, "reference") for t in range(steps)]).cpu()
    share = float((draws[:, 0] != draws[:, 1]).double().mean())
    cdf = torch.softmax(z.double().cpu(), -1).cumsum(-1)
    u = torch.rand(steps, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inverse_cdf_share = float((torch.searchsorted(cdf[0:1].expand(steps, -1).contiguous(), u)
                               != torch.searchsorted(cdf[1:2].expand(steps, -1).contiguous(), u)).double().mean())
    print(f"\nTV {measured_tv:.4f}: Gumbel-max draws differ at {share:.2%} of {steps} steps "
          f"(bound 2·TV/(1+TV) = {2 * measured_tv / (1 + measured_tv):.2%}); inverse CDF: {inverse_cdf_share:.2%}")
    assert share <= 0.02, share
    assert share < inverse_cdf_share / 4, (share, inverse_cdf_share)
