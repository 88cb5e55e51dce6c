import polars as pl
import pytest

from tasks.calibrate import entce_summary, smooth, step_curves


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
    s = entce_summary(gens, ref, horizon=8, bootstrap=200)
    assert s["entce"] == pytest.approx(1.0) and s["entce_ci_low"] <= 1.0 <= s["entce_ci_high"]
    assert s["generated_tokens"] == 8 + 4 and s["reference_tokens"] == 16
    gens, ref = _tables([[1.0] * 10] * 3, [[2.5] * 10] * 3)
    assert entce_summary(gens, ref, horizon=10, bootstrap=50)["entce"] == pytest.approx(-1.5)


def test_pooled_over_tokens_not_examples():
    gens, ref = _tables([[1.0] * 9, [4.0] * 1], [[0.0] * 5, [0.0] * 5])
    assert entce_summary(gens, ref, horizon=100, bootstrap=20)["entropy"] == pytest.approx((9 + 4) / 10)


def test_ci_widens_with_spread():
    tight = entce_summary(*_tables([[2.0] * 5] * 20, [[1.0] * 5] * 20), horizon=5, bootstrap=300)
    wide = entce_summary(*_tables([[0.5 + 0.2 * i] * 5 for i in range(20)], [[1.0] * 5] * 20), horizon=5, bootstrap=300)
    assert tight["entce_ci_high"] - tight["entce_ci_low"] < 1e-9 < wide["entce_ci_high"] - wide["entce_ci_low"]


def test_curves_average_examples_reaching_each_step():
    gens, ref = _tables([[1.0, 2.0, 3.0], [3.0]], [[5.0, 5.0], [7.0, 7.0]])
    c = step_curves(gens, ref, horizon=4)
    assert c["entropy_mean"].to_list()[:3] == [2.0, 2.0, 3.0] and c["entropy_n"].to_list()[:3] == [2, 1, 1]
    assert c["logloss_mean"].to_list()[:2] == [6.0, 6.0] and c["logloss_mean"][3] is None


def test_smooth():
    assert smooth([1.0, 3.0, float("nan"), 3.0], 0.5) == [1.0, 2.0, 2.0, 2.5]
