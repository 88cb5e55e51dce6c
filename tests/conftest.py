"""Shared fixtures: tiny real models, a real local stack (rclone S3 + MLflow), the Prefect harness.

Nothing is mocked: the model is a randomly initialised Llama with a BPE tokenizer trained here,
saved to disk and loaded back through the same loaders users hit.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny models: thread start-up costs more than it buys on a shared 2-core machine (subprocesses too).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Triton's interpreter must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="entcal-tests-"))
os.environ["ENTCAL_STATE_DIR"] = str(_SESSION_DIR / "state")
os.environ["ENTCAL_LOCK_DIR"] = str(_SESSION_DIR / "locks")  # this session's studies take turns on the device
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(_SESSION_DIR / "state" / "results"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # stages called outside a flow in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("ENTCAL_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "ENTCAL_BUCKET"):
    os.environ.pop(var, None)

REPO = Path(__file__).resolve().parents[1]  # the repository root: subprocesses run here

# The fast tier (`make test-fast`: -m "not services and not slow") leaves out every test that starts a
# service or an entcal process: those using these fixtures, and the modules that mark themselves
# `pytestmark = pytest.mark.services` (they start `entcal` or another server in a subprocess).
SERVICE_FIXTURES = {"stack", "prefect_harness", "prefect_server", "browser", "page", "ray_cluster",
                    "gpu_ray_cluster"}


# The files that take a minute or more (measured on 2 cores), longest first. `make test` hands whole files to
# its 2 workers in the order below (--no-loadscope-reorder): these first, then the others with the most tests
# first (xdist's own order), so no long file starts last while the other worker runs out of work.
LONG_FILES = ("tests/reliability/test_faults.py", "tests/reliability/test_reproducible.py", "tests/flows/test_ray.py",
              "tests/reliability/test_kill.py", "tests/flows/test_schedule.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
    tests = collections.Counter(item.path for item in items)
    long = {REPO / f: i for i, f in enumerate(LONG_FILES)}
    # stable: each file's tests stay together, in their order
    items.sort(key=lambda item: (long.get(item.path, len(long)), -tests[item.path]))


VOCAB = 384


def build_tiny_model(path: Path, *, vocab: int = VOCAB, layers: int = 2, seed: int = 0, hidden: int = 48,
                     heads: int = 4) -> Path:
    """A random Llama + a byte-level BPE tokenizer trained on the Python manual, saved to ``path``.
    vLLM's CPU attention needs a head size of 32 or more (hidden 64, heads 2)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the default init, so decodings differ visibly
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(_SESSION_DIR / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir):
    from entcal.tasks.config import ModelSpec

    return ModelSpec(path=str(tiny_model_dir), name="tiny")


@pytest.fixture(scope="session")
def tiny_lm(tiny_spec):
    from entcal.tasks.models import load_model

    return load_model(tiny_spec)


@pytest.fixture(scope="session")
def stack():
    """A real local stack: rclone serve s3 + MLflow server (SQLite, artifacts proxied to S3)."""
    from entcal.storage.settings import from_env
    from entcal.storage.stack import Stack

    st = Stack(Path(os.environ["ENTCAL_STATE_DIR"]))
    st.up(("s3", "mlflow"))
    from entcal.storage import s3

    s3.ensure_bucket(from_env())
    yield from_env()
    st.down()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(stack):
    """A real Prefect server in the stack (stopped with it); CLI subprocesses use it via stack.json."""
    from entcal.storage.stack import Stack

    Stack().up(("prefect",))
    return Stack().state()["prefect"]


def s3_keys(settings, prefix: str = "") -> list[str]:
    """Every object key under ``prefix`` in the settings' bucket."""
    from entcal.storage import s3

    pages = s3.client(settings).get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def wait_for_s3(settings, timeout_s: float = 30.0) -> None:
    """Poll the S3 endpoint until it answers (any reply, even an error, means it is up)."""
    import time

    from botocore.exceptions import BotoCoreError, ClientError

    from entcal.storage import s3

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s3.client(settings, attempts=1).list_buckets()
            return
        except ClientError:
            return
        except BotoCoreError:
            assert time.monotonic() < deadline, f"S3 at {settings.s3_endpoint} did not come up in {timeout_s:.0f} s"
            time.sleep(0.3)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """`python -m entcal.flows.cli ARGS` run to its end in a subprocess from the repository root, with the test
    environment (and ``env`` on top); stdout and stderr captured as text. ``check``: assert it exited 0."""
    proc = subprocess.run([sys.executable, "-m", "entcal.flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start_python(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """`python ARGS` started (not waited for) from the repository root with the test environment (and
    ``env`` on top); ``popen`` is passed to Popen (stdout, stderr, text, start_new_session)."""
    return subprocess.Popen([sys.executable, *args], env={**os.environ, **(env or {})}, cwd=REPO, **popen)


def start_cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """`python -m entcal.flows.cli ARGS` started (not waited for), as :func:`start_python` starts it."""
    return start_python("-m", "entcal.flows.cli", *args, env=env, **popen)


def assert_one_line_error(proc, expected: str) -> str:
    """A user mistake as the CLI reports it: exit 2, no traceback, exactly one ``entcal: error:`` line
    on stderr, and that line contains ``expected``. Returns the line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("entcal: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


def tiny_config(model_dir: Path, **over) -> dict:
    cfg = {"name": "tiny", "models": [{"path": str(model_dir), "name": "tiny"}], "datasets": [{"name": "python-docs"}],
           "decodings": [{"temperature": 1.0}], "num_examples": 2, "prompt_tokens": 8, "max_new_tokens": 8,
           "min_reference_tokens": 8, "horizon": 8, "bootstrap": 20}
    cfg.update(over)
    return cfg


def random_prompts(lm, n: int, prompt_len: int, reference_len: int, seed: int):
    """A prompts table of random token ids (prompt i is ``prompt_len - i`` long: rows of unequal length)."""
    import polars as pl

    g = torch.Generator().manual_seed(seed)
    V = lm.model.config.vocab_size
    return pl.DataFrame({
        "example_id": [f"e{i}" for i in range(n)], "dataset": ["d"] * n,
        "prompt_ids": [torch.randint(2, V, (prompt_len - i,), generator=g).tolist() for i in range(n)],
        "reference_ids": [torch.randint(2, V, (reference_len,), generator=g).tolist() for _ in range(n)],
    }, schema_overrides={"prompt_ids": pl.List(pl.Int32), "reference_ids": pl.List(pl.Int32)})
