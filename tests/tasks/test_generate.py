import math

import polars as pl
import pytest
import torch

from entcal.tasks.config import DecodingSpec
from entcal.tasks.generate import generate_table, sample_tokens
from entcal.tasks.score import score_table

DECODINGS = [DecodingSpec(), DecodingSpec(temperature=0.7), DecodingSpec(top_k=20),
             DecodingSpec(top_p=0.8), DecodingSpec(temperature=1.3, min_p=0.05)]


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    from entcal.tasks.config import DatasetSpec
    from entcal.tasks.datasets import build_prompts, documents

    df, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tiny_lm.tokenizer, label="python-docs",
                          num_examples=6, prompt_tokens=12, min_reference_tokens=24, max_reference_tokens=24)
    # uneven prompt lengths exercise left padding
    return df.with_columns(pl.col("prompt_ids").list.head(pl.lit(pl.Series([12, 9, 12, 5, 12, 7]))))


def assert_same_samples(a: pl.DataFrame, b: pl.DataFrame, atol: float) -> None:
    """Same rows, tokens and finish reasons; step statistics equal up to ``atol`` (rounding)."""
    assert a.drop("step_entropy", "step_logprob").equals(b.drop("step_entropy", "step_logprob"))
    for col in ("step_entropy", "step_logprob"):
        torch.testing.assert_close(torch.tensor(a[col].explode().to_list()), torch.tensor(b[col].explode().to_list()),
                                   atol=atol, rtol=0)


def _early_eos(lm, prompts, dec) -> tuple[int, ...]:
    """Tokens that some rows sample early on: as EOS ids they end those rows mid-batch."""
    free = _gen(lm, prompts, dec)
    return tuple({free["token_ids"][i][2 + i] for i in range(0, free.height, 3)})


def _gen(lm, prompts, dec, **kw):
    args = dict(max_new_tokens=20, samples_per_prompt=2, seed=3, batch_size=4, eos_ids=(), pad_id=0)
    args.update(kw)
    return generate_table(lm.model, prompts, dec, **args)


def test_schema_and_reproducible_under_seed(tiny_lm, prompts):
    a = _gen(tiny_lm, prompts, DECODINGS[0])
    assert a.schema["token_ids"] == pl.List(pl.Int32) and a.height == 12
    assert a.equals(_gen(tiny_lm, prompts, DECODINGS[0]))
    assert not a["token_ids"].equals(_gen(tiny_lm, prompts, DECODINGS[0], seed=4)["token_ids"])
    # a row's sample does not depend on which rows share its batch
    assert a["token_ids"].equals(_gen(tiny_lm, prompts, DECODINGS[0], batch_size=1)["token_ids"])
    assert (a["step_entropy"].list.len() == 20).all()


def test_shards_concatenate_to_the_unsharded_table(tiny_lm, prompts):
    from entcal.tasks.generate import shards

    whole = _gen(tiny_lm, prompts, DECODINGS[1])
    parts = shards(prompts, 4)
    assert [p.height for p in parts] == [4, 2]
    joined = pl.concat([_gen(tiny_lm, p, DECODINGS[1]) for p in parts])
    assert_same_samples(joined, whole, atol=1e-5)  # floats differ only by batch padding's rounding


@pytest.mark.parametrize("dec", DECODINGS, ids=lambda d: d.key)
def test_recorded_entropy_equals_teacher_forced_rescore(tiny_lm, prompts, dec):
    """The acceptance check: step entropy recorded while sampling (KV cache, left padding) equals an
    independent teacher-forced re-score of the generated tokens under the same decoding."""
    gens = _gen(tiny_lm, prompts, dec, samples_per_prompt=1)
    as_ref = prompts.join(gens.select("example_id", pl.col("token_ids").alias("gen")), on="example_id")
    as_ref = as_ref.with_columns(reference_ids=pl.col("gen")).drop("gen")
    ref = score_table(tiny_lm.model, as_ref, [dec], max_tokens=100, epsilon=1e-4, batch_size=3)
    joined = gens.join(ref, on="example_id")
    for row in joined.iter_rows(named=True):
        torch.testing.assert_close(torch.tensor(row["step_entropy"]), torch.tensor(row["step_entropy_right"]),
                                   atol=1e-4, rtol=0)
        # the sampled token's log-prob is the re-scored log q(token); never truncated away
        lp = -torch.tensor(row["step_logloss"])
        torch.testing.assert_close(torch.tensor(row["step_logprob"]), lp, atol=1e-4, rtol=0)
        assert not any(row["step_truncated"])


