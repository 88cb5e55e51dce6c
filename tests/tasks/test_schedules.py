"""tasks/schedules.py on the tiny model: the τ schedule and the entropy-feedback decoder, their tables and fits."""
import dataclasses
import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import GENERATIONS_SCHEMA, REFERENCE_SCHEMA, RecalibrationKnobs, Reweighting
from entcal.tasks.metrics import entce_summary, smooth
from entcal.tasks.recalibrate import BeforeTables
from entcal.tasks.schedules import (
    BRACKET, TAU_RANGE, Rule, equal_edges, feedback_temperature, fit_entropy_feedback, fit_tau_schedule,
    schedule_tables,
)
from tests.tasks.helpers import docs_prompts, gen, generation_knobs, scored, summary_knobs, with_model

N_NEW = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    df = docs_prompts(tiny_lm.tokenizer, num_examples=8, prompt_tokens=10, tokens=N_NEW)
    return df.with_columns(pl.col("prompt_ids").list.head(pl.lit(pl.Series([10, 7, 10, 5, 10, 8, 9, 10]))))


def _knobs(*, samples: int = 1, batch_size: int = 3, seed: int = 0) -> RecalibrationKnobs:
    return RecalibrationKnobs(candidates=6, generation=generation_knobs(
        max_new_tokens=N_NEW, samples_per_prompt=samples, seed=seed, batch_size=batch_size),
        summary=summary_knobs(horizon=N_NEW, bootstrap=50))


def _schedule(edges, temps, scale=1.0) -> Reweighting:
    return Reweighting("tau_schedule", {"edges": list(edges), "temperatures": list(temps)}, scale)


def _close(a: pl.Series, b: pl.Series, atol=1e-5):
    for x, y in zip(a.to_list(), b.to_list()):
        np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), atol=atol, rtol=0)


def _same_generations(a, b):
    assert a["token_ids"].to_list() == b["token_ids"].to_list()
    assert a["finish_reason"].to_list() == b["finish_reason"].to_list()
    _close(a["step_entropy"], b["step_entropy"])
    _close(a["step_logprob"], b["step_logprob"])


def _roundtrip(rw: Reweighting):
    back = Reweighting(**json.loads(json.dumps(dataclasses.asdict(rw))))
    assert back == rw and back.knob_name == rw.knob_name


# ---------------------------------------------------------------- the rules
def test_unit_schedule_is_the_base_decoding(tiny_lm, prompts):
    """τ ≡ 1 draws the base decoding's tokens (shared noise) and scores the human text as tasks.score does."""
    knobs = _knobs(samples=2)
    rw = _schedule([3, 6, 9], [1.0] * 4)
    gens, ref = schedule_tables(tiny_lm, prompts, rw, knobs)
    base = gen(tiny_lm, prompts, DecodingSpec(), eos_ids=None, max_new_tokens=N_NEW, samples_per_prompt=2,
               batch_size=3)
    assert gens.schema == pl.Schema(GENERATIONS_SCHEMA) and set(gens["decoding"]) == {"t1-sched1"}
    _same_generations(gens, base)
    want = scored(tiny_lm, prompts, [DecodingSpec()], max_tokens=N_NEW, epsilon=1e-4)
    assert ref.schema == pl.Schema(REFERENCE_SCHEMA) and set(ref["decoding"]) == {"t1-sched1"}
    assert ref["example_id"].to_list() == want["example_id"].to_list()
    for col in ("step_logloss", "step_logloss_untruncated", "step_entropy"):
        _close(ref[col], want[col])
    assert not any(any(r) for r in ref["step_truncated"].to_list())
    # rows that stop at an EOS (compacted out of the batch) stay paired with the base decoding
    eos = base["token_ids"][0][4]
    lm = with_model(tiny_lm, eos_ids=(eos,))
    stopped, _ = schedule_tables(lm, prompts, rw, knobs)
    assert (stopped["finish_reason"] == "eos").any()
    _same_generations(stopped, gen(lm, prompts, DecodingSpec(), eos_ids=None, max_new_tokens=N_NEW,
                                   samples_per_prompt=2, batch_size=3))
    # a schedule away from 1 draws other tokens
    hot, _ = schedule_tables(tiny_lm, prompts, _schedule([3, 6, 9], [1.0, 1.0, 2.5, 2.5]), knobs)
    assert hot["token_ids"].to_list() != base["token_ids"].to_list()
    assert [t[:6] for t in hot["token_ids"].to_list()] == [t[:6] for t in base["token_ids"].to_list()]


