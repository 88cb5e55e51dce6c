"""The numbers a newcomer reproduces: `entcal demo --quick` (4 prompts per corpus, 24 new tokens: the demo's
code and model on a quarter of its tokens), and beside it at the same time the same demo with another batch
size, print the same EntCE table to the last digit. Each is the other's CPU load: they
run at once on this machine's cores (the second takes its device locks from another folder, as a study on
another machine would, so neither waits for the other). A row's draws are a function of its seed, step and
token (Gumbel-max with hashed noise: kernels/sampling.py), not of which rows share its batch or of how busy
the machine is. Real CLI, real bundled SmolLM2-135M, the test stack's S3 and MLflow."""
import re
import subprocess

import pytest

from tests.conftest import start_cli

pytestmark = [pytest.mark.services, pytest.mark.slow]
SMALLER = ("--num-examples", "4", "--max-new-tokens", "24")  # batches of 4 rows, against 3 + 1 beside it


def _table(stdout: str) -> list[str]:
    """The printed EntCE rows (model, dataset, decoding, EntCE [CI], H̄, L̄), as printed."""
    rows = [line.strip() for line in stdout.splitlines() if re.search(r"EntCE [+-]\d\.\d{3} \[", line)]
    assert len(rows) == 6, stdout[-3000:]  # 2 corpora × 3 temperatures
    return rows


def test_demo_quick_prints_the_same_table_beside_another_demo_with_another_batch_size(stack, prefect_server,
                                                                                       tmp_path):
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = start_cli("demo", "--quick", *SMALLER, "--out", str(tmp_path / "a"), **pipes)
    second = start_cli("demo", "--quick", *SMALLER, "--batch-size", "3", "--out", str(tmp_path / "b"),
                       env={"ENTCAL_LOCK_DIR": str(tmp_path / "other-locks")}, **pipes)
    try:
        (out_a, err_a), (out_b, err_b) = first.communicate(timeout=1200), second.communicate(timeout=1200)
    finally:
        first.kill()
        second.kill()
    assert first.returncode == 0, err_a[-4000:]
    assert second.returncode == 0, err_b[-4000:]
    assert not re.search(r"waiting for \S+ on this machine", err_a + err_b)  # side by side: neither waited
    for out in (out_a, out_b):  # each sampled and scored its own (6 generations, 2 scorings: keyed by batch size)
        (ran,) = re.findall(r"; ran: (\d+)", out) or ["all"]  # the line is left out when nothing came from cache
        assert ran == "all" or int(ran) >= 8, out[-2000:]
    assert _table(out_b) == _table(out_a)
