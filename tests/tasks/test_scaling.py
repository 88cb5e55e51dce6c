"""tasks/scaling.py: scaling fit, theory simulation, corpus α, plots."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import scaling

PLANTED_SLOPE = -0.2
THEORY_ALPHAS = (1.2, 1.5, 2.0, 3.0)


# --------------------------------------------------------------------------- fit_scaling

def _planted(n_models: int = 8, noise: float = 0.02, seed: int = 1):
    rng = np.random.default_rng(seed)
    params = np.geomspace(1e8, 7e10, n_models)
    entce = 3.0 * params ** PLANTED_SLOPE * np.exp(noise * rng.standard_normal(n_models))
    return params.tolist(), entce.tolist()


def test_fit_scaling_recovers_planted_slope():
    params, entce = _planted()
    fit = scaling.fit_scaling(params, entce, n_boot=1000, seed=0)
    assert abs(fit.slope - PLANTED_SLOPE) < 0.02
    assert fit.slope_ci_low <= PLANTED_SLOPE <= fit.slope_ci_high
    assert fit.slope_ci_low < fit.slope < fit.slope_ci_high
    assert abs(fit.intercept - math.log(3.0)) < 0.5
    assert fit.n_models == 8
    assert 0.9 < fit.r2 <= 1.0


def test_fit_scaling_exact_power_law_and_is_deterministic():
    params = [5e8, 1e9, 7e9, 7e10]
    entce = [0.5 * n ** -0.1 for n in params]
    a = scaling.fit_scaling(params, entce, seed=3)
    b = scaling.fit_scaling(params, entce, seed=3)
    assert a == b
    assert a.slope == pytest.approx(-0.1, abs=1e-12)
    assert a.intercept == pytest.approx(math.log(0.5), abs=1e-9)
    assert a.slope_ci_low == pytest.approx(-0.1, abs=1e-9)  # every resample lies on the line


@pytest.mark.parametrize("bad", [0.0, -0.013])
def test_fit_scaling_non_positive_entce_names_the_model(bad):
    params, entce = _planted()
    entce[2] = bad
    with pytest.raises(ValueError) as err:
        scaling.fit_scaling(params, entce)
    msg = str(err.value)
    assert "model 2" in msg and "EntCE" in msg and "log undefined" in msg
    assert f"{bad:.6g}" in msg and "\n" not in msg


def test_fit_scaling_needs_two_distinct_models():
    with pytest.raises(ValueError, match="at least 2 models"):
        scaling.fit_scaling([1e9], [0.1])
    with pytest.raises(ValueError, match="distinct"):
        scaling.fit_scaling([1e9, 1e9], [0.1, 0.2])
    with pytest.raises(ValueError, match="as many"):
        scaling.fit_scaling([1e9, 2e9], [0.1])


# --------------------------------------------------------------------------- theory

def test_zeta_matches_known_values():
    assert scaling.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-12)
    assert scaling.zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-12)


def test_theory_exponent_alpha_2_within_005():
    rows = scaling.theory_results((1.5, 2.0, 3.0))
    row = next(r for r in rows if r["alpha"] == 2.0)
    assert row["predicted_exponent"] == pytest.approx(-0.5)
    assert abs(row["fitted_exponent"] - row["predicted_exponent"]) < 0.05


def test_theory_exponents_track_one_over_alpha_minus_one():
    for row in scaling.theory_results(THEORY_ALPHAS, horizon=1):
        # horizon 1: EntCE = gap·q, so the fitted exponent is the derailing exponent.
        assert abs(row["fitted_exponent"] - (1 / row["alpha"] - 1)) < 0.02, row
    # A longer horizon saturates EntCE at the gap (q·T ≳ 1) and flattens the exponent toward 0.
    short = scaling.theory_results((1.2,), horizon=1)[0]["fitted_exponent"]
    long = scaling.theory_results((1.2,), horizon=1000)[0]["fitted_exponent"]
    assert short < long < 0


def test_unbounded_vocab_agrees_with_large_finite_vocab():
    ms = np.array([1.0, 30.0, 1e3, 1e4])
    unbounded = scaling.expected_derail_probability(3.0, ms)
    finite = scaling.expected_derail_probability(3.0, ms, vocab=200_000)
    np.testing.assert_allclose(unbounded, finite, rtol=1e-6)
    assert unbounded[0] == pytest.approx(1.0)  # one token seen: it is a singleton


def test_unbounded_tail_is_independent_of_the_exact_head(monkeypatch):
    # The analytic tail replaces types beyond the exact head; moving the head must not move q.
    ms = np.array([2.0, 1e3, 1e5, 1e7])
    small_head = scaling.expected_derail_probability(1.2, ms)
    monkeypatch.setattr(scaling, "_MIN_HEAD", 1 << 21)
    big_head = scaling.expected_derail_probability(1.2, ms)
    np.testing.assert_allclose(small_head, big_head, rtol=1e-7)


def test_finite_vocab_cutoff_steepens_the_curve():
    ms = np.logspace(3, 6, 7)
    unbounded = scaling.fit_exponent(ms, scaling.expected_derail_probability(1.2, ms))
    finite = scaling.fit_exponent(ms, scaling.expected_derail_probability(1.2, ms, vocab=100_000))
    assert finite < unbounded - 0.02


@pytest.mark.parametrize("alpha,m", [(1.5, 5_000), (2.0, 20_000)])
def test_sampled_derail_probability_matches_expectation(alpha, m):
    vocab = 50_000
    expected = float(scaling.expected_derail_probability(alpha, m, vocab=vocab))
    sampled = np.mean([scaling.derail_probability(alpha, m, vocab=vocab, seed=s) for s in range(8)])
    assert sampled == pytest.approx(expected, rel=0.05)


def test_expected_entce_matches_monte_carlo_derailing():
    rng = np.random.default_rng(0)
    q, horizon, gap = 0.03, 50, 1.7
    first = rng.geometric(q, size=400_000)  # step of the first derailment, 1-based
    extra = gap * np.clip(horizon - first + 1, 0, None) / horizon
    closed = float(scaling.expected_entce(q, horizon=horizon, derail_entropy_gap_nats=gap))
    assert closed == pytest.approx(extra.mean(), rel=0.01)
    tiny = float(scaling.expected_entce(1e-9, horizon=horizon))
    assert tiny == pytest.approx(1e-9 * (horizon + 1) / 2, rel=1e-4)


def test_simulate_theory_sampled_method_tracks_exact():
    ms = [2_000, 8_000, 32_000]
    exact = scaling.simulate_theory(2.0, ms, vocab=50_000, horizon=1)
    sampled = scaling.simulate_theory(2.0, ms, vocab=50_000, horizon=1, method="sampled", seed=0)
    assert abs(sampled.fitted_exponent - exact.fitted_exponent) < 0.1


def test_fit_exponent_rejects_non_positive():
    assert scaling.fit_exponent([1, 10, 100], [1, 0.1, 0.01]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        scaling.fit_exponent([1, 10], [1.0, 0.0])


# --------------------------------------------------------------------------- corpus α

def _zipf_counts(alpha: float, vocab: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount(rng.choice(vocab, size=n, p=scaling.zipf_probs(alpha, vocab)), minlength=vocab)


def test_corpus_alpha_recovers_zipf_one_from_words():
    rng = np.random.default_rng(0)
    ids = rng.choice(20_000, size=300_000, p=scaling.zipf_probs(1.0, 20_000))
    words = [f"w{i}" for i in ids]
    assert scaling.corpus_alpha(words, top=1000) == pytest.approx(1.0, abs=0.1)
    assert scaling.corpus_alpha(" ".join(words[:50_000]), top=200) == pytest.approx(1.0, abs=0.1)


def test_corpus_alpha_from_counts_and_mapping():
    counts = _zipf_counts(1.5, 20_000, 500_000, seed=1)
    assert scaling.corpus_alpha(counts.tolist(), top=300) == pytest.approx(1.5, abs=0.1)
    as_map = {f"u{i}": int(c) for i, c in enumerate(counts)}
    assert scaling.corpus_alpha(as_map, top=300) == scaling.corpus_alpha(counts.tolist(), top=300)
    with pytest.raises(ValueError):
        scaling.corpus_alpha(["only", "only"])


# --------------------------------------------------------------------------- plots

def test_plots_write_png(tmp_path):
    params, entce = _planted()
    fit = scaling.fit_scaling(params, entce, n_boot=200)
    out = tmp_path / "scaling.png"
    scaling.plot_scaling(params, entce, fit, str(out))
    curves = scaling.theory_curves((1.2, 2.0))
    out2 = tmp_path / "theory.png"
    scaling.plot_theory(curves, str(out2))
    for path in (out, out2):
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
