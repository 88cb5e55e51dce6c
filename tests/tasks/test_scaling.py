"""tasks/scaling.py: scaling fit, theory simulation, corpus α; their plots (tasks/figures.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from entcal.tasks import figures, scaling, theory

PLANTED_SLOPE = -0.2
THEORY_ALPHAS = (1.2, 1.5, 2.0, 3.0)


# --------------------------------------------------------------------------- fit_scaling

def _planted(n_models: int = 8, noise: float = 0.02, seed: int = 1):
    rng = np.random.default_rng(seed)
    params = np.geomspace(1e8, 7e10, n_models)
    entce = 3.0 * params ** PLANTED_SLOPE * np.exp(noise * rng.standard_normal(n_models))
    return params.tolist(), entce.tolist()


def _examples(entce: float, *, n: int = 200, noise: float = 0.3, seed: int = 0) -> dict:
    """Per-example sums (metrics.example_sums layout) of a model whose pooled EntCE is ``entce``
    exactly: 20 tokens per example, per-token entropy and log loss spread by ``noise`` nats."""
    rng = np.random.default_rng(seed)
    dh, dl = rng.standard_normal(n), rng.standard_normal(n)
    h = 2.0 + entce + noise * (dh - dh.mean())
    l = 2.0 + noise * (dl - dl.mean())
    return {"entropy_sum": 20 * h, "entropy_n": np.full(n, 20.0), "logloss_sum": 20 * l,
            "logloss_n": np.full(n, 20.0)}


def _pooled(ex: dict) -> float:
    return ex["entropy_sum"].sum() / ex["entropy_n"].sum() - ex["logloss_sum"].sum() / ex["logloss_n"].sum()


def test_fit_scaling_recovers_planted_slope():
    params, entce = _planted()
    examples = [_examples(e, noise=0.05, seed=i) for i, e in enumerate(entce)]
    fit = scaling.fit_scaling(params, entce, examples=examples, n_boot=1000, seed=0)
    assert abs(fit.slope - PLANTED_SLOPE) < 0.02
    assert fit.slope_ci_low <= PLANTED_SLOPE <= fit.slope_ci_high
    assert fit.slope_ci_low < fit.slope < fit.slope_ci_high
    assert abs(fit.intercept - math.log(3.0)) < 0.5
    assert fit.n_models == 8
    assert 0.9 < fit.r2 <= 1.0


def test_fit_scaling_exact_power_law_and_is_deterministic():
    params = [5e8, 1e9, 7e9, 7e10]
    entce = [0.5 * n ** -0.1 for n in params]
    examples = [_examples(e, noise=0.0) for e in entce]
    a = scaling.fit_scaling(params, entce, examples=examples, seed=3)
    b = scaling.fit_scaling(params, entce, examples=examples, seed=3)
    assert a.slope == b.slope and a.slope_ci_low == b.slope_ci_low and a.slope_ci_high == b.slope_ci_high
    assert a.slope == pytest.approx(-0.1, abs=1e-12)
    assert a.intercept == pytest.approx(math.log(0.5), abs=1e-9)
    assert a.slope_ci_low == pytest.approx(-0.1, abs=1e-9)  # no example noise: every resample on the line


def test_two_models_give_a_slope_and_say_why_there_is_no_ci():
    # Before: resampling 2 models gave a zero-width "CI [−0.149, −0.149]".
    params, entce = [1.35e8, 3.6e8], [0.30, 0.26]
    fit = scaling.fit_scaling(params, entce, examples=[_examples(e) for e in entce], n_boot=200)
    assert fit.slope == pytest.approx(math.log(0.26 / 0.30) / math.log(3.6e8 / 1.35e8))
    assert fit.slope_ci_low is None and fit.slope_ci_high is None
    text = fit.describe()
    assert f"slope {fit.slope:.3f}" in text and "no CI: 2 models" in text and "add a third model" in text


def test_nested_bootstrap_ci_comes_from_example_noise():
    # EntCE lies exactly on a power law across models: resampling models alone gives a zero-width CI;
    # resampling examples within each model gives a width that grows with the per-example spread.
    params = [1e8, 4e8, 1.6e9, 6.4e9]
    entce = [0.4 * (n / 1e8) ** -0.2 for n in params]
    widths = []
    for noise in (0.1, 0.4):
        ex = [_examples(e, noise=noise, seed=i) for i, e in enumerate(entce)]
        assert [_pooled(x) for x in ex] == pytest.approx(entce)
        fit = scaling.fit_scaling(params, entce, examples=ex, n_boot=600, ci_level=0.95, seed=0)
        assert fit.slope == pytest.approx(-0.2)
        assert fit.slope_ci_low < -0.2 < fit.slope_ci_high
        assert fit.n_used + fit.dropped_nonpositive + fit.dropped_degenerate == fit.n_boot == 600
        widths.append(fit.slope_ci_high - fit.slope_ci_low)
    assert 1e-3 < widths[0] < widths[1]
    narrow = scaling.fit_scaling(params, entce, examples=ex, n_boot=600, ci_level=0.5, seed=0)
    assert narrow.slope_ci_high - narrow.slope_ci_low < widths[1]
    assert "50% CI" in narrow.describe() and "nested bootstrap" in narrow.describe()


def test_resamples_with_non_positive_entce_are_dropped_and_counted():
    params = [1e8, 1e9, 1e10]
    entce = [0.5, 0.2, 0.01]  # the largest model is nearly calibrated: some resamples give EntCE ≤ 0
    ex = [_examples(e, noise=0.3, seed=i) for i, e in enumerate(entce)]
    fit = scaling.fit_scaling(params, entce, examples=ex, n_boot=400, seed=1)
    assert 0 < fit.dropped_nonpositive < fit.n_boot / 2
    assert fit.slope_ci_low is not None
    share = fit.dropped_nonpositive / fit.n_boot
    assert f"{share:.1%} dropped because a model's resampled EntCE was ≤ 0" in fit.describe()
    ex[2] = _examples(0.001, noise=1.0, seed=9)   # EntCE ≤ 0 in about half the resamples and more
    worse = scaling.fit_scaling(params, [0.5, 0.2, _pooled(ex[2])], examples=ex, n_boot=400, seed=1)
    assert worse.slope_ci_low is None and "resamples usable" in worse.no_ci


def test_fit_scaling_without_examples_has_no_ci():
    params, entce = _planted(4)
    fit = scaling.fit_scaling(params, entce)
    assert fit.slope_ci_low is None and "per-example" in fit.no_ci
    with pytest.raises(ValueError, match="each of the 4 models"):
        scaling.fit_scaling(params, entce, examples=[_examples(0.1)])


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


def test_family_fits_and_their_report_sections_use_per_example_sums(tmp_path):
    """scaling.family_fits (the study's scaling stage) fits each family of >= 2 models per dataset at τ = 1,
    untruncated, its CI resampling the per-example sums; sections.scaling_section writes the fit and its figure."""
    from entcal.tasks.sections import scaling_section

    sizes = {"m1": 1e8, "m2": 4e8, "m3": 1.6e9, "solo": 1e9}
    entce = {m: 0.4 * (n / 1e8) ** -0.2 for m, n in sizes.items()}
    rows = [{"model": m, "dataset": "python-docs", "temperature": t, "truncated": tr, "entce": e * t + tr}
            for m, e in entce.items() for t, tr in ((1.0, False), (1.5, False), (1.0, True))]
    sums = {(m, "python-docs"): _examples(e, noise=0.3, seed=k) for k, (m, e) in enumerate(entce.items())}
    families = {"fam": ["m1", "m2", "m3"], "alone": ["solo"]}  # a family of one model has no slope: no fit
    (three,) = scaling.family_fits(families, ["python-docs"], rows, sizes, sums, n_boot=300, ci_level=0.9, seed=0)
    assert (three.family, three.dataset, three.error) == ("fam", "python-docs", None)
    assert three.points == [(sizes[m], entce[m], m) for m in ("m1", "m2", "m3")]  # τ = 1, untruncated rows only
    assert three.figure == "scaling__fam__python-docs.png"
    png = figures.plot_scaling([x for x, _, _ in three.points], [e for _, e, _ in three.points], three.fit,
                               str(tmp_path / three.figure))
    text = scaling_section(three)
    assert text.startswith("## Scaling: fam on python-docs\n")
    assert "slope -0.200 over 3 models, 90% CI [" in text and "300 resamples" in text
    assert "![scaling](scaling__fam__python-docs.png)" in text and Path(png).stat().st_size > 1000
    (two,) = scaling.family_fits({"fam": ["m1", "m2"]}, ["python-docs"], rows, sizes, sums, n_boot=300,
                                 ci_level=0.9, seed=0)
    assert "no CI: 2 models; a slope through 2 points has no residual to resample" in scaling_section(two)
    # a model's sums missing: a fit without a CI; a dataset without rows: no fit, and the section says why
    no_sums = {k: v for k, v in sums.items() if k[0] != "m2"}
    fits = scaling.family_fits({"fam": ["m1", "m2", "m3"]}, ["python-docs", "other"], rows, sizes, no_sums,
                               n_boot=300, ci_level=0.9, seed=0)
    assert [(f.dataset, f.fit is None) for f in fits] == [("python-docs", False), ("other", True)]
    assert fits[0].fit.slope_ci_low is None and fits[0].fit.slope == pytest.approx(three.fit.slope)
    assert fits[1].figure is None and scaling_section(fits[1]) == f"## Scaling: fam on other\n\nNo fit: {fits[1].error}\n"


# --------------------------------------------------------------------------- theory

def test_zeta_matches_known_values():
    assert theory.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-12)
    assert theory.zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-12)


def test_theory_exponent_alpha_2_within_005():
    rows = theory.theory_results((1.5, 2.0, 3.0))
    row = next(r for r in rows if r["alpha"] == 2.0)
    assert row["predicted_exponent"] == pytest.approx(-0.5)
    assert abs(row["fitted_exponent"] - row["predicted_exponent"]) < 0.05


def test_theory_exponents_track_one_over_alpha_minus_one():
    for row in theory.theory_results(THEORY_ALPHAS, horizon=1):
        # horizon 1: EntCE = gap·q, so the fitted exponent is the derailing exponent.
        assert abs(row["fitted_exponent"] - (1 / row["alpha"] - 1)) < 0.02, row
    # A longer horizon saturates EntCE at the gap (q·T ≳ 1) and flattens the exponent toward 0.
    short = theory.theory_results((1.2,), horizon=1)[0]["fitted_exponent"]
    long = theory.theory_results((1.2,), horizon=1000)[0]["fitted_exponent"]
    assert short < long < 0


def test_unbounded_vocab_agrees_with_large_finite_vocab():
    ms = np.array([1.0, 30.0, 1e3, 1e4])
    unbounded = theory.expected_derail_probability(3.0, ms)
    finite = theory.expected_derail_probability(3.0, ms, vocab=200_000)
    np.testing.assert_allclose(unbounded, finite, rtol=1e-6)
    assert unbounded[0] == pytest.approx(1.0)  # one token seen: it is a singleton


def test_unbounded_tail_is_independent_of_the_exact_head(monkeypatch):
    # The analytic tail replaces types beyond the exact head; moving the head must not move q.
    ms = np.array([2.0, 1e3, 1e5, 1e7])
    small_head = theory.expected_derail_probability(1.2, ms)
    monkeypatch.setattr(theory, "_MIN_HEAD", 1 << 21)
    big_head = theory.expected_derail_probability(1.2, ms)
    np.testing.assert_allclose(small_head, big_head, rtol=1e-7)


def test_finite_vocab_cutoff_steepens_the_curve():
    ms = np.logspace(3, 6, 7)
    unbounded = scaling.fit_exponent(ms, theory.expected_derail_probability(1.2, ms))
    finite = scaling.fit_exponent(ms, theory.expected_derail_probability(1.2, ms, vocab=100_000))
    assert finite < unbounded - 0.02


@pytest.mark.parametrize("alpha,m", [(1.5, 5_000), (2.0, 20_000)])
def test_sampled_derail_probability_matches_expectation(alpha, m):
    vocab = 50_000
    expected = float(theory.expected_derail_probability(alpha, m, vocab=vocab))
    sampled = np.mean([theory.derail_probability(alpha, m, vocab=vocab, seed=s) for s in range(8)])
    assert sampled == pytest.approx(expected, rel=0.05)


def test_expected_entce_matches_monte_carlo_derailing():
    rng = np.random.default_rng(0)
    q, horizon, gap = 0.03, 50, 1.7
    first = rng.geometric(q, size=400_000)  # step of the first derailment, 1-based
    extra = gap * np.clip(horizon - first + 1, 0, None) / horizon
    closed = float(theory.expected_entce(q, horizon=horizon, derail_entropy_gap_nats=gap))
    assert closed == pytest.approx(extra.mean(), rel=0.01)
    tiny = float(theory.expected_entce(1e-9, horizon=horizon))
    assert tiny == pytest.approx(1e-9 * (horizon + 1) / 2, rel=1e-4)


def test_simulate_theory_sampled_method_tracks_exact():
    ms = [2_000, 8_000, 32_000]
    exact = theory.simulate_theory(2.0, ms, vocab=50_000, horizon=1)
    sampled = theory.simulate_theory(2.0, ms, vocab=50_000, horizon=1, method="sampled", seed=0)
    assert abs(sampled.fitted_exponent - exact.fitted_exponent) < 0.1


def test_fit_exponent_rejects_non_positive():
    assert scaling.fit_exponent([1, 10, 100], [1, 0.1, 0.01]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        scaling.fit_exponent([1, 10], [1.0, 0.0])


# --------------------------------------------------------------------------- corpus α

def _zipf_counts(alpha: float, vocab: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount(rng.choice(vocab, size=n, p=theory.zipf_probs(alpha, vocab)), minlength=vocab)


def test_corpus_alpha_recovers_zipf_one_from_words():
    rng = np.random.default_rng(0)
    ids = rng.choice(20_000, size=300_000, p=theory.zipf_probs(1.0, 20_000))
    words = [f"w{i}" for i in ids]
    assert theory.corpus_alpha(words, top=1000) == pytest.approx(1.0, abs=0.1)
    assert theory.corpus_alpha(" ".join(words[:50_000]), top=200) == pytest.approx(1.0, abs=0.1)


def test_corpus_alpha_from_counts_and_mapping():
    counts = _zipf_counts(1.5, 20_000, 500_000, seed=1)
    assert theory.corpus_alpha(counts.tolist(), top=300) == pytest.approx(1.5, abs=0.1)
    as_map = {f"u{i}": int(c) for i, c in enumerate(counts)}
    assert theory.corpus_alpha(as_map, top=300) == theory.corpus_alpha(counts.tolist(), top=300)
    with pytest.raises(ValueError):
        theory.corpus_alpha(["only", "only"])


def test_words_lower_case_and_strip_punctuation():
    assert theory.words("The cat's hat, the CAT; don't_stop (x2).") == [
        "the", "cat's", "hat", "the", "cat", "don't", "stop", "x2"]
    assert "regex " + theory.WORD_PATTERN in theory.WORD_UNIT


def test_corpus_alpha_stats_cap_and_warnings():
    rng = np.random.default_rng(3)
    ids = rng.choice(20_000, size=600_000, p=theory.zipf_probs(1.0, 20_000))
    docs = [" ".join(f"W{i}." for i in ids[k : k + 1000]) for k in range(0, ids.size, 1000)]
    out = theory.corpus_alpha_stats(docs, max_words=500_500)
    assert out["words"] == 500_500 and out["documents"] == 501 and out["top"] == 5000
    assert out["alpha"] == pytest.approx(1.0, abs=0.1)
    assert out["count_at_top"] >= 5 and out["warning"] is None
    small = theory.corpus_alpha_stats(["a a a b b c", "a b d"])
    assert small["top"] == small["distinct"] == 4 and small["count_at_top"] == 1
    assert "only 4 distinct words (< 5000)" in small["warning"] and "occurs only 1 times" in small["warning"]


def test_corpus_alpha_stage_uses_top_5000_lowercased_words_of_the_whole_corpus():
    # Before: the first 200 documents, whitespace units, top 1000, a bare float.
    from entcal.flows.stages import corpus_alpha_task
    from entcal.tasks import datasets
    from entcal.tasks.config import DatasetSpec

    spec = DatasetSpec(name="python-stdlib")
    out = corpus_alpha_task.fn(spec, spec.label)
    assert out["top"] == 5000 and out["unit"] == theory.WORD_UNIT
    assert out["words"] > 500_000 and out["documents"] > 200 and out["count_at_top"] >= 5
    first = [d.text for _, d in zip(range(out["documents"]), datasets.documents(spec))]
    assert out["alpha"] == pytest.approx(theory.corpus_alpha_stats(first, max_words=out["words"])["alpha"])


def test_corpus_alpha_section_states_unit_counts_and_warning():
    from entcal.tasks.sections import corpus_alpha_section

    stats = theory.corpus_alpha_stats(["a a a b b c", "a b d"])
    text = corpus_alpha_section({"tiny": stats, "empty": None})
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    assert f"| {stats['alpha']:.3f} | {1 / stats['alpha'] - 1:+.3f} | 4 | 9 | 2 | 1 |" in row
    assert "only 4 distinct words" in row
    assert f"Unit: {theory.WORD_UNIT}." in text and "| empty | —" in text


# --------------------------------------------------------------------------- plots

def test_plots_write_png(tmp_path):
    params, entce = _planted()
    fit = scaling.fit_scaling(params, entce, examples=[_examples(e, seed=i) for i, e in enumerate(entce)], n_boot=200)
    out = tmp_path / "scaling.png"
    figures.plot_scaling(params, entce, fit, str(out))
    no_ci = scaling.fit_scaling(params[:2], entce[:2])
    figures.plot_scaling(params[:2], entce[:2], no_ci, str(tmp_path / "two.png"))
    data = (tmp_path / "two.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    curves = theory.theory_curves((1.2, 2.0))
    out2 = tmp_path / "theory.png"
    figures.plot_theory(curves, str(out2))
    for path in (out, out2):
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_with_three_models_the_report_says_the_ci_is_conservative():
    """Drawing 3 models with replacement holds 3 distinct ones 2/9 of the time: most resamples refit fewer."""
    rng = np.random.default_rng(0)
    examples = [{"entropy_sum": rng.uniform(2.5, 3.5, 20) * 10, "entropy_n": np.full(20, 10.0),
                 "logloss_sum": np.full(20, 20.0), "logloss_n": np.full(20, 10.0)} for _ in range(3)]
    entce = [e["entropy_sum"].sum() / 200 - 2.0 for e in examples]
    fit = scaling.fit_scaling([1e8, 1e9, 1e10], entce, examples=examples, n_boot=2000, seed=0)
    assert fit.few_models_share == pytest.approx(1 - (2 / 9) / (1 - 1 / 9), abs=0.03)  # of the usable ones
    assert "Conservative: 75% of the used resamples held fewer than 3 distinct models" in fit.describe()
