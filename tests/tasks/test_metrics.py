import numpy as np
import polars as pl
import pytest

from entcal.tasks.contracts import SummaryKnobs
from entcal.tasks.metrics import entce_summary, smooth, step_curves


def _knobs(horizon, bootstrap, ci_level=0.95, seed=0):
    return SummaryKnobs(horizon=horizon, bootstrap=bootstrap, ci_level=ci_level, seed=seed)


def _tables(h_rows, l_rows):
    n = len(h_rows)
    gens = pl.DataFrame({"example_id": [f"e{i}" for i in range(n)], "sample": [0] * n, "decoding": ["t1"] * n,
                         "token_ids": [[1] * len(h) for h in h_rows], "step_entropy": h_rows,
                         "step_logprob": [[-x for x in h] for h in h_rows], "finish_reason": ["length"] * n})
    ref = pl.DataFrame({"example_id": [f"e{i}" for i in range(n)], "decoding": ["t1"] * n, "step_logloss": l_rows,
                        "step_logloss_untruncated": l_rows, "step_entropy": l_rows,
                        "step_truncated": [[False] * len(l) for l in l_rows]})
    return gens, ref


def test_entce_sign_and_pooling():
    # generations carry 3 nats, human text costs 2: too much entropy -> EntCE > 0
    gens, ref = _tables([[3.0] * 10, [3.0] * 4], [[2.0] * 10, [2.0] * 10])
    s = entce_summary(gens, ref, _knobs(8, 200))
    assert s.entce == pytest.approx(1.0) and s.entce_ci_low <= 1.0 <= s.entce_ci_high
    assert s.generated_tokens == 8 + 4 and s.reference_tokens == 16
    assert s.as_dict()["entce"] == s.entce and s.as_dict()["n_examples"] == 2
    gens, ref = _tables([[1.0] * 10] * 3, [[2.5] * 10] * 3)
    assert entce_summary(gens, ref, _knobs(10, 50)).entce == pytest.approx(-1.5)


def test_pooled_over_tokens_not_examples():
    gens, ref = _tables([[1.0] * 9, [4.0] * 1], [[0.0] * 5, [0.0] * 5])
    assert entce_summary(gens, ref, _knobs(100, 20)).entropy == pytest.approx((9 + 4) / 10)


def test_ci_widens_with_spread():
    tight = entce_summary(*_tables([[2.0] * 5] * 20, [[1.0] * 5] * 20), _knobs(5, 300))
    wide = entce_summary(*_tables([[0.5 + 0.2 * i] * 5 for i in range(20)], [[1.0] * 5] * 20), _knobs(5, 300))
    assert tight.entce_ci_high - tight.entce_ci_low < 1e-9 < wide.entce_ci_high - wide.entce_ci_low


def test_curves_average_examples_reaching_each_step():
    gens, ref = _tables([[1.0, 2.0, 3.0], [3.0]], [[5.0, 5.0], [7.0, 7.0]])
    c = step_curves(gens, ref, horizon=4)
    assert c["entropy_mean"].to_list()[:3] == [2.0, 2.0, 3.0] and c["entropy_n"].to_list()[:3] == [2, 1, 1]
    assert c["logloss_mean"].to_list()[:2] == [6.0, 6.0] and c["logloss_mean"][3] is None


def test_smooth():
    assert smooth([1.0, 3.0, float("nan"), 3.0], 0.5) == [1.0, 2.0, 2.0, 2.5]


def test_example_sums_are_what_the_ci_resamples():
    from entcal.tasks.metrics import example_sums

    gens, ref = _tables([[3.0] * 10, [1.0] * 4], [[2.0] * 10, [0.5] * 3])
    sums = example_sums(gens, ref, horizon=8)
    assert sums["entropy_sum"].tolist() == [24.0, 4.0] and sums["entropy_n"].tolist() == [8.0, 4.0]
    assert sums["logloss_sum"].tolist() == [16.0, 1.5] and sums["logloss_n"].tolist() == [8.0, 3.0]
    s = entce_summary(gens, ref, _knobs(8, 20))
    assert s.entce == pytest.approx(28 / 12 - 17.5 / 11)


def _random_prompts(lm, n=4, p=9, r=14):
    from tests.conftest import random_prompts

    return random_prompts(lm, n, p, r, seed=3)


