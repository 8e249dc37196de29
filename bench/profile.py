"""Where a decode step spends its time on the GPU, in either twin: tok/s and a per-kernel breakdown.

A random-weight model of each preset made on the device (`load_random`: no checkpoint), a prompt of
`--prompt-len` tokens, `--steps` greedy tokens (`--sampling T,K,P`: sampled, as `bench decode`'s;
best of 3 after a warm-up), then one more decode
under the framework's profiler: device time per step by kernel (XLA's numbered fusions grouped by
name), the GPU's idle time before each kernel group's launches (from the previous kernel's end to
this one's start; kernels that overlap under programmatic dependent launch count none), and the
sum against the wall time per step (the difference is launch gaps). jax times its compiled decode
loop alone (jax_impl.decode_loop, prefill excluded); torch its Runner's decode (CUDA-graph
replays; its profile holds the prefill too). Kernel groups whose names say what they read (the
twins' projection and attention kernels: ROLES) also get the bytes one step must read through
them (weights once; K and V rows at the decode's mean context) and the GB/s that makes. `--trace
DIR` keeps every kernel of each profile (start and duration in ns, name) as JSON for a timeline.

    python -m bench.profile --framework jax --presets Qwen3-0.6B,Qwen3-8B --fused plain,auto --batch 1
"""

from __future__ import annotations

import collections
import json
import os
import re
import time

from common import argparsing, buckets
from common.config import PRESETS, shrink

FUSED = {"plain": False, "auto": "auto", "on": True}


def _group(name: str) -> str:
    """Collapse numbered kernel names (fusion_12, loop_add_fusion_3) into one group."""
    return re.sub(r"[._]\d+(?=$|[._])", "", name)[:60]


