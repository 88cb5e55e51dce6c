import math

import polars as pl
import torch

from entcal.tasks.config import DecodingSpec
from tests.tasks.helpers import scored
from tests.conftest import random_prompts


def _prompts(lm, n=3, p=10, r=15):
    return random_prompts(lm, n, p, r, seed=1)


def test_logloss_equals_direct_log_softmax(tiny_lm):
    prompts = _prompts(tiny_lm)
    decs = [DecodingSpec(), DecodingSpec(temperature=0.8)]
    ref = scored(tiny_lm, prompts, decs, max_tokens=12, epsilon=1e-4, batch_size=2)
    for dec in decs:
        for ex, p, r in prompts.select("example_id", "prompt_ids", "reference_ids").iter_rows():
            ids = torch.tensor([p + r[:12]])
            with torch.no_grad():
                logits = tiny_lm.model(input_ids=ids).logits[0].double() / dec.temperature
            logp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) - 1 + 12]
            want = -logp.gather(-1, torch.tensor(r[:12])[:, None]).squeeze(-1)
            want_h = -(logp.exp() * logp).sum(-1)
            row = ref.filter((pl.col("example_id") == ex) & (pl.col("decoding") == dec.key)).row(0, named=True)
            torch.testing.assert_close(torch.tensor(row["step_logloss"], dtype=torch.float64), want, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(row["step_entropy"], dtype=torch.float64), want_h, atol=1e-4, rtol=0)
            assert row["step_logloss"] == row["step_logloss_untruncated"]


def test_truncated_decoding_mixes_in_epsilon(tiny_lm):
    prompts = _prompts(tiny_lm)
    eps = 1e-3
    ref = scored(tiny_lm, prompts, [DecodingSpec(top_k=1)], max_tokens=12, epsilon=eps, batch_size=3)
    for row in ref.iter_rows(named=True):
        for loss, full, cut, h in zip(row["step_logloss"], row["step_logloss_untruncated"], row["step_truncated"],
                                      row["step_entropy"]):
            assert math.isfinite(loss) and abs(h) < 1e-6
            if cut:  # −log(ε·p(y))
                assert abs(loss - (full - math.log(eps))) < 1e-3
            else:  # y is the argmax: −log((1−ε)·1 + ε·p(y))
                assert 0 <= loss < 1e-2
    assert any(c for cs in ref["step_truncated"] for c in cs)


def test_teacher_forced_rows_equal_unpadded_forwards(tiny_lm):
    """Right padding hides nothing it should not: each row is the state of an unpadded forward at the
    position that predicts its continuation token (hidden states: the tiny model's head is plain)."""
    from entcal.tasks.score import teacher_forced

    model = tiny_lm.model
    contexts, continuations = [[5, 9, 11, 40], [7, 3]], [[12, 13, 14], [20, 21, 22]]
    tf = teacher_forced(model, contexts, continuations, pad_id=0)
    assert tf.weight is not None and tf.lengths == [3, 3] and tf.cache is None
    assert tf.mask.tolist() == [[1] * 7, [1] * 5 + [0] * 2]  # the second sequence is padded
    assert tf.targets.tolist() == [t for r in continuations for t in r]
    for c, r, rows in zip(contexts, continuations, tf.rows.split(tf.lengths)):
        with torch.inference_mode():
            hs = model(input_ids=torch.tensor([c + r]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(rows, hs[len(c) - 1 : len(c) - 1 + len(r)], atol=1e-5, rtol=0)
    cached = teacher_forced(model, contexts, continuations, pad_id=0, hidden=True, use_cache=True)
    assert cached.cache is not None and torch.equal(cached.rows, tf.rows)
