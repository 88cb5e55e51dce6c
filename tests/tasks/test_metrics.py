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
    assert pair.curves.equals(step_curves(gens, ref, horizon=8))
    assert {k: v.tolist() for k, v in pair.sums.items()} == {k: v.tolist() for k, v in example_sums(gens, ref, horizon=8).items()}
    assert pair.tables["generations"] is gens and pair.tables["prompts"] is prompts and pair.agreement is None
    row = pair.row()
    assert (row["model"], row["dataset"], row["decoding"], row["temperature"], row["truncated"]) == ("m", "d", "t0.9", 0.9, False)
    assert row["entce"] == pair.summary.entce == pytest.approx(28 / 12 - 17.5 / 11)
