"""flows/cache.py: a stage's cache key covers every module its result depends on, Triton kernels included."""
from __future__ import annotations

import shutil

import pytest

from entcal.flows import cache, stages

STAGES = {"prepare": stages.prepare_task, "generate": stages.generate_task, "score": stages.score_task,
          "recalibrate": stages.recalibrate_task, "corpus-alpha": stages.corpus_alpha_task,
          "model-params": stages.model_params_task}


@pytest.fixture
def tree(tmp_path):
    """A copy of the code a stage can depend on, to edit."""
    for package in cache.PACKAGES:
        shutil.copytree(cache.ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digest(stage: str, root) -> str:
    return cache.source_digest(*STAGES[stage].fn.__stage__.modules, root=root)


def edit(root, path: str, text: str = "\nEDITED = 1\n") -> None:
    with open(root / path, "a") as f:
        f.write(text)


@pytest.mark.parametrize("stage, dependency", [
    ("generate", "kernels/stats.py"),  # a Triton kernel the sampler's statistics run on
    ("generate", "kernels/truncation.py"),
    ("score", "kernels/fused_head.py"),
    ("score", "tasks/config.py"),
    ("recalibrate", "tasks/generate.py"),  # the reweighted sampler is the study's sampler
    ("recalibrate", "tasks/metrics.py"),
    ("prepare", "tasks/datasets.py"),
    ("corpus-alpha", "tasks/scaling.py"),
    ("model-params", "tasks/models.py"),
])
def test_editing_a_dependency_changes_the_key(tree, stage, dependency):
    before = digest(stage, tree)
    edit(tree, dependency)
    assert digest(stage, tree) != before


@pytest.mark.parametrize("stage, unrelated", [
    ("generate", "tasks/report.py"),
    ("score", "tasks/publish.py"),
    ("prepare", "tasks/generate.py"),
    ("prepare", "kernels/stats.py"),  # config.py imports kernels.decoding, not the kernels
    ("generate", "storage/s3.py"),  # where a part is stored is not what it holds
    ("corpus-alpha", "tasks/score.py"),
])
def test_editing_an_unrelated_module_keeps_the_key(tree, stage, unrelated):
    before = digest(stage, tree)
    edit(tree, unrelated)
    assert digest(stage, tree) == before


def test_comments_and_docstrings_are_not_code(tree):
    before = digest("generate", tree)
    edit(tree, "tasks/generate.py", "\n# a comment\n")
    path = tree / "kernels/stats.py"
    path.write_text(path.read_text().replace('"""', '"""Reworded. ', 1))
    assert digest("generate", tree) == before


def test_imports_inside_functions_count(tree):
    """kernels/__init__.py imports its Triton modules inside functions; they are dependencies all the same."""
    files = {str(p.relative_to(tree)) for p in cache.dependencies("entcal.kernels", root=tree)}
    assert {"kernels/stats.py", "kernels/fused_head.py", "kernels/truncation.py"} <= files


def test_the_key_is_the_code_and_the_parameters_by_content():
    import polars as pl

    from entcal.tasks.contracts import GenerationKnobs

    class Context:  # what Prefect passes a cache_key_fn: only .task is read
        task = stages.generate_task

    knobs = GenerationKnobs(max_new_tokens=8, samples_per_prompt=1, seed=0, batch_size=4)
    prompts = pl.DataFrame({"example_id": ["a"], "prompt_ids": [[1, 2]]})
    key = cache.content_key(Context, {"prompts": prompts, "knobs": knobs, "shard": 0})
    assert key == cache.content_key(Context, {"prompts": prompts.clone(), "knobs": knobs, "shard": 3})  # name only
    assert key != cache.content_key(Context, {"prompts": prompts, "knobs": GenerationKnobs(8, 1, 1, 4), "shard": 0})
    assert key != cache.content_key(Context, {"prompts": prompts.with_columns(pl.lit("b").alias("example_id")),
                                              "knobs": knobs, "shard": 0})


def test_the_stage_function_itself_is_in_the_key():
    from prefect import task

    from entcal.tasks import generate

    @task(name="generate")
    @stages.stage(generate)
    def one(x: int) -> int:
        return x

    @task(name="generate")
    @stages.stage(generate)
    def other(x: int) -> int:
        return x + 1

    keys = [cache.content_key(type("Context", (), {"task": t}), {"x": 1}) for t in (one, other)]
    assert keys[0] != keys[1]


def test_a_parameter_without_a_content_form_is_refused():
    class Context:
        task = stages.corpus_alpha_task

    with pytest.raises(TypeError, match="no content form for a object parameter"):
        cache.content_key(Context, {"dataset": object()})