def test_scale_and_buckets(tiny_lm, prompts):
    """Knob c: τ(s)·c; a constant schedule at scale c is temperature τ·c; each bucket's steps get its τ."""
    knobs = _knobs()
    gens, ref = schedule_tables(tiny_lm, prompts, _schedule([6], [0.5, 0.5], 1.5), knobs)
    assert set(gens["decoding"]) == {"t1-sched1.5"}
    t075 = DecodingSpec(temperature=0.75)
    _same_generations(gens, gen(tiny_lm, prompts, t075, eos_ids=None, max_new_tokens=N_NEW, batch_size=3))
    _close(ref["step_logloss"], scored(tiny_lm, prompts, [t075], max_tokens=N_NEW, epsilon=1e-4)["step_logloss"])
    _, ref = schedule_tables(tiny_lm, prompts, _schedule([4], [0.7, 1.4]), knobs)
    cold, hot = (scored(tiny_lm, prompts, [DecodingSpec(temperature=t)], max_tokens=N_NEW, epsilon=1e-4)
                 for t in (0.7, 1.4))
    for col in ("step_logloss", "step_entropy"):
        _close(ref[col].list.head(4), cold[col].list.head(4))
        _close(ref[col].list.slice(4), hot[col].list.slice(4))


def test_feedback_temperature_bisection():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 500, generator=g) * 3
    z[5, 100:] = -math.inf  # a row with masked tokens: H ≤ log 100
    target = torch.tensor([0.5, 2.0, 4.0, 6.3, -1.0, 3.0], dtype=torch.float64)
    tau = feedback_temperature(z, target)
    h = torch.distributions.Categorical(logits=z.double() / tau[:, None]).entropy()
    np.testing.assert_allclose(h[[0, 1, 2, 5]].numpy(), target[[0, 1, 2, 5]].numpy(), atol=1e-6)
    # unreachable: 6.3 nats is above log 500 = 6.21 (H < log V at any τ), −1 below H at any τ
    assert tau[3] == pytest.approx(TAU_RANGE[1], rel=1e-6) and tau[4] == pytest.approx(TAU_RANGE[0], rel=1e-6)
    assert torch.all(tau[[0, 1, 2]].diff() > 0)  # more entropy asked, more temperature


def test_feedback_decoder_meets_its_target(tiny_lm, prompts):
    """Every recorded step entropy (generation and human prefix) is target(t) + δ; the human token's loss is
    −log softmax(z/τ_t)[y] with τ_t solved independently on the model's plain logits."""
    target = list(np.linspace(1.2, 3.4, N_NEW - 3))  # shorter than T: later steps keep the last entry
    rw = Reweighting("entropy_feedback", {"target": target}, 0.25)
    gens, ref = schedule_tables(tiny_lm, prompts, rw, _knobs(samples=2))
    assert set(gens["decoding"]) == {"t1-feedback0.25"} and set(ref["decoding"]) == {"t1-feedback0.25"}
    goal = np.asarray(target + [target[-1]] * 3) + 0.25
    for table in (gens, ref):
        for h in table["step_entropy"].to_list():
            np.testing.assert_allclose(h, goal[: len(h)], atol=2e-5, rtol=0)
    ctx, refs = prompts["prompt_ids"].to_list(), prompts["reference_ids"].to_list()
    for ex, t in ((0, 0), (3, 7), (6, N_NEW - 1)):
        with torch.inference_mode():
            z = tiny_lm.model(input_ids=torch.tensor([ctx[ex] + refs[ex][:t]])).logits[0, -1].double().numpy()
        lo, hi = 0.05, 20.0
        for _ in range(200):  # plain bisection in τ, numpy float64
            mid = (lo + hi) / 2
            p = np.exp(z / mid - np.logaddexp.reduce(z / mid))
            lo, hi = (mid, hi) if -(p * np.log(p)).sum() < goal[t] else (lo, mid)
        want = -(z / lo - np.logaddexp.reduce(z / lo))[refs[ex][t]]
        assert ref["step_logloss"][ex][t] == pytest.approx(want, abs=1e-4)


def test_rules_refuse_bad_params():
    for rw in (_schedule([4], [1.0]), _schedule([4], [1.0, 0.0]), _schedule([4, 4], [1.0] * 3),
               _schedule([4], [1.0, 1.0], 0.0), Reweighting("entropy_feedback", {"target": []}, 0.0),
               Reweighting("lookahead", {}, 0.1)):
        with pytest.raises(ValueError):
            Rule(rw)
    assert equal_edges(48, 4) == [12, 24, 36] and equal_edges(10, 3) == [3, 7]


# ---------------------------------------------------------------- fits
def _bucket_gaps(gens, ref, bounds):
    out = []
    for a, b in zip(bounds, bounds[1:]):
        h = np.concatenate([np.asarray(x[a:b], dtype=float) for x in gens["step_entropy"].to_list()])
        l = np.concatenate([np.asarray(x[a:b], dtype=float) for x in ref["step_logloss"].to_list()])
        out.append(h.mean() - l.mean())
    return out


