"""The typed task API (tasks.contracts' knobs, tasks.models.LoadedModel) called with keyword knobs, as the
tests of tests/tasks read best. Every helper is one call of the real function; nothing is re-implemented."""
from __future__ import annotations

import dataclasses

import polars as pl

from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import GenerationKnobs, ScoringKnobs, Summary, SummaryKnobs
from entcal.tasks.models import LoadedModel

UNSET = object()


def generation_knobs(*, max_new_tokens: int, samples_per_prompt: int = 1, seed: int = 0,
                     batch_size: int = 8) -> GenerationKnobs:
    return GenerationKnobs(max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                           batch_size=batch_size)


def summary_knobs(*, horizon: int, bootstrap: int = 1000, ci_level: float = 0.95, seed: int = 0) -> SummaryKnobs:
    return SummaryKnobs(horizon=horizon, bootstrap=bootstrap, ci_level=ci_level, seed=seed)


def with_model(lm: LoadedModel, model=UNSET, *, eos_ids=UNSET, compiled=UNSET) -> LoadedModel:
    """``lm`` with another module (e.g. a bf16 or reweighted copy), other EOS ids, or compile on / off."""
    changes = {k: v for k, v in (("model", model), ("eos_ids", eos_ids), ("compiled", compiled)) if v is not UNSET}
    return dataclasses.replace(lm, **changes)


def gen(lm: LoadedModel, prompts: pl.DataFrame, decoding: DecodingSpec, *, eos_ids=(), progress=None, adjust=None,
        key=None, kv_cache: str = "static", **knobs) -> pl.DataFrame:
    """tasks.generate.generate with ``knobs`` (generation_knobs' keywords). ``eos_ids``: the ids that end a row,
    none by default (every row runs to max_new_tokens); None keeps ``lm``'s own."""
    from entcal.tasks.generate import generate

    lm = lm if eos_ids is None else with_model(lm, eos_ids=tuple(eos_ids))
    return generate(lm, prompts, decoding, generation_knobs(**knobs), progress=progress, adjust=adjust, key=key,
                    kv_cache=kv_cache)


def scored(lm: LoadedModel, prompts: pl.DataFrame, decodings: list[DecodingSpec], *, max_tokens: int,
           epsilon: float, batch_size: int = 8) -> pl.DataFrame:
    """tasks.score.score: the reference table of ``prompts`` under ``decodings``."""
    from entcal.tasks.score import score

    return score(lm, prompts, decodings, ScoringKnobs(max_tokens=max_tokens, epsilon=epsilon, batch_size=batch_size))


def summarize(generations: pl.DataFrame, reference: pl.DataFrame, **knobs) -> Summary:
    """tasks.metrics.entce_summary with ``knobs`` (summary_knobs' keywords)."""
    from entcal.tasks.metrics import entce_summary

    return entce_summary(generations, reference, summary_knobs(**knobs))


def docs_prompts(tokenizer, *, num_examples: int, prompt_tokens: int, tokens: int) -> pl.DataFrame:
    """``num_examples`` prompts of the built-in python-docs corpus, each with exactly ``tokens`` reference tokens."""
    from entcal.tasks.config import DatasetSpec
    from entcal.tasks.datasets import build_prompts, documents

    df, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tokenizer, label="python-docs",
                          num_examples=num_examples, prompt_tokens=prompt_tokens, min_reference_tokens=tokens,
                          max_reference_tokens=tokens)
    return df
