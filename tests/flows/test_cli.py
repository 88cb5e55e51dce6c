"""The `entcal` command line: user mistakes exit non-zero with one line and no traceback."""
import json
import subprocess
import sys

import pytest


def entcal(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("entcal: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


BAD_CONFIGS = [
    ("num_exampels: 3\n", "num_exampels: unknown key"),
    ("decodings:\n  - {temperature: -1}\n", "temperature must be > 0"),
    ("decodings:\n  - {top_p: 0}\n", "top_p must be"),
    ("models:\n  - {path: /nonexistent/model}\n", "is not a directory"),
    ("datasets:\n  - {name: x, path: /nonexistent/data.jsonl}\n", "does not exist"),
    ("horizon: 0\n", "horizon"),
    ("models: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_config_fails_fast_with_one_line(tmp_path, text, needle):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(text)
    _one_line_error(entcal("run", "--config", str(cfg)), needle)


def test_missing_config_file(tmp_path):
    _one_line_error(entcal("run", "--config", str(tmp_path / "none.yaml")), "no such file")


def test_help_lists_the_commands():
    out = entcal("--help")
    assert out.returncode == 0
    for cmd in ("demo", "run", "stack", "theory", "bench"):
        assert cmd in out.stdout


def test_theory_json():
    out = entcal("theory", "--alpha", "2", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert row["alpha"] == 2 and abs(row["fitted_exponent"] - row["predicted_exponent"]) < 0.05


def test_too_few_usable_texts_fail_once_before_any_service_starts(tmp_path, tiny_model_dir):
    """Counting usable examples needs only the tokenizer: preflight does it before ensure() starts S3 and
    MLflow, so the study fails in seconds, once (no retry), with the error as the last line, and leaves
    no service, MLflow run or Prefect run behind."""
    import yaml

    from tests.conftest import run_cli, tiny_config

    state = tmp_path / "state"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, min_reference_tokens=10_000_000)))
    proc = run_cli("run", "--config", str(cfg), env={"ENTCAL_STATE_DIR": str(state)}, timeout=300)
    _one_line_error(proc, "dataset python-docs: 0 usable examples of 2 requested")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("entcal: error: dataset python-docs:") and "lower num_examples" in last, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Retry" not in out and "retries" not in out.lower() and "Task run" not in out, out[-2000:]
    # nothing started: no stack.json (ports, pids), no service logs, no MLflow database, no S3 data
    assert not (state / "stack.json").exists() and not (state / "logs").exists()
    assert not (state / "mlflow.db").exists() and not (state / "s3").exists()


def test_user_errors_are_never_retried(prefect_harness):
    """Every stage with retries retries a transient error but not a UserError (a config mistake fails once)."""
    from prefect import task

    from flows import stages
    from tasks.config import ConfigError

    with_retries = [t for t in vars(stages).values() if getattr(t, "retries", 0) and hasattr(t, "fn")]
    assert {t.name for t in with_retries} >= {"prepare", "publish-child", "report", "publish-calibration"}
    assert all(t.retry_condition_fn is stages.retry_unless_user_error for t in with_retries)
    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=stages.retry_unless_user_error)
    def fails(kind):
        calls.append(kind)
        raise kind("boom")

    from prefect import flow

    @flow
    def stage(kind):  # a task runs inside a flow, as in a study (a bare call outside one leaks its context)
        return fails(kind, return_state=True)

    for kind, attempts in ((ConfigError, 1), (ConnectionError, 3)):
        assert stage(kind, return_state=True).is_failed()
        assert calls.count(kind) == attempts, (kind, calls)
