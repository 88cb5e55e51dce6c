"""Kernel tests run on CPU through Triton's interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here (this
conftest is imported before the test modules of tests/kernels) and, should kernels.* already be
imported without it, those modules are reloaded so their kernels become interpreted.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parents[1]), str(HERE)):  # repo root (kernels.*) and kernel_cases.py
    if p not in sys.path:
        sys.path.insert(0, p)

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("entcal.kernels.stats", "entcal.kernels.truncation", "entcal.kernels.fused_head",
                 "entcal.kernels.sampling_triton"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])
