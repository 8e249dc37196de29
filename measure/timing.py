"""Device-side timing of chained op calls, the same idea in both frameworks (bench and the tuners).

jax and torch are imported inside the functions that use them, never at module level.

An op is timed as a chain: one call per "layer", each layer with its own distinct weight (or
KV-cache) buffers, the output of one call feeding the next (the model's own data flow), so each
call streams its weights from memory rather than from the L2 cache. The chain's total time over
the number of calls is the time per call.

- jax: one jit holding `lax.fori_loop(0, iters, chain)`; the chain is unrolled over the layers,
  every layer's buffers are separate arguments (a slice of a stacked array fed to a Pallas call
  is copied first), and an optimization_barrier before each call keeps XLA from hoisting
  loop-invariant work out of the loop. On a GPU the time is the device time of the kernels the
  timed runs launched, read from jax's profiler: the host clock around such a loop measured 26-87%
  more than its kernels on the H100 (8B mlp at one token: 132.7 us per call against 104.9 us of
  kernels), launch gaps between the loop's kernels that the model's decode loop does not have
  (its kernel time equals its wall time). The host-clock median is kept in the row beside it.
  Off a GPU: the host clock.
- torch: the chain captured once in a CUDA graph, replayed `iters` times between two CUDA events
  (the graph shrinks the launch gaps as XLA's command buffers do for jax); if capture fails,
  eager launches between the events, and the row says so.
- CPU (--smoke): host clock, no graph.

`iters` is calibrated after warm-up so that one timed repeat lasts about `target_s`; the
repeats give the median and the spread.
"""

from __future__ import annotations

import glob
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class TimingPlan:
    repeats: int = 10
    target_s: float = 0.02  # one timed repeat lasts about this long
    max_iters: int = 200
    warmup: int = 2


def summarize(per_call: list[float]) -> dict:
    """median, extremes and inter-quartile spread of per-call times in seconds."""
    a = np.asarray(per_call, dtype=np.float64)
    med = float(np.median(a))
    p25, p75 = (float(v) for v in np.percentile(a, [25, 75]))
    return dict(median_s=med, min_s=float(a.min()), max_s=float(a.max()), p25_s=p25, p75_s=p75,
                spread_pct=100.0 * (p75 - p25) / med if med > 0 else None, repeats=int(a.size))


def _calibrate(t_one: float, plan: TimingPlan) -> int:
    if t_one <= 0:
        return plan.max_iters
    return int(min(plan.max_iters, max(1, math.ceil(plan.target_s / t_one))))


# ----- jax -------------------------------------------------------------------------------------

def jax_chain(body: Callable, n: int):
    """jit of run(carry, layers, shared, iters): `iters` rounds of body over the n layers."""
    import jax

    @jax.jit
    def run(carry, layers, shared, iters):
        def step(_, c):
            for i in range(n):
                # The barrier ties this call's weights and shared inputs to the chained state, so
                # XLA can neither hoist a loop-invariant part of the op out of the loop (say the
                # plain linear_residual's matmul of a fixed input, or a cache gather) nor merge calls.
                c, la, sh = jax.lax.optimization_barrier((c, layers[i], shared))
                c = body(c, i, la, sh)
            return c

        return jax.lax.fori_loop(0, iters, step, carry)

    return run


def gpu_kernel_events(fn: Callable[[], Any]) -> list[tuple[int, int, str]]:
    """(start_ns, duration_ns, name) of every kernel and copy fn() ran on the GPU, from jax's
    profiler (the device planes' stream lines), in start order."""
    import jax

    d = tempfile.mkdtemp(prefix="jax_trace_")
    try:
        jax.profiler.start_trace(d)
        try:
            fn()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if len(paths) != 1:
            raise RuntimeError(f"jax profiler: expected one .xplane.pb trace under {d}, found {len(paths)}")
        events = []
        for plane in jax.profiler.ProfileData.from_file(paths[0]).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events.extend((ev.start_ns, ev.duration_ns, ev.name) for ev in line.events)
        return sorted(events)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _device_seconds_per_run(events: list[tuple[int, int, str]], runs: int) -> list[float]:
    """Kernel seconds of each of `runs` identical runs: the events in start order, cut into equal
    consecutive groups (every run launches the same kernels); the mean for all when they do not
    divide evenly."""
    if not events:
        raise RuntimeError("jax profiler recorded no GPU kernels for the timed runs")
    if len(events) % runs:
        return [sum(e[1] for e in events) / 1e9 / runs] * runs
    k = len(events) // runs
    return [sum(e[1] for e in events[i * k:(i + 1) * k]) / 1e9 for i in range(runs)]


