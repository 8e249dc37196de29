"""The run's environment and the two ceilings every figure is held against.

`collect(...)` records the GPU, driver, library versions, date and git commit.
`measure_ceilings(...)` measures, in the same run, a large device-to-device copy (bytes read +
bytes written over the time) and a large bf16 matmul (2 m n k over the time), in each framework
that can run here; the ceiling used for the percentages is the best framework's figure.
Every measurement is guarded: a failure is recorded as a string and the run goes on.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt",
                 "flax", "torch", "triton", "transformers", "numpy", "safetensors", "matplotlib")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def has_gpu() -> tuple[bool, str]:
    """(True, name) when torch or jax sees a CUDA GPU; (False, why not) otherwise."""
    why = []
    try:
        import torch

        if torch.cuda.is_available():
            return True, torch.cuda.get_device_name(0)
        why.append("torch.cuda.is_available() is False")
    except Exception as e:  # noqa: BLE001 - report whatever stops the probe
        why.append(f"torch: {e!r}")
    try:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if gpus:
            return True, gpus[0].device_kind
        why.append(f"jax's default backend is {jax.default_backend()}")
    except Exception as e:  # noqa: BLE001
        why.append(f"jax: {e!r}")
    return False, "; ".join(why)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the default results folder)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def git_commit(override: str | None = None) -> str:
    if override:
        return override
    sha = _run(["git", "rev-parse", "HEAD"], cwd=REPO)
    if not sha:
        return "unknown (no git checkout here; pass --commit)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def gpu_info(smoke: bool) -> dict:
    """GPU name, driver, memory and CUDA versions as far as nvidia-smi / torch / jax tell."""
    info: dict = {}
    if smoke:
        info["gpu"] = "none (--smoke: CPU, interpreter mode)"
        info["cpu"] = platform.processor() or platform.machine()
        return info
    if shutil.which("nvidia-smi"):
        line = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                     "--format=csv,noheader"])
        if line:
            parts = [p.strip() for p in line.splitlines()[0].split(",")]
            info.update(zip(("gpu", "driver", "memory", "max_sm_clock"), parts))
    try:
        import torch

        if torch.cuda.is_available():
            info.setdefault("gpu", torch.cuda.get_device_name(0))
            info["torch_cuda"] = torch.version.cuda
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    try:
        import jax

        info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as e:  # noqa: BLE001
        info["jax_error"] = repr(e)
    return info


def collect(*, smoke: bool, commit: str | None = None, argv: list[str] | None = None) -> dict:
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), commit=git_commit(commit), versions=versions(), **gpu_info(smoke),
        command="python -m bench " + " ".join(argv or sys.argv[1:]), smoke=smoke,
        env_flags={k: v for k, v in os.environ.items()
                   if k.startswith(("XLA_", "JAX_", "TRITON_", "CUDA_VISIBLE", "TORCH_"))},
    )


# ----- ceilings ------------------------------------------------------------------------------------

def _median_rate(times: list[float], work: float) -> float:
    return work / float(np.median(times))


def _torch_ceilings(copy_bytes: int, mm: int, repeats: int) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"device": dev}
    n = copy_bytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=dev)  # random, never zeros
    dst = torch.empty_like(src)

    def timed(fn, reps):
        if dev == "cuda":
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            return ts
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return ts

    out["copy_GBps"] = _median_rate(timed(lambda: dst.copy_(src), repeats), 2 * src.numel() * 2) / 1e9
    del src, dst
    a = torch.randn(mm, mm, dtype=torch.bfloat16, device=dev)
    b = torch.randn(mm, mm, dtype=torch.bfloat16, device=dev)
    out["matmul_TFLOPs"] = _median_rate(timed(lambda: torch.matmul(a, b), repeats), 2 * mm ** 3) / 1e12
    out["copy_bytes"], out["matmul_n"] = copy_bytes, mm
    del a, b
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def _jax_ceilings(copy_bytes: int, mm: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    out: dict = {"device": jax.default_backend()}
    key = jax.random.key(0)
    src = jax.random.normal(key, (copy_bytes // 2,), jnp.bfloat16)
    neg = jax.jit(lambda x: -x)  # one read and one write of every element; cannot be folded away

    def timed(fn, *args, burst: int = 5):
        fn(*args).block_until_ready()
        ts = []
        for _ in range(repeats):  # a burst of async dispatches hides the per-call host overhead
            t0 = time.perf_counter()
            for _ in range(burst):
                r = fn(*args)
            r.block_until_ready()
            ts.append((time.perf_counter() - t0) / burst)
        return ts

    out["copy_GBps"] = _median_rate(timed(neg, src), 2 * copy_bytes) / 1e9
    del src
    a = jax.random.normal(key, (mm, mm), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (mm, mm), jnp.bfloat16)
    out["matmul_TFLOPs"] = _median_rate(timed(jax.jit(jnp.matmul), a, b), 2 * mm ** 3) / 1e12
    out["copy_bytes"], out["matmul_n"] = copy_bytes, mm
    del a, b
    return out


def measure_ceilings(*, smoke: bool, quick: bool, frameworks=("torch", "jax"), log=print) -> dict:
    """{'copy_GBps', 'matmul_TFLOPs', 'by_framework': {...}}; the best framework's figures are used."""
    copy_bytes = (64 << 20) if smoke else (2 << 30)  # 2 GiB per buffer: far past any cache
    mm = 256 if smoke else 8192
    repeats = 3 if smoke else (10 if quick else 30)
    by = {}
    for fw in frameworks:
        log(f"ceilings: {fw} copy of {copy_bytes >> 20} MiB and {mm}^3 bf16 matmul")
        try:
            by[fw] = (_torch_ceilings if fw == "torch" else _jax_ceilings)(copy_bytes, mm, repeats)
        except Exception as e:  # noqa: BLE001 - recorded, the other framework may still measure
            by[fw] = {"error": f"{type(e).__name__}: {e}"}
    return combine_ceilings(by)


def combine_ceilings(by: dict[str, dict]) -> dict:
    """The ceilings document from each framework's figures (or error): the best figure is used."""
    ok = [v for v in by.values() if "copy_GBps" in v]
    res = {"by_framework": by}
    res["copy_GBps"] = max((v["copy_GBps"] for v in ok), default=None)
    res["matmul_TFLOPs"] = max((v["matmul_TFLOPs"] for v in ok), default=None)
    return res