def test_logloss_at_epsilon_equals_a_direct_rescore(tiny_lm):
    from entcal.tasks.metrics import logloss_at_epsilon
    from entcal.tasks.config import DecodingSpec
    from tests.tasks.helpers import scored

    prompts = _random_prompts(tiny_lm)
    decs = [DecodingSpec(top_k=5), DecodingSpec(top_p=0.8), DecodingSpec(min_p=0.1, temperature=0.7), DecodingSpec()]
    horizon, eps = 12, 1e-4
    ref = scored(tiny_lm, prompts, decs, max_tokens=horizon, epsilon=eps, batch_size=4)
    assert ref["step_truncated"].explode().mean() > 0.2  # the test needs truncated tokens
    for new_eps in (1e-3, 1e-5, 0.3):
        direct = scored(tiny_lm, prompts, decs, max_tokens=horizon, epsilon=new_eps, batch_size=4)
        for dec in decs:
            r, d = (t.filter(pl.col("decoding") == dec.key) for t in (ref, direct))
            want = d["step_logloss"].explode().cast(pl.Float64).mean()
            got = logloss_at_epsilon(r, horizon=horizon, epsilon=eps, new_epsilon=new_eps)
            assert got == pytest.approx(want, abs=2e-4), (dec.key, new_eps)
            if dec.truncated:  # a truncated token costs −log ε': the number moves with ε
                assert abs(got - r["step_logloss"].explode().mean()) > 0.1
    with pytest.raises(ValueError, match="new_epsilon must be in"):
        logloss_at_epsilon(ref, horizon=horizon, epsilon=eps, new_epsilon=1.0)


def test_example_table_and_pair_result_are_the_summary_per_example():
    from entcal.tasks.config import DecodingSpec
    from entcal.tasks.metrics import TEXT_CHARS, example_sums, example_table, pair_result

    gens, ref = _tables([[3.0] * 10, [1.0] * 4], [[2.0] * 10, [0.5] * 3])
    gens = gens.with_columns(text=pl.Series(["x" * (TEXT_CHARS + 20), "short"]),
                             finish_reason=pl.Series(["length", "eos"]))
    table = example_table(gens, ref, horizon=8)
    assert table.columns == ["example_id", "entropy_mean", "logloss_mean", "entce", "generated_tokens",
                             "reference_tokens", "finish_reason", "text"]
    assert table["entropy_mean"].to_list() == [3.0, 1.0] and table["logloss_mean"].to_list() == [2.0, 0.5]
    assert table["entce"].to_list() == [1.0, 0.5] and table["generated_tokens"].to_list() == [8, 4]
    assert table["reference_tokens"].to_list() == [8, 3] and table["finish_reason"].to_list() == ["length", "eos"]
    assert table["text"].to_list() == ["x" * TEXT_CHARS, "short"]
    knobs = _knobs(8, 20)
    prompts = pl.DataFrame({"example_id": ["e0", "e1"]})
    pair = pair_result("m", "d", DecodingSpec(temperature=0.9), prompts, gens, ref, knobs)
    assert pair.summary == entce_summary(gens, ref, knobs) and pair.examples.equals(table)
    assert pair.curves.equals(step_curves(gens, ref, horizon=8, smoothing=knobs.smoothing))
    for n in ("entropy", "logloss"):  # the curves the plots draw: smoothed at the study's smoothing
        assert pair.curves[f"{n}_smooth"].to_list() == smooth(pair.curves[f"{n}_mean"].to_list(), knobs.smoothing)
    assert {k: v.tolist() for k, v in pair.sums.items()} == {k: v.tolist() for k, v in example_sums(gens, ref, horizon=8).items()}
    assert pair.tables["generations"] is gens and pair.tables["prompts"] is prompts and pair.agreement is None
    row = pair.row()
    assert (row["model"], row["dataset"], row["decoding"], row["temperature"], row["truncated"]) == ("m", "d", "t0.9", 0.9, False)
    assert row["entce"] == pair.summary.entce == pytest.approx(28 / 12 - 17.5 / 11)


# ---------------------------------------------------------------- the shape of miscalibration
def test_a_pooled_entce_of_zero_can_hide_a_per_step_error_and_a_slope():
    """Too cold early, too hot late: EntCE pools to 0, the per-step error and the slope do not."""
    from entcal.tasks.metrics import shape_stats

    T = 40
    h = [[1.0 + 2.0 * t / (T - 1) for t in range(T)]] * 6  # 1 -> 3 nats
    l = [[2.0] * T] * 6
    gens, ref = _tables(h, l)
    knobs = SummaryKnobs(horizon=T, bootstrap=100, ci_level=0.95, seed=0, smoothing=1.0)  # 1.0: no smoothing
    s = entce_summary(gens, ref, knobs)
    assert s.entce == pytest.approx(0.0, abs=1e-12)
    assert s.calib_error_per_step == pytest.approx(sum(abs(1 + 2 * t / (T - 1) - 2) for t in range(T)) / T)
    assert s.entce_slope == pytest.approx(100 * 2.0 / (T - 1))  # nats per 100 steps
    calibrated = shape_stats(*_tables(l, l), knobs)
    assert calibrated["calib_error_per_step"] == 0.0 and calibrated["entce_slope"] == pytest.approx(0.0)