def time_jax_chain(body: Callable, carry: Any, layers: list, shared: Any, plan: TimingPlan) -> dict:
    """body(carry, i, layer_args, shared) -> carry, chained over `layers` inside one jit.

    Returns summarize(...) plus method, iters and calls.
    """
    import jax
    import jax.numpy as jnp

    n = len(layers)
    run = jax_chain(body, n)

    def once(iters: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run(carry, layers, shared, jnp.int32(iters)))
        return time.perf_counter() - t0

    for _ in range(max(1, plan.warmup)):  # compile, then a warm run
        once(1)
    iters = 1 if plan.max_iters <= 1 else _calibrate(once(1), plan)
    if iters > 1:
        once(iters)
    host = [once(iters) / (iters * n) for _ in range(plan.repeats)]
    backend = jax.default_backend()
    if backend != "gpu":
        return dict(summarize(host), method=f"jit(fori_loop) over distinct per-layer buffers, host clock ({backend})",
                    iters=iters, calls=iters * n)
    events = gpu_kernel_events(lambda: [once(iters) for _ in range(plan.repeats)])
    per_call = [t / (iters * n) for t in _device_seconds_per_run(events, plan.repeats)]
    return dict(summarize(per_call), host_median_s=summarize(host)["median_s"], iters=iters, calls=iters * n,
                method="jit(fori_loop) over distinct per-layer buffers, device time of its kernels (jax profiler)")


# ----- torch -----------------------------------------------------------------------------------

def time_torch_chain(call_layer: Callable[[int], None], n: int, device, plan: TimingPlan,
                     use_graph: bool = True, state: dict | None = None) -> dict:
    """call_layer(i) runs layer i (its closure carries the chained state); chained over n layers.

    state: the dict the closure reads and rebinds; the tensors it holds when the graph is
    captured stay referenced until the timing is done (the graph reads their memory).
    """
    import torch

    def chain():
        for i in range(n):
            call_layer(i)

    if getattr(device, "type", str(device)) != "cuda":
        for _ in range(max(1, plan.warmup)):
            chain()

        def host(iters: int) -> float:
            t0 = time.perf_counter()
            for _ in range(iters):
                chain()
            return time.perf_counter() - t0

        iters = 1 if plan.max_iters <= 1 else _calibrate(host(1), plan)
        per_call = [host(iters) / (iters * n) for _ in range(plan.repeats)]
        return dict(summarize(per_call), method="eager, host clock (cpu)", iters=iters, calls=iters * n)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(max(1, plan.warmup)):
            chain()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    method, replay, graph = "CUDA graph of the chain, CUDA events", chain, None
    pinned = dict(state) if state else None  # noqa: F841 - keeps the captured inputs alive
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain()
            replay = graph.replay
        except Exception as e:  # noqa: BLE001 - fall back to eager launches, said in the row
            torch.cuda.synchronize()
            graph, replay = None, chain
            method = f"eager launches, CUDA events (graph capture failed: {type(e).__name__}: {e})"[:300]
    else:
        method = "eager launches, CUDA events"

    def events(iters: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    events(1)
    iters = 1 if plan.max_iters <= 1 else _calibrate(events(1), plan)
    per_call = [events(iters) / (iters * n) for _ in range(plan.repeats)]
    torch.cuda.synchronize()
    del graph, pinned
    return dict(summarize(per_call), method=method, iters=iters, calls=iters * n)