def test_eos_stops_a_row_and_compacts(tiny_lm, prompts):
    free = _gen(tiny_lm, prompts, DECODINGS[0], samples_per_prompt=1)
    eos = free["token_ids"][0][3]  # a token this row is known to emit at step 3
    g = _gen(tiny_lm, prompts, DECODINGS[0], samples_per_prompt=1, eos_ids=(eos,))
    row = g.row(0, named=True)
    assert row["finish_reason"] == "eos" and row["token_ids"][-1] == eos and len(row["token_ids"]) <= 4
    # rows that never hit EOS run to the full length, unchanged by the others finishing
    for before, after in zip(free.iter_rows(named=True), g.iter_rows(named=True)):
        if after["finish_reason"] == "length":
            assert before["token_ids"] == after["token_ids"]


@pytest.mark.parametrize("dec", DECODINGS[:1] + DECODINGS[3:4], ids=lambda d: d.key)
def test_static_kv_cache_samples_what_the_growing_cache_samples(tiny_lm, prompts, dec):
    """The preallocated cache (written in place, compacted when rows hit EOS) changes nothing but speed."""
    eos = _early_eos(tiny_lm, prompts, dec)
    static = _gen(tiny_lm, prompts, dec, eos_ids=eos)
    assert 0 < (static["finish_reason"] == "eos").sum() < static.height
    assert_same_samples(static, _gen(tiny_lm, prompts, dec, eos_ids=eos, kv_cache="dynamic"), atol=1e-5)


def test_compiled_decode_step_samples_what_eager_samples(tiny_lm, prompts):
    """torch.compile over the static cache (CUDA graphs on CUDA; inductor's C++ here), with rows
    leaving the batch at EOS so the compiled step meets several batch sizes."""
    dec = DECODINGS[1]
    eos = _early_eos(tiny_lm, prompts, dec)
    eager = _gen(tiny_lm, prompts, dec, eos_ids=eos)
    assert 0 < (eager["finish_reason"] == "eos").sum() < eager.height
    assert_same_samples(_gen(tiny_lm, prompts, dec, eos_ids=eos, compiled=True), eager, atol=1e-4)


def test_unknown_kv_cache_kind_is_refused(tiny_lm, prompts):
    with pytest.raises(ValueError, match="cache: expected 'static' or 'dynamic', got 'paged'"):
        _gen(tiny_lm, prompts, DECODINGS[0], kv_cache="paged")


def test_top_k_one_is_greedy_with_zero_entropy(tiny_lm, prompts):
    g = _gen(tiny_lm, prompts, DecodingSpec(top_k=1), samples_per_prompt=1)
    assert all(abs(h) < 1e-6 for hs in g["step_entropy"] for h in hs)
    assert all(abs(lp) < 1e-6 for lps in g["step_logprob"] for lp in lps)


def test_inverse_cdf_never_draws_a_truncated_token():
    z = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0, -math.inf]] * 4)
    u = torch.tensor([0.0, 0.2689, 0.5, 0.999999])
    tok = sample_tokens(z, u)
    assert set(tok.tolist()) <= {1, 3} and tok[0] == 1 and tok[-1] == 3
    # frequencies follow the distribution
    many = sample_tokens(z[:1].expand(20000, -1), torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert abs((many == 3).float().mean().item() - 1 / (1 + math.exp(-1))) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none on this machine)")
