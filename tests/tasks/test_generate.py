import polars as pl
import pytest
import torch

from entcal.tasks.config import DecodingSpec
from tests.tasks.helpers import docs_prompts, gen, scored, with_model

DECODINGS = [DecodingSpec(), DecodingSpec(temperature=0.7), DecodingSpec(top_k=20),
             DecodingSpec(top_p=0.8), DecodingSpec(temperature=1.3, min_p=0.05)]


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    df = docs_prompts(tiny_lm.tokenizer, num_examples=6, prompt_tokens=12, tokens=24)
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
    """tasks.generate.generate: 20 steps, 2 samples per prompt, seed 3, 4 rows per batch, no EOS ids unless given."""
    return gen(lm, prompts, dec, **{**dict(max_new_tokens=20, samples_per_prompt=2, seed=3, batch_size=4), **kw})


def test_schema_and_reproducible_under_seed(tiny_lm, prompts):
    a = _gen(tiny_lm, prompts, DECODINGS[0])
    assert a.schema["token_ids"] == pl.List(pl.Int32) and a.height == 12
    assert a.equals(_gen(tiny_lm, prompts, DECODINGS[0]))
    assert not a["token_ids"].equals(_gen(tiny_lm, prompts, DECODINGS[0], seed=4)["token_ids"])
    # a row's sample does not depend on which rows share its batch
    assert a["token_ids"].equals(_gen(tiny_lm, prompts, DECODINGS[0], batch_size=1)["token_ids"])
    assert (a["step_entropy"].list.len() == 20).all()


def test_shards_concatenate_to_the_unsharded_table(tiny_lm, prompts):
    from entcal.flows.executor import shards

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
    ref = scored(tiny_lm, as_ref, [dec], max_tokens=100, epsilon=1e-4, batch_size=3)
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
    assert_same_samples(_gen(with_model(tiny_lm, compiled=True), prompts, dec, eos_ids=eos), eager, atol=1e-4)


def test_unknown_kv_cache_kind_is_refused(tiny_lm, prompts):
    with pytest.raises(ValueError, match="cache: expected 'static' or 'dynamic', got 'paged'"):
        _gen(tiny_lm, prompts, DECODINGS[0], kv_cache="paged")


def test_top_k_one_is_greedy_with_zero_entropy(tiny_lm, prompts):
    g = _gen(tiny_lm, prompts, DecodingSpec(top_k=1), samples_per_prompt=1)
    assert all(abs(h) < 1e-6 for hs in g["step_entropy"] for h in hs)
    assert all(abs(lp) < 1e-6 for lps in g["step_logprob"] for lp in lps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none on this machine)")
def test_cuda_graph_decode_steps_sample_what_eager_cuda_samples(tiny_model_dir, prompts):
    from entcal.tasks.config import ModelSpec
    from entcal.tasks.models import load_model

    lm = load_model(ModelSpec(path=str(tiny_model_dir), name="tiny", device="cuda", dtype="float32"))
    assert lm.compiled  # compile: auto is on for CUDA
    eager = with_model(lm, compiled=False)
    eos = _early_eos(eager, prompts, DECODINGS[0])
    want = _gen(eager, prompts, DECODINGS[0], eos_ids=eos)
    assert_same_samples(_gen(lm, prompts, DECODINGS[0], eos_ids=eos), want, atol=1e-4)


@pytest.mark.parametrize("dec", DECODINGS[:2], ids=lambda d: d.key)
def test_bf16_model_samples_from_the_logits_score_uses(tiny_lm, prompts, dec):
    """One distribution, one rounding: with a bfloat16 model the sampler's logits are float32 hidden @ W.T
    from the final hidden state, as in tasks/score.py, so the recorded entropy equals the re-scored one
    to float32 rounding; sampling from bf16 logits differed by ~1e-2 nats here."""
    import copy

    bf16 = with_model(tiny_lm, copy.deepcopy(tiny_lm.model).to(torch.bfloat16))
    # one batch in both: the same rows share the bf16 forward, so only the head's rounding could differ
    gens = gen(bf16, prompts, dec, max_new_tokens=20, seed=3, batch_size=prompts.height)
    as_ref = prompts.join(gens.select("example_id", pl.col("token_ids").alias("gen")), on="example_id")
    as_ref = as_ref.with_columns(reference_ids=pl.col("gen")).drop("gen")
    ref = scored(bf16, as_ref, [dec], max_tokens=100, epsilon=1e-4, batch_size=prompts.height)
    joined = gens.join(ref, on="example_id")
    torch.testing.assert_close(torch.tensor(joined["step_entropy"].explode().to_list()),
                               torch.tensor(joined["step_entropy_right"].explode().to_list()), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(joined["step_logprob"].explode().to_list()),
                               -torch.tensor(joined["step_logloss"].explode().to_list()), atol=1e-5, rtol=0)


