"""Shared test setup: repo root on sys.path, CPU interpreter modes, the gpu marker, checkpoints."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _has_cuda() -> bool:
    # nvidia-smi presence is a cheap proxy that imports neither framework.
    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


HAS_GPU = _has_cuda()
# The user's cache directory holds tuned tile tables and jax's compiled programs: tests read and
# write a fresh one of their own (subprocesses inherit it).
if "QWEN3_TESTS_KEEP_CACHE_HOME" not in os.environ:
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="qwen3-tests-cache-")
if not HAS_GPU:
    # Triton kernels run in the interpreter on CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    # jax and torch share the GPU in one test process: jax must not take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

GPU_REASON = "needs a CUDA GPU (runs on the H100 at full shapes; CPU runs the interpreter-mode twins)"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