def test_cuda_graph_decode_steps_sample_what_eager_cuda_samples(tiny_model_dir, prompts):
    from entcal.tasks.config import ModelSpec
    from entcal.tasks.models import load_model

    lm = load_model(ModelSpec(path=str(tiny_model_dir), name="tiny", device="cuda", dtype="float32"))
    eos = _early_eos(lm, prompts, DECODINGS[0])
    eager = _gen(lm, prompts, DECODINGS[0], eos_ids=eos)
    assert_same_samples(_gen(lm, prompts, DECODINGS[0], eos_ids=eos, compiled=True), eager, atol=1e-4)


def test_inverse_cdf_draws_a_token_of_probability_1e9_late_in_a_large_vocabulary():
    """A float32 CDF near 1 moves in steps of 6e-8: tokens of q ~ 1e-9 there added nothing to it and
    were never drawn. Each is drawn when the uniform falls inside its interval of q (exact, float64)."""
    v = 151_936
    tiny = [v - 5000, v - 40, v - 1]
    z = torch.zeros(v)  # equal logits elsewhere: q's intervals do not depend on exp's rounding
    z[tiny] = math.log(1e-9 * (v - len(tiny)) / (1 - 1e-9 * len(tiny)))
    cdf = torch.cumsum(torch.softmax(z.double(), 0), 0)
    lo, hi = cdf[[j - 1 for j in tiny]], cdf[tiny]
    assert ((hi - lo - 1e-9).abs() < 1e-12).all() and (lo > 0.95).all()  # q = 1e-9 where the CDF is near 1
    u = torch.stack([lo + 0.1e-9, (lo + hi) / 2, hi - 0.1e-9], 1).flatten()
    drawn = sample_tokens(z.expand(u.numel(), -1), u)
    assert drawn.tolist() == [j for j in tiny for _ in range(3)]


@pytest.mark.parametrize("dec", DECODINGS[:2], ids=lambda d: d.key)
def test_bf16_model_samples_from_the_logits_score_uses(tiny_lm, prompts, dec):
    """One distribution, one rounding: with a bfloat16 model the sampler's logits are float32 hidden @ W.T
    from the final hidden state, as in tasks/score.py, so the recorded entropy equals the re-scored one
    to float32 rounding; sampling from bf16 logits differed by ~1e-2 nats here."""
    import copy

    bf16 = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    # one batch in both: the same rows share the bf16 forward, so only the head's rounding could differ
    gens = generate_table(bf16, prompts, dec, max_new_tokens=20, seed=3, batch_size=prompts.height)
    as_ref = prompts.join(gens.select("example_id", pl.col("token_ids").alias("gen")), on="example_id")
    as_ref = as_ref.with_columns(reference_ids=pl.col("gen")).drop("gen")
    ref = score_table(bf16, as_ref, [dec], max_tokens=100, epsilon=1e-4, batch_size=prompts.height)
    joined = gens.join(ref, on="example_id")
    torch.testing.assert_close(torch.tensor(joined["step_entropy"].explode().to_list()),
                               torch.tensor(joined["step_entropy_right"].explode().to_list()), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(joined["step_logprob"].explode().to_list()),
                               -torch.tensor(joined["step_logloss"].explode().to_list()), atol=1e-5, rtol=0)


def test_text_columns_decode_the_tokens_and_are_null_without_a_tokenizer(tiny_lm, prompts):
    tok = tiny_lm.tokenizer
    plain = _gen(tiny_lm, prompts, DECODINGS[0])
    named = _gen(tiny_lm, prompts, DECODINGS[0], tokenizer=tok)
    assert plain.schema == named.schema and plain["text"].is_null().all() and plain["tokens"].is_null().all()
    assert named.drop("text", "tokens").equals(plain.drop("text", "tokens"))  # decoding changes no sample
    for ids, text, tokens in named.select("token_ids", "text", "tokens").iter_rows():
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert len(tokens) == len(ids) and "".join(tokens) == tok.decode(ids, skip_special_tokens=False)