def test_text_columns_decode_the_tokens(tiny_lm, prompts):
    """text and tokens come from the model's tokenizer (always: a LoadedModel carries one); the model's own
    EOS ids end rows and stay in tokens, not in text."""
    tok = tiny_lm.tokenizer
    eos = _early_eos(tiny_lm, prompts, DECODINGS[0])
    named = _gen(with_model(tiny_lm, eos_ids=eos), prompts, DECODINGS[0], eos_ids=None)  # None: the model's ids
    assert (named["finish_reason"] == "eos").any()
    assert named["text"].null_count() == 0 and named["tokens"].null_count() == 0
    assert named.drop("text", "tokens").equals(_gen(tiny_lm, prompts, DECODINGS[0], eos_ids=eos).drop("text", "tokens"))
    for ids, text, tokens in named.select("token_ids", "text", "tokens").iter_rows():
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert len(tokens) == len(ids) and "".join(tokens) == tok.decode(ids, skip_special_tokens=False)


def test_nan_logits_name_the_example_and_the_step(tiny_lm, prompts):
    """NaN logits in one row at one step (not the first, not in the first row of its batch) raise
    NonFiniteLogits naming that row's example and that step; the other rows' logits are finite."""
    import copy

    from entcal.storage.errors import UserError
    from entcal.tasks.generate import NonFiniteLogits

    model = copy.deepcopy(tiny_lm.model)
    target, bad_step = prompts.row(4, named=True), 3
    seen = {"row": None, "calls": 0}

    def find_row(_module, args, kwargs):  # the prefill: which batch row holds the target prompt (left padded)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            p = list(target["prompt_ids"])
            seen["row"] = next(i for i, r in enumerate(ids.tolist()) if r[len(r) - len(p):] == p)

    def poison(_module, _args, out):  # final norm of forward k: the hidden states of step k's logits
        k, seen["calls"] = seen["calls"], seen["calls"] + 1
        if k == bad_step:
            out = out.clone()
            out[seen["row"]] = float("nan")
        return out

    model.model.register_forward_pre_hook(find_row, with_kwargs=True)
    model.model.norm.register_forward_hook(poison)
    nan_lm = with_model(tiny_lm, model)
    with pytest.raises(NonFiniteLogits) as err:
        _gen(nan_lm, prompts, DECODINGS[0], samples_per_prompt=1, batch_size=prompts.height)
    assert seen["row"] not in (None, 0)  # a row other than the batch's first
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"NaN or +inf in the model's logits for example {target['example_id']} "
                                     f"at generation step {bad_step} ")


@pytest.mark.slow
def test_two_close_decodings_of_the_bundled_model_share_most_draws_and_a_narrow_paired_ci():
    """τ = 1 and τ = 0.99 on the same 8 python-docs prompts, 64 new tokens, one seed: with noise keyed by
    (row seed, step, token) most draws are shared (inverse-CDF sampling in vocabulary order shared 8% here),
    so the paired 95% CI of ΔH̄ is at most ±0.1 nats (it was ±0.28). Measured on this 2-core CPU: 87.5% of
    tokens shared, half-width 0.099."""
    from entcal.tasks import datasets, metrics, score
    from entcal.tasks.config import DatasetSpec, ModelSpec
    from entcal.tasks.contracts import PromptKnobs, ScoringKnobs, SummaryKnobs
    from entcal.tasks.generate import generate
    from entcal.tasks.models import load_model
    from tests.tasks.helpers import generation_knobs

    spec = ModelSpec(name="smollm2-135m")
    lm = load_model(spec)
    prompts = datasets.prepare_prompts(lm.tokenizer, None, DatasetSpec(name="python-docs"), PromptKnobs(8, 64, 64, 64, 64))
    tables = {}
    for tau in (1.0, 0.99):
        dec = DecodingSpec(temperature=tau)
        tables[tau] = (generate(lm, prompts, dec, generation_knobs(max_new_tokens=64, batch_size=8)),
                       score.score(lm, prompts, [dec], ScoringKnobs(max_tokens=64, epsilon=1e-4, batch_size=8)))
    a, b = (tables[t][0]["token_ids"].to_list() for t in (1.0, 0.99))
    shared = sum(x == y for r, s in zip(a, b) for x, y in zip(r, s)) / sum(max(len(r), len(s)) for r, s in zip(a, b))
    lo, hi = metrics.paired_delta(tables[1.0], tables[0.99], SummaryKnobs(64, 1000, 0.95, 0))["delta_entropy_ci"]
    assert shared >= 0.5 and (hi - lo) / 2 <= 0.1, (shared, lo, hi)