class JaxProbe:
    """jax_impl's compiled programs over random weights: decode_s() and profile() of one loop."""

    def __init__(self, cfg, fused: str, batch: int, prompt_len: int, steps: int, sampling: dict | None = None):
        import jax
        import jax.numpy as jnp

        from jax_impl import decode_loop, load_random
        from jax_impl.model import init_caches

        self.jax, self.jnp, self.init_caches = jax, jnp, init_caches
        self.runner = load_random(cfg, fused=FUSED[fused])
        self.cfg, self.batch, self.steps = cfg, batch, steps
        self.rows = buckets.cache_bucket(prompt_len + steps + 1, cfg.max_position_embeddings)
        self.ids = jax.random.randint(jax.random.key(1), (batch, buckets.prompt_bucket(prompt_len, 1 << 20)), 0,
                                      cfg.vocab_size, jnp.int32)
        self.lengths = jnp.full((batch,), prompt_len, jnp.int32)
        if sampling:  # as jax_impl.runner sets them for a sampled generate
            from jax_impl.sampling import k_cap_for

            self.statics = dict(greedy=False, k_cap=k_cap_for(sampling["top_k"], cfg.vocab_size),
                                use_top_p=sampling["top_p"] < 1.0)
            self.sample = (jnp.float32(sampling["temperature"]), jnp.float32(sampling["top_p"]),
                           jnp.int32(sampling["top_k"]))
        else:
            self.statics = dict(greedy=True, k_cap=0, use_top_p=False)
            self.sample = (jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
        self.eos = jnp.asarray([-1] * 8, jnp.int32)
        self.calls = decode_loop.plan_calls(1, steps + 1)

    def _decode(self, ds):
        jnp, p = self.jnp, self.runner.programs
        for stop, sync in self.calls:
            ds = p.decode(self.runner.state, ds, jnp.int32(stop), *self.sample, self.eos, sync_every=sync,
                          **self.statics)
        return ds

    def _start(self):
        jnp, p = self.jnp, self.runner.programs
        caches = self.init_caches(self.cfg, self.batch, self.rows, jnp.bfloat16)
        return self.jax.block_until_ready(p.prefill(
            self.runner.state, self.ids, self.lengths, jnp.ones((self.batch,), bool), caches, self.jax.random.key(0),
            *self.sample, self.eos, jnp.int32(self.steps + 1), **self.statics))

    def decode_s(self) -> float:
        ds = self._start()
        t0 = time.perf_counter()
        self.jax.block_until_ready(self._decode(ds).out)
        return time.perf_counter() - t0

    def kernels(self) -> list[tuple[float, float, str]]:
        """(start ns, duration ns, name) of each kernel of one decode loop, in start order."""
        from measure.timing import gpu_kernel_events

        ds = self._start()
        return gpu_kernel_events(lambda: self.jax.block_until_ready(self._decode(ds).out))


class TorchProbe:
    """torch_impl's Runner over random weights: decode_s() from its stats, profile() of one generate."""

    def __init__(self, cfg, fused: str, batch: int, prompt_len: int, steps: int, sampling: dict | None = None):
        import torch

        from torch_impl import load_random

        self.torch, self.steps, self.sampling = torch, steps, sampling or {}
        self.runner = load_random(cfg, fused=FUSED[fused])
        self.prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()

    def decode_s(self) -> float:
        self.runner.generate(self.prompts, self.steps + 1, **self.sampling)
        return self.runner.last_stats["decode_s"]

    def kernels(self) -> list[tuple[float, float, str]]:
        """(start ns, duration ns, name) of each kernel of one generate call, in start order."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.runner.generate(self.prompts, self.steps + 1, **self.sampling)
            torch.cuda.synchronize()
        return sorted((ev.time_range.start * 1e3, ev.device_time * 1e3, ev.name) for ev in prof.events()
                      if ev.device_type == torch.autograd.DeviceType.CUDA)


def per_step(events: list[tuple[float, float, str]], steps: int) -> dict[str, tuple[float, float, float]]:
    """{kernel group: (us per step, launches per step, idle us per step before its launches)}, the
    longest first. Idle before a launch: from the latest end of the kernels before it to its start,
    none when it starts before they end."""
    time_ns, idle_ns, count = collections.defaultdict(float), collections.defaultdict(float), collections.Counter()
    end = None
    for start, ns, name in sorted(events):
        g = _group(name)
        time_ns[g] += ns
        count[g] += 1
        if end is not None:
            idle_ns[g] += max(0.0, start - end)
        end = start + ns if end is None else max(end, start + ns)
    rows = {g: (t / steps / 1e3, count[g] / steps, idle_ns[g] / steps / 1e3) for g, t in time_ns.items()}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][0]))


# Kernel groups whose bytes are known, by name (both twins' kernels; torch's linear_residual serves
# o_proj and down, jax's o_proj alone beside its mlp_down): the weights and caches they must read.
ROLES = [(re.compile(p), roles) for p, roles in (
    (r"^_?rmsnorm_qkv(_linear|_kernel)$", ("qkv",)),
    (r"^_?(mlp_)?norm_gate_up(_kernel)?$", ("gate_up",)),
    (r"^mlp_down$", ("down",)),
    (r"^linear_residual$", ("o_proj",)),
    (r"^_linear_residual_kernel$", ("o_proj", "down")),
    (r"^_?decode_attention(_kernel)?$", ("attention",)),
)]


def role_bytes(cfg, batch: int, context: float, weight_bytes: int = 2, cache_bytes: int = 2) -> dict[str, float]:
    """Bytes one decode step must read per role: each projection's weights once (per layer, all
    layers) and, for attention, every sequence's K and V rows of its `context` tokens."""
    h, l = cfg.hidden_size, cfg.num_hidden_layers
    return {"qkv": l * weight_bytes * h * cfg.qkv_size, "o_proj": l * weight_bytes * cfg.q_size * h,
            "gate_up": l * weight_bytes * 2 * h * cfg.intermediate_size,
            "down": l * weight_bytes * cfg.intermediate_size * h,
            "attention": l * batch * context * 2 * cfg.num_key_value_heads * cfg.head_dim * cache_bytes}


def group_bytes(group: str, roles: dict[str, float]) -> float | None:
    """The bytes per step a kernel group must read (ROLES), None when its name says nothing."""
    for pattern, names in ROLES:
        if pattern.match(group):
            return sum(roles[n] for n in names)
    return None


