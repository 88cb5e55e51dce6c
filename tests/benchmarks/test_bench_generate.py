"""The generation benchmark runs end to end on a tiny model and its JSON line says what it measured.
Timings are not asserted (they are the benchmark's output, not a test); token counts and ratios are."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_generate_json_line(tiny_model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--model-path",
                           str(tiny_model_dir), "--batch", "4", "--new-tokens", "8", "--prompt-tokens", "8",
                           "--repeats", "1", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["variants"]) == {"entcal", "entcal_nostats", "entcal_dynamic", "hf_generate", "forward_only"}
    assert all(v["tokens"] == 4 * 8 for v in result["variants"].values())
    # the stand-in without statistics and the growing cache sample the very same tokens
    assert result["nostats_same_tokens"] is True and result["dynamic_same_tokens"] is True
    for key in ("speedup_vs_hf_generate", "stats_overhead", "static_cache_speedup"):
        assert isinstance(result[key], float), key
    assert result["compiled"] is False and result["device"] == "cpu"
