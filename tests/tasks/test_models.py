"""tasks/models.py: hub revisions (a real local Hugging Face cache, offline), models spread with
device_map auto, and the load-time checks a config cannot make (GPUs on the machine that loads)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from polars.testing import assert_frame_equal
import pytest
import torch
from safetensors.torch import load_file

from entcal.tasks.config import ConfigError, DecodingSpec, ModelSpec
from tests.conftest import build_tiny_model, random_prompts, start_python

EMBED = "model.embed_tokens.weight"


def hub_cache(cache: Path, repo: str, branches: dict[str, Path]) -> dict[str, str]:
    """A Hugging Face hub cache as huggingface_hub lays it out: ``models--org--name/blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` (links to the blobs) and ``refs/<branch>`` (the branch's commit), one
    snapshot per branch holding that model directory's files. Returns {branch: commit}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commits = {}
    for branch, src in branches.items():
        commit = hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / branch).write_text(commit)
        commits[branch] = commit
    return commits


# Run in a fresh process: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported.
LOAD_REVISIONS = """
import hashlib, json, sys
from entcal.tasks.config import ConfigError, ModelSpec
from entcal.tasks.models import load_model, load_tokenizer, max_positions

out = {}
for rev in (None, "step1000", sys.argv[1]):
    spec = ModelSpec(hf="org/name", revision=rev)
    lm = load_model(spec)
    emb = lm.model.get_input_embeddings().weight.detach().contiguous()
    out[str(rev)] = {"embed_sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest(),
                     "layers": lm.model.config.num_hidden_layers, "vocab": len(load_tokenizer(spec)),
                     "max_positions": max_positions(spec)}
missing = ModelSpec(hf="org/name", revision="step9999")
for what, load in (("model", load_model), ("tokenizer", load_tokenizer), ("config", max_positions)):
    try:
        load(missing)
        out["error_" + what] = None
    except ConfigError as err:
        out["error_" + what] = str(err)
print(json.dumps(out))
"""


def test_revision_loads_that_branch_of_a_hub_model_and_a_missing_one_is_one_line(tmp_path):
    main = build_tiny_model(tmp_path / "main", seed=0)
    step = build_tiny_model(tmp_path / "step1000", seed=1, vocab=320, layers=3)
    commits = hub_cache(tmp_path / "hub", "org/name", {"main": main, "step1000": step})
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = start_python("-c", LOAD_REVISIONS, commits["step1000"], env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    got = json.loads(stdout.strip().splitlines()[-1])

    def weights(d: Path) -> str:
        return hashlib.sha256(load_file(d / "model.safetensors")[EMBED].contiguous().numpy().tobytes()).hexdigest()

    assert weights(main) != weights(step)
    want_main = {"embed_sha256": weights(main), "layers": 2, "vocab": 384, "max_positions": 1024}
    want_step = {"embed_sha256": weights(step), "layers": 3, "vocab": 320, "max_positions": 1024}
    assert got["None"] == want_main  # no revision: refs/main
    assert got["step1000"] == want_step  # weights, config and tokenizer all from the branch
    assert got[commits["step1000"]] == want_step  # a commit id names the same snapshot
    for what, verb in (("model", "cannot load it"), ("tokenizer", "cannot load its tokenizer"),
                       ("config", "cannot read its config")):
        msg = got["error_" + what]
        assert msg is not None and "\n" not in msg, msg
        assert msg.startswith(f"model name: {verb} from org/name at revision 'step9999' ("), msg
        assert msg.endswith("give a branch, tag or commit of org/name (offline: one in the local Hugging Face "
                            "cache)"), msg


@pytest.fixture(scope="module")
def spread_lm(tiny_model_dir):
    from entcal.tasks.models import load_model

    return load_model(ModelSpec(path=str(tiny_model_dir), name="tiny", device_map="auto"))


def test_device_map_auto_on_cpu_stays_on_the_cpu(spread_lm, tiny_lm):
    from entcal.tasks.models import input_device

    assert spread_lm.spread and not tiny_lm.spread
    assert spread_lm.model is not tiny_lm.model  # two cache entries: the specs differ
    assert spread_lm.device == input_device(spread_lm.model) == torch.device("cpu")
    assert {p.device.type for p in spread_lm.model.parameters()} == {"cpu"}
    assert not spread_lm.model.training
    assert spread_lm.params == tiny_lm.params and spread_lm.eos_ids == tiny_lm.eos_ids


def test_device_map_auto_generates_and_scores_what_the_plain_load_does(tiny_lm, spread_lm):
    from entcal.tasks.contracts import GenerationKnobs, ScoringKnobs
    from entcal.tasks.generate import generate
    from entcal.tasks.score import score

    assert (spread_lm.pad_id, spread_lm.compiled) == (tiny_lm.pad_id, tiny_lm.compiled) == (0, False)
    prompts = random_prompts(tiny_lm, 4, 10, 14, seed=3)
    decodings = [DecodingSpec(), DecodingSpec(temperature=0.8, top_p=0.9)]
    knobs = GenerationKnobs(max_new_tokens=12, samples_per_prompt=2, seed=5, batch_size=3)
    for dec in decodings:
        plain, spread_gen = generate(tiny_lm, prompts, dec, knobs), generate(spread_lm, prompts, dec, knobs)
        assert plain.height == 8 and plain["step_entropy"].list.len().min() > 0
        assert_frame_equal(spread_gen, plain, check_exact=True)
    knobs = ScoringKnobs(max_tokens=12, epsilon=1e-4, batch_size=3)
    plain_ref, spread_ref = score(tiny_lm, prompts, decodings, knobs), score(spread_lm, prompts, decodings, knobs)
    assert plain_ref.height == 8
    assert_frame_equal(spread_ref, plain_ref, check_exact=True)


def test_pick_compile_is_off_for_a_spread_model():
    from entcal.tasks.models import pick_compile

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pick_compile("auto", cuda) and pick_compile("on", cpu) and not pick_compile("auto", cpu)
    assert not pick_compile("auto", cuda, spread=True) and not pick_compile("on", cuda, spread=True)


def test_input_device_is_the_execution_device_of_offloaded_embeddings(tiny_model_dir):
    """accelerate's offload leaves the weights on the meta device and moves them in for each forward:
    the first parameter's device is then not where inputs go; the embeddings' hook says where."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    from entcal.tasks.models import input_device

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert input_device(model) == torch.device("cpu")  # no hook: the embeddings' own device
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5]], device=input_device(model))).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs tensor_parallel_size 2 needs")
def test_tensor_parallel_beyond_this_machines_gpus_is_a_load_time_config_error(tiny_model_dir):
    from entcal.tasks.models import load_model

    spec = ModelSpec(path=str(tiny_model_dir), name="tiny-tp2", device="auto", tensor_parallel_size=2)
    assert spec.spread  # the config validator lets it through: the flow's machine may not be the worker's
    with pytest.raises(ConfigError) as err:
        load_model(spec)
    n = torch.cuda.device_count()
    assert str(err.value) == (f"model tiny-tp2: tensor_parallel_size 2 needs 2 GPUs, this machine has {n} "
                              "(set tensor_parallel_size: 1 or run it where the GPUs are)")
