"""The `entcal` command line: user mistakes exit 2 with one line and no traceback."""
import json
import re

import pytest
import yaml

from tests.cases import BAD_CONFIGS
from tests.conftest import assert_one_line_error, run_cli, tiny_config

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast


# Through the CLI: every case the config loader catches (a second each), and one case per later step of the
# preflight (a dataset file, a model that does not load, texts that are not text; too few examples: the test
# below). These take the same path as one of those, after a tokenizer loads (~8 s each in a fresh process);
# tests/reliability/test_bad_inputs.py checks their messages through the same functions in-process.
SAME_PATH = {"model-path-missing", "gguf-missing", "dataset-dir-with-binary", "too-few-examples"}
CLI_CASES = [c for c in BAD_CONFIGS if c.id not in SAME_PATH]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_config_fails_fast_with_one_line(tmp_path, tiny_model_dir, case):
    path = case.write(tmp_path, tiny_model_dir)
    assert_one_line_error(run_cli("run", "--config", str(path)), "entcal: error: " + case.expected_in(tmp_path))


def test_help_lists_the_commands():
    out = run_cli("--help", check=True)
    (commands,) = re.findall(r"^  \{([a-z,]+)\}$", out.stdout, flags=re.M)  # argparse's list of subcommands
    assert set(commands.split(",")) == {"demo", "run", "stack", "theory", "serve", "deploy", "bench"}, out.stdout


def test_theory_json():
    out = run_cli("theory", "--alpha", "2", "--json", check=True)
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert row["alpha"] == 2 and abs(row["fitted_exponent"] - row["predicted_exponent"]) < 0.05


def test_too_few_usable_texts_fail_once_before_any_service_starts(tmp_path, tiny_model_dir):
    """Counting usable examples needs only the tokenizer: preflight does it before ensure() starts S3 and
    MLflow, so the study fails in seconds, once (no retry), with the error as the last line, and leaves
    no service, MLflow run or Prefect run behind."""
    state = tmp_path / "state"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, min_reference_tokens=10_000_000)))
    proc = run_cli("run", "--config", str(cfg), env={"ENTCAL_STATE_DIR": str(state)}, timeout=300)
    line = assert_one_line_error(proc, "entcal: error: dataset python-docs: 0 usable examples of 2 requested")
    assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    assert "shorter than min_reference_tokens=10000000" in line and "lower num_examples" in line, line
    out = proc.stdout + proc.stderr
    assert "Retry" not in out and "retries" not in out.lower() and "Task run" not in out, out[-2000:]
    # nothing started: no stack.json (ports, pids), no service logs, no MLflow database, no S3 data
    assert not (state / "stack.json").exists() and not (state / "logs").exists()
    assert not (state / "mlflow.db").exists() and not (state / "s3").exists()


def test_user_errors_are_never_retried(prefect_harness):
    """Every stage with retries retries a transient error but not a UserError (a config mistake fails once)."""
    from prefect import task

    from entcal.flows import stages
    from entcal.tasks.config import ConfigError

    tasks = [t for t in vars(stages).values() if hasattr(t, "fn") and hasattr(t, "retries")]
    assert {t.name for t in tasks} == set(stages.STAGES)
    assert {t.name for t in tasks if t.retries} == {"prepare"}  # reads files and the hub: worth retrying
    assert all(t.retry_condition_fn is stages.retry_unless_user_error for t in tasks)
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
