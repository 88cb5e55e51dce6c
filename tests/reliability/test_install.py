"""entcal installs as entcal: its folders are entcal.flows / .tasks / .kernels / .storage, and no top-level
name of another distribution is taken. Each check runs a fresh interpreter outside the repository, as a
user's program would (pytest itself has the repository root on its path, where ./kernels is a folder)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast

TAKEN_BEFORE = ("flows", "tasks", "kernels", "storage")  # the names entcal's folders once installed as
HF_KERNELS = Path(sys.prefix) / "hf-kernels"  # Hugging Face's `kernels`, installed there by `make setup`


def python(code: str, cwd: Path, *, path: list[str] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` with ``path`` put first on PYTHONPATH (the test's own entries kept)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_module_imports_as_entcal_and_takes_no_global_name(tmp_path):
    code = f"""
import importlib, pkgutil, sys
names = []
for folder in {TAKEN_BEFORE!r}:  # (an editable install's namespace path cannot be listed: list each folder's)
    package = importlib.import_module("entcal." + folder)
    names += [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
taken = [n for n in {TAKEN_BEFORE!r} if n in sys.modules]
assert not taken, taken
for n in {TAKEN_BEFORE!r}:
    try:
        importlib.import_module(n)
    except ModuleNotFoundError:
        continue
    raise AssertionError(n + " is importable")
assert {{"entcal.flows.study", "entcal.tasks.generate", "entcal.kernels.stats", "entcal.storage.s3"}} <= set(names)
import logging, entcal.tasks.generate as g
assert g.log.name == "entcal.tasks.generate", g.log.name
print(len(names))
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 30


def test_beside_hugging_face_kernels_both_work_in_one_interpreter(tmp_path, tiny_model_dir, stack, prefect_server):
    """Hugging Face's `kernels` (which transformers' hub-kernels integration imports) and entcal in one
    process: `import kernels` is theirs, transformers imports its integration, and a tiny study runs."""
    assert (HF_KERNELS / "kernels" / "__init__.py").is_file(), f"{HF_KERNELS}: run `make setup` (it installs " \
                                                               "Hugging Face's kernels there for this test)"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name="beside-hf-kernels")))
    code = f"""
import sys
import kernels as hf_kernels  # Hugging Face's distribution, on purpose: entcal's is entcal.kernels
assert hf_kernels.__file__.startswith({str(HF_KERNELS)!r}), hf_kernels.__file__
from transformers.integrations import hub_kernels
from transformers.utils import is_kernels_available
assert is_kernels_available()
from entcal.flows.cli import main
rc = main(["run", "--config", {str(config)!r}])
assert rc == 0, rc
assert sys.modules["kernels"] is hf_kernels and "get_kernel" in dir(hf_kernels)
print("ok")
"""
    proc = python(code, tmp_path, path=[str(HF_KERNELS)])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-4000:]
    assert "EntCE" in proc.stdout
