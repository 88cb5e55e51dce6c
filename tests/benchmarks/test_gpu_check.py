"""`make gpu-check`'s CPU part, as CI runs it: benchmarks/gpu_check.sh end to end on a machine without
CUDA (the GPU tests skip and say why, both benchmarks write their JSON line, the vLLM support check says
why it skipped), on a tiny model."""
import json
import os
import subprocess

import pytest

from tests.benchmarks.test_bench_generate import check_json_line
from tests.conftest import REPO, build_tiny_model

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU part: on a GPU run make gpu-check")
def test_gpu_check_runs_its_cpu_part_and_writes_one_json_line_per_benchmark(tmp_path):
    model = build_tiny_model(tmp_path / "tiny-h32", hidden=64, heads=2)  # vLLM's CPU attention: head size 32
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ENTCAL_GPU_CHECK_MODEL_PATH": str(model)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device: none (CPU only)" in proc.stdout
    assert "gpu-check: SKIPPED" in proc.stdout  # the GPU tests' skip reasons are listed
    assert "0 step(s) failed" in proc.stdout
    assert "gpu-check: vllm-support skipped: no CUDA" in proc.stdout and not (out / "vllm_support.json").exists()
    for name in ("bench_kernels.json", "bench_generate.json"):
        lines = (out / name).read_text().splitlines()
        assert len(lines) == 1, (name, lines)
        json.loads(lines[0])
    # every variant of the generation benchmark, vLLM's included (gpu_check.sh on CPU: batch 8, 32 tokens)
    check_json_line(json.loads((out / "bench_generate.json").read_text()), rows=8, new_tokens=32, model=model)
