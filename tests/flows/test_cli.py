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
    ("decodings:\n  - {top_p: 0}\n", "top_p must be in (0, 1]"),
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