def with_bandwidth(prof: dict, roles: dict[str, float]) -> dict[str, tuple]:
    """per_step's rows plus (bytes per step, GB/s) where the group's bytes are known, else (None, None)."""
    out = {}
    for g, (t, c, i) in prof.items():
        b = group_bytes(g, roles)
        out[g] = (t, c, i, b, b / t / 1e3 if b is not None and t > 0 else None)
    return out


def write_trace(path, events: list[tuple[float, float, str]]) -> None:
    """The kernels of one profile as JSON rows [start ns from the first kernel, duration ns, name]."""
    t0 = min((e[0] for e in events), default=0.0)
    with open(path, "w") as f:
        json.dump([[round(s - t0, 1), round(d, 1), n] for s, d, n in sorted(events)], f)


def main(argv=None) -> int:
    p = argparsing.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", default="jax", choices=["jax", "torch"])
    p.add_argument("--presets", default="Qwen3-0.6B,Qwen3-8B")
    p.add_argument("--fused", default="plain,auto", help="comma list of plain, auto, on")
    p.add_argument("--batch", default="1")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--sampling", metavar="T,K,P", default=None,
                   help="sampled decode: temperature, top_k, top_p (e.g. 0.7,40,0.95); greedy without it")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--top", type=int, default=25, help="kernel groups listed per profile")
    p.add_argument("--smoke", action="store_true", help="two layers of each preset (any backend)")
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default=None, metavar="DIR", help="write each profile's kernels (start, duration, "
                   "name) to DIR/<framework>-<preset>-<fused>-b<batch>.json")
    a = p.parse_args(argv)
    from bench.decode import parse_sampling

    sampling = parse_sampling(a.sampling)
    probe_cls = JaxProbe if a.framework == "jax" else TorchProbe
    rows = []
    for preset in a.presets.split(","):
        cfg = shrink(PRESETS[preset], layers=2) if a.smoke else PRESETS[preset]
        for fused in a.fused.split(","):
            for b in map(int, a.batch.split(",")):
                probe = probe_cls(cfg, fused, b, a.prompt_len, a.steps, sampling)
                probe.decode_s()  # compile (capture) and warm up
                best = min(probe.decode_s() for _ in range(3))
                row = dict(framework=a.framework, preset=preset, fused=fused, batch=b, tok_s=b * a.steps / best,
                           us_per_step=best / a.steps * 1e6, sampling=sampling)
                print(f"{a.framework:5} {preset:11} {fused:5} b{b:<4} {row['tok_s']:9.1f} tok/s  "
                      f"{row['us_per_step']:8.1f} us/step", flush=True)
                if not a.no_profile:
                    events = probe.kernels()
                    if a.trace:
                        os.makedirs(a.trace, exist_ok=True)
                        write_trace(os.path.join(a.trace, f"{a.framework}-{preset}-{fused}-b{b}.json"), events)
                    roles = role_bytes(cfg, b, a.prompt_len + a.steps / 2)  # the mean context of the decode
                    prof = with_bandwidth(per_step(events, a.steps), roles)
                    busy = sum(r[0] for r in prof.values())
                    idle = sum(r[2] for r in prof.values())
                    row.update(kernel_us_per_step=busy, launches_per_step=sum(r[1] for r in prof.values()),
                               idle_us_per_step=idle, kernels=prof)
                    print(f"    kernel time {busy:.1f} us/step over {row['launches_per_step']:.0f} launches/step, "
                          f"GPU idle between kernels {idle:.1f} (wall {row['us_per_step']:.1f}: gaps "
                          f"{row['us_per_step'] - busy:.1f})")
                    for g, (t, c, i, nbytes, gbs) in list(prof.items())[:a.top]:
                        rate = f"{nbytes / 1e6:8.1f} MB {gbs:7.0f} GB/s" if nbytes is not None else " " * 24
                        print(f"      {t:8.2f} us {c:6.1f}x  idle before {i:7.2f} us {rate}  {g}")
                rows.append(row)
                del probe
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(framework=a.framework, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