def test_fit_tau_schedule(tiny_lm, prompts):
    """Bucket by bucket, each |mean h − l| shrinks (or the bracket had no sign change); the diagnostics agree with
    the tables schedule_tables makes at the fitted schedule; bucket b samples only up to its end."""
    train, knobs = prompts.head(5), _knobs(samples=2)
    base = gen(tiny_lm, train, DecodingSpec(), eos_ids=None, max_new_tokens=N_NEW, samples_per_prompt=2,
               batch_size=3)
    ref0 = scored(tiny_lm, train, [DecodingSpec()], max_tokens=N_NEW, epsilon=1e-4)
    before = BeforeTables(base, ref0)
    rw = fit_tau_schedule(tiny_lm, train, before, knobs, buckets=3)
    assert rw.method == "tau_schedule" and rw.knob == 1.0 and rw.params["edges"] == [4, 8]
    fit, bounds = rw.fit, [0, 4, 8, N_NEW]
    gens1, ref1 = schedule_tables(tiny_lm, train, rw, knobs)
    np.testing.assert_allclose([b["gap_after"] for b in fit["buckets"]], _bucket_gaps(gens1, ref1, bounds), atol=1e-9)
    np.testing.assert_allclose([b["gap_before"] for b in fit["buckets"]], _bucket_gaps(base, ref0, bounds), atol=1e-5)
    s0, s1 = entce_summary(base, ref0, knobs.summary), entce_summary(gens1, ref1, knobs.summary)
    assert fit["entce_fit_before"] == pytest.approx(s0.entce, abs=1e-5)
    assert fit["entce_fit_after"] == pytest.approx(s1.entce, abs=1e-9)
    moved = 0
    for b, tau in zip(fit["buckets"], rw.params["temperatures"]):
        assert b["temperature"] == tau and BRACKET[0] <= tau <= BRACKET[1]
        assert all(BRACKET[0] <= r["temperature"] <= BRACKET[1] for r in b["rounds"]) and len(b["rounds"]) <= 8
        if b["sign_change"]:
            assert abs(b["gap_after"]) < abs(b["gap_before"]), b
            moved += 1
        else:  # the bracket end nearer 0
            ends = {r["temperature"]: abs(r["gap"]) for r in b["rounds"]}
            assert tau in BRACKET and ends[tau] == min(ends.values()) and not b["converged"]
    assert moved >= 1
    assert fit["generated_steps"] == sum(len(b["rounds"]) * b["steps"][1] for b in fit["buckets"]) + N_NEW
    _roundtrip(rw)
    # a bracket with no root: every bucket keeps the end nearer 0 and says so
    cold = fit_tau_schedule(tiny_lm, train, before, knobs, buckets=2, bracket=(0.3, 0.32))
    for b in cold.fit["buckets"]:
        assert not b["sign_change"] and len(b["rounds"]) == 2 and b["temperature"] == 0.32, b


def test_fit_entropy_feedback(tiny_lm, prompts):
    """The target is the fit split's per-step human log loss at τ = 1, smoothed; scored here when not given."""
    train, knobs = prompts.head(5), _knobs()
    ref0 = scored(tiny_lm, train, [DecodingSpec()], max_tokens=N_NEW, epsilon=1e-4)
    base = gen(tiny_lm, train, DecodingSpec(), eos_ids=None, max_new_tokens=N_NEW, batch_size=3)
    rw = fit_entropy_feedback(tiny_lm, train, BeforeTables(base, ref0), knobs)
    losses = np.asarray(ref0["step_logloss"].to_list(), dtype=float)  # every reference has N_NEW tokens
    want = smooth(list(losses.mean(0)), 0.2)
    assert rw.method == "entropy_feedback" and rw.knob == 0.0
    np.testing.assert_allclose(rw.params["target"], want, atol=1e-6)
    np.testing.assert_allclose(rw.fit["logloss_curve"], losses.mean(0), atol=1e-6)
    assert rw.fit["entce_fit_before"] == pytest.approx(entce_summary(base, ref0, knobs.summary).entce, abs=1e-9)
    gens1, ref1 = schedule_tables(tiny_lm, train, rw, knobs)
    assert rw.fit["entce_fit_after"] == pytest.approx(entce_summary(gens1, ref1, knobs.summary).entce, abs=1e-9)
    assert 0 <= rw.fit["tau_clamped_share_human"] <= 1 and math.isfinite(rw.fit["target_miss_generation"])
    _roundtrip(rw)
    again = fit_entropy_feedback(tiny_lm, train, BeforeTables(base), knobs)  # no train_reference
    np.testing.assert_allclose(again.params["target"], rw.params["target"], atol=1e-5)
