"""flows/cache.py: a stage's cache key covers every module its result depends on, Triton kernels included."""
from __future__ import annotations

import shutil

import pytest

from entcal.flows import cache, stages



@pytest.fixture
def tree(tmp_path):
    """A copy of the code a stage can depend on, to edit."""
    for package in cache.PACKAGES:
        shutil.copytree(cache.ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digest(stage: str, root) -> str:
    return cache.source_digest(*stages.STAGES[stage].modules, root=root)


def edit(root, path: str, text: str = "\nEDITED = 1\n") -> None:
    with open(root / path, "a") as f:
        f.write(text)


@pytest.mark.parametrize("stage, dependency", [
    ("generate", "kernels/stats.py"),  # a Triton kernel the sampler's statistics run on
    ("generate", "kernels/truncation.py"),
    ("score", "kernels/fused_head.py"),
    ("score", "tasks/config.py"),
    ("fit", "tasks/schedules.py"),  # a method fitted in a module recalibrate imports inside a function
    ("calibrated", "tasks/generate.py"),  # the reweighted sampler is the study's sampler
    ("calibrated", "tasks/atoms.py"),
    ("prepare", "tasks/datasets.py"),
    ("corpus-alpha", "tasks/theory.py"),
    ("model-params", "tasks/models.py"),
])
def test_editing_a_dependency_changes_the_key(tree, stage, dependency):
    before = digest(stage, tree)
    edit(tree, dependency)
    assert digest(stage, tree) != before


@pytest.mark.parametrize("stage, unrelated", [
    ("generate", "tasks/report.py"),
    ("score", "tasks/describe.py"),
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


def key(task, parameters: dict) -> str:
    """The key Prefect's cache_key_fn gives a call of ``task`` (flows/stages.py content_key)."""
    return cache.content_key(task, parameters, stages.STAGES[task.name].modules)


def test_every_task_is_a_registered_stage_whose_modules_exist():
    import importlib

    tasks = [stages.prepare_task, stages.generate_task, stages.score_task, stages.fit_task, stages.calibrated_task,
             stages.model_params_task, stages.corpus_alpha_task]
    assert {t.name for t in tasks} == set(stages.STAGES)
    for stage in stages.STAGES.values():
        assert all(importlib.import_module(m) for m in stage.modules)
    assert [n for n, s in stages.STAGES.items() if s.gpu] == ["generate", "score", "fit", "calibrated", "model-params"]


def test_the_key_is_the_code_and_the_parameters_by_content():
    import polars as pl

    from entcal.tasks.contracts import GenerationKnobs

    knobs = GenerationKnobs(max_new_tokens=8, samples_per_prompt=1, seed=0, batch_size=4)
    prompts = pl.DataFrame({"example_id": ["a"], "prompt_ids": [[1, 2]]})
    one = key(stages.generate_task, {"prompts": prompts, "knobs": knobs, "label": "m/d/t1/shard0"})
    assert one == key(stages.generate_task, {"prompts": prompts.clone(), "knobs": knobs, "label": "x"})  # name only
    assert one != key(stages.generate_task, {"prompts": prompts, "knobs": GenerationKnobs(8, 1, 1, 4), "label": "x"})
    assert one != key(stages.generate_task, {"prompts": prompts.with_columns(pl.lit("b").alias("example_id")),
                                             "knobs": knobs, "label": "x"})


def test_the_stage_function_itself_is_in_the_key():
    from prefect import task

    @task(name="generate")
    def one(x: int) -> int:
        return x

    @task(name="generate")
    def other(x: int) -> int:
        return x + 1

    assert key(one, {"x": 1}) != key(other, {"x": 1})


def test_a_parameter_without_a_content_form_is_refused():
    with pytest.raises(TypeError, match="no content form for a object parameter"):
        key(stages.corpus_alpha_task, {"dataset": object()})