def test_shape_is_smoothed_as_the_plots_are_and_has_a_ci():
    import random

    from entcal.tasks.metrics import shape_stats

    rnd = random.Random(0)
    h = [[2.0 + rnd.gauss(0, 0.5) for _ in range(30)] for _ in range(12)]
    l = [[2.0] * 30 for _ in range(12)]
    gens, ref = _tables(h, l)
    knobs = SummaryKnobs(horizon=30, bootstrap=300, ci_level=0.9, seed=1, smoothing=0.2)
    got = shape_stats(gens, ref, knobs)
    curves = step_curves(gens, ref, horizon=30)
    hs, ls = smooth(curves["entropy_mean"].to_list(), 0.2), smooth(curves["logloss_mean"].to_list(), 0.2)
    assert got["calib_error_per_step"] == pytest.approx(sum(abs(a - b) for a, b in zip(hs, ls)) / 30)
    lo, hi = got["calib_error_per_step_ci"]
    assert lo < got["calib_error_per_step"] < hi
    lo, hi = got["entce_slope_ci"]
    assert lo < got["entce_slope"] < hi


def test_a_calibrated_models_per_step_error_ci_holds_its_estimate():
    """h_t = l_t + noise: the per-step error is small, its resamples larger (noise adds to every |gap|), so a
    plain percentile interval lies above the estimate; the centred one holds it."""
    import random

    from entcal.tasks.metrics import centred_ci, shape_stats

    rnd = random.Random(0)
    h = [[2.0 + rnd.gauss(0, 1.0) for _ in range(60)] for _ in range(20)]
    gens, ref = _tables(h, [[2.0] * 60 for _ in range(20)])
    knobs = SummaryKnobs(horizon=60, bootstrap=400, ci_level=0.95, seed=0, smoothing=1.0)
    got = shape_stats(gens, ref, knobs)
    lo, hi = got["calib_error_per_step_ci"]
    assert lo <= got["calib_error_per_step"] <= hi
    # the plain percentile interval of the same resamples would not hold it: the test can tell the two apart
    from entcal.tasks.metrics import _shape, step_sums

    ids = sorted(set(gens["example_id"].to_list()))
    sh, nh = step_sums(gens, "step_entropy", 60, ids)
    sl, nl = step_sums(ref, "step_logloss", 60, ids)
    idx = np.random.default_rng(0).integers(0, 20, size=(400, 20))
    b_error, _ = _shape(sh, nh, sl, nl, idx, 1.0)
    assert np.quantile(b_error, 0.025) > got["calib_error_per_step"]
    # an unbiased statistic (z0 = 0) keeps the plain percentile interval
    sym = np.linspace(-1, 1, 2001)
    assert centred_ci(sym, 0.0, 0.9) == pytest.approx(tuple(np.quantile(sym, [0.05, 0.95])), abs=1e-9)
    assert centred_ci(sym + 1.0, 0.0, 0.9) == pytest.approx(tuple(np.quantile(sym, [0.05, 0.95])), abs=1e-9)


def test_paired_delta_cancels_what_both_sides_share():
    """Two decodings of the same prompts whose examples differ a lot from each other but little between the
    sides: the paired CI of the difference is far narrower than the two unpaired CIs, and a change inside
    it is "no detectable effect"."""
    import random

    from entcal.tasks.metrics import paired_delta

    rnd = random.Random(3)
    base = [rnd.uniform(1.0, 4.0) for _ in range(30)]  # examples differ by up to 3 nats
    before = _tables([[b] * 10 for b in base], [[2.0] * 10] * 30)
    shifted = _tables([[b + 0.05 + rnd.gauss(0, 0.01)] * 10 for b in base], [[2.0] * 10] * 30)
    same = _tables([[b + rnd.gauss(0, 0.01)] * 10 for b in base], [[2.0] * 10] * 30)
    knobs = SummaryKnobs(horizon=10, bootstrap=500, ci_level=0.95, seed=0)
    d = paired_delta(before, shifted, knobs)
    assert d["delta_entce"] == pytest.approx(0.05, abs=0.01) and d["examples"] == 30
    lo, hi = d["delta_entce_ci"]
    assert 0 < lo < 0.05 < hi and hi - lo < 0.02 and d["detectable"]
    unpaired = entce_summary(*before, knobs)
    assert unpaired.entce_ci_high - unpaired.entce_ci_low > 10 * (hi - lo)
    assert d["delta_logloss"] == 0.0 and d["delta_logloss_ci"] == [0.0, 0.0]
    assert not paired_delta(before, same, knobs)["detectable"]  # no detectable effect
