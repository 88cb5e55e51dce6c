"""The numbers a newcomer reproduces: `entcal demo --quick` twice, the second with another batch size and
under another process's CPU load, prints the same EntCE table to the last digit. A row's draws are a
function of its seed, step and token (Gumbel-max with hashed noise: kernels/sampling.py), not of which rows
share its batch; the thread count is the machine's either way. Real CLI, real bundled SmolLM2-135M, the
test stack's S3 and MLflow."""
import multiprocessing
import re

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _burn(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(10_000))


def _table(stdout: str) -> list[str]:
    """The printed EntCE rows (model, dataset, decoding, EntCE [CI], H̄, L̄), as printed."""
    rows = [line.strip() for line in stdout.splitlines() if re.search(r"EntCE [+-]\d\.\d{3} \[", line)]
    assert len(rows) == 6, stdout[-3000:]  # 2 corpora × 3 temperatures
    return rows


def test_demo_quick_prints_the_same_table_under_load_and_another_batch_size(stack, prefect_server, tmp_path):
    first = run_cli("demo", "--quick", "--out", str(tmp_path / "a"), check=True, timeout=1200)
    load = [multiprocessing.Process(target=_burn, args=(900,), daemon=True)]  # another process keeps a core busy
    for p in load:
        p.start()
    try:
        second = run_cli("demo", "--quick", "--batch-size", "3", "--out", str(tmp_path / "b"), check=True,
                         timeout=1500)
    finally:
        for p in load:
            p.terminate()
    assert "Served from cache" not in second.stdout or "ran: 0" not in second.stdout  # it sampled again
    assert _table(second.stdout) == _table(first.stdout)
