"""Shared test setup: repo root on sys.path, CPU interpreter modes, the gpu marker, the GPU suite
in parts (--gpu-part, --record-durations: tests/gpu_durations.py), pytest-timeout optional."""

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

import gpu_durations  # noqa: E402

GPU_REASON = "needs a CUDA GPU (runs on the H100 at full shapes; CPU runs the interpreter-mode twins)"


def pytest_addoption(parser, pluginmanager):
    group = parser.getgroup("qwen3", "qwen3-fused suite")
    group.addoption("--gpu-part", metavar="I/N", help="run only the I-th of N parts (1-based) of the selected "
                    "tests, split by the seconds in tests/gpu_durations.json; give each part the same selection")
    group.addoption("--record-durations", metavar="PATH", help="append each test's id and seconds (setup and "
                    "call) to PATH as a JSON line as it ends (python -m tests.gpu_durations merge reads them)")
    if not pluginmanager.hasplugin("timeout"):
        # without pytest-timeout (a GPU machine's own environment) its settings are known and unused
        parser.addini("timeout", "per-test limit in seconds (pytest-timeout; not installed, unused)")
        parser.addini("timeout_method", "how pytest-timeout stops a test (not installed, unused)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): this test's limit (pytest-timeout; unused without it)")
    try:
        if config.getoption("gpu_part") is not None:
            gpu_durations.parse_part(config.getoption("gpu_part"))
    except gpu_durations.DurationsError as e:
        raise pytest.UsageError(str(e)) from None
    path = config.getoption("record_durations")
    if path is not None:
        try:
            Path(path).open("a").close()
        except OSError as e:
            raise pytest.UsageError(f"--record-durations={path}: cannot append to it ({e.strerror})") from None
        config.pluginmanager.register(_DurationRecorder(Path(path)), "record-durations")


class _DurationRecorder:
    """--record-durations: one JSON line per test, written as the test ends (a run killed later
    keeps it)."""

    def __init__(self, path: Path):
        self.path = path
        self.setup_s: dict[str, float] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "setup":
            self.setup_s[report.nodeid] = report.duration
            if report.passed:
                return  # the call follows
        elif report.when != "call":
            return
        seconds = self.setup_s.pop(report.nodeid, 0.0) + (report.duration if report.when == "call" else 0.0)
        with self.path.open("a") as f:
            f.write(gpu_durations.record_line(report.nodeid, seconds, report.outcome))


@pytest.hookimpl(trylast=True)  # after -m / -k deselect: the parts split what the run selected
def pytest_collection_modifyitems(config, items):
    if not HAS_GPU:
        skip = pytest.mark.skip(reason=GPU_REASON)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if config.getoption("gpu_part") is not None:
        i, n = gpu_durations.parse_part(config.getoption("gpu_part"))
        try:
            durations = gpu_durations.load()
        except gpu_durations.DurationsError as e:
            raise pytest.UsageError(str(e)) from None
        keep = set(gpu_durations.split([item.nodeid for item in items], durations, n)[i - 1])
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in keep])
        items[:] = [item for item in items if item.nodeid in keep]


@pytest.fixture
def fresh_tiles(tmp_path, monkeypatch):
    """No user tile table of the machine running the tests; common.tiles' lookup cache cleared before
    and after (`pytestmark = pytest.mark.usefixtures("fresh_tiles")` in a module that looks up)."""
    from common import tiles

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiles.clear_cache()
    yield
    tiles.clear_cache()
