"""Where a jax_impl decode step spends its time on the GPU: tok/s and a per-kernel breakdown.

Builds a random-weight model of a preset directly on the device (no checkpoint on disk), runs the
real compiled programs of jax_impl.generation (prefill, then the whole decode loop in one call),
times batch-B greedy decode of `--steps` tokens (best of 3), and traces one decode loop with the
profiler: device time per step by kernel (grouped by name), the sum of kernel time per step
against the wall time per step (the difference is launch gaps).

    python -m bench.jax_decode_profile --presets Qwen3-8B --fused plain,auto --batch 1 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.timing import gpu_kernel_events
from common.config import PRESETS, shrink
from jax_impl import generation
from jax_impl.fused import choose_ops
from jax_impl.model import Qwen3, init_caches

FUSED = {"plain": False, "auto": "auto", "on": True}


def random_params(cfg, dtype, seed: int = 0) -> dict:
    """The model's parameter dict (common.weights' packed layout) with random values on the device."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    keys = iter(jax.random.split(jax.random.key(seed), 4 * cfg.num_hidden_layers + 2))

    def randn(shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(dtype)

    layers = [dict(input_norm=jnp.ones((h,), dtype), post_norm=jnp.ones((h,), dtype),
                   q_norm=jnp.full((d,), 20.0, dtype), k_norm=jnp.full((d,), 40.0, dtype),
                   w_qkv=randn((cfg.qkv_size, h)), w_o=randn((h, cfg.q_size)),
                   w_gate_up=randn((2 * i, h)), w_down=randn((h, i)))
              for _ in range(cfg.num_hidden_layers)]
    params = dict(embed=randn((cfg.vocab_size, h)), final_norm=jnp.ones((h,), dtype), layers=layers)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = randn((cfg.vocab_size, h))
    return jax.block_until_ready(params)


def _kernel_group(name: str) -> str:
    """Collapse XLA's numbered fusion names (fusion_12, loop_add_fusion_3) into one group."""
    return re.sub(r"[._]\d+(?=$|[._])", "", name)[:60]


class DecodeProbe:
    def __init__(self, cfg, params, fused: str, batch: int, prompt_len: int, steps: int):
        self.cfg, self.batch, self.prompt_len, self.steps = cfg, batch, prompt_len, steps
        model = Qwen3(cfg, params, choose_ops(cfg, FUSED[fused], "bfloat16"))
        graphdef, self.state = nnx.split(model)
        self.programs = generation.Programs(graphdef)
        self.rows = -(-(prompt_len + steps) // 128) * 128
        self.ids = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
        self.lengths = jnp.full((batch,), prompt_len, jnp.int32)
        self.statics = dict(greedy=True, top_k=0, use_top_p=False)
        self.eos = jnp.asarray([-1], jnp.int32)
        self.sync_every = generation.steps_per_test(steps)

    def _start(self):
        caches = init_caches(self.cfg, self.batch, self.rows, jnp.bfloat16)
        ds = self.programs.prefill(self.state, self.ids, self.lengths, caches, jax.random.key(0),
                                   jnp.float32(1.0), jnp.float32(1.0), self.eos, max_new=self.steps + 1,
                                   **self.statics)
        return jax.block_until_ready(ds)

    def decode_s(self) -> float:
        """Seconds of one decode loop of `steps` tokens (the prefill excluded)."""
        ds = self._start()
        t0 = time.perf_counter()
        ds = self.programs.decode(self.state, ds, jnp.int32(self.steps + 1), jnp.float32(1.0),
                                  jnp.float32(1.0), self.eos, sync_every=self.sync_every, **self.statics)
        jax.block_until_ready(ds.out)
        return time.perf_counter() - t0

    def profile(self) -> dict:
        ds = self._start()
        time_ns, count = collections.defaultdict(float), collections.defaultdict(int)

        def run():
            out = self.programs.decode(self.state, ds, jnp.int32(self.steps + 1), jnp.float32(1.0),
                                       jnp.float32(1.0), self.eos, sync_every=self.sync_every, **self.statics)
            jax.block_until_ready(out.out)

        for _, dur, name in gpu_kernel_events(run):
            g = _kernel_group(name)
            time_ns[g] += dur
            count[g] += 1
        per_step = {g: (t / self.steps / 1e3, count[g] / self.steps) for g, t in time_ns.items()}
        return dict(sorted(per_step.items(), key=lambda kv: -kv[1][0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="Qwen3-0.6B,Qwen3-8B")
    p.add_argument("--fused", default="plain,auto", help="comma list of plain, auto, on")
    p.add_argument("--batch", default="1")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--top", type=int, default=25, help="kernel groups listed per profile")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (any backend)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    for preset in a.presets.split(","):
        cfg = PRESETS[preset]
        if a.smoke:
            cfg = shrink(cfg, layers=2)
        params = random_params(cfg, jnp.bfloat16)
        for fused in a.fused.split(","):
            for b in map(int, a.batch.split(",")):
                probe = DecodeProbe(cfg, params, fused, b, a.prompt_len, a.steps)
                probe.decode_s()  # compile and warm up
                best = min(probe.decode_s() for _ in range(3))
                row = dict(preset=preset, fused=fused, batch=b, tok_s=b * a.steps / best,
                           us_per_step=best / a.steps * 1e6)
                print(f"{preset:11} {fused:5} b{b:<4} {row['tok_s']:9.1f} tok/s  {row['us_per_step']:8.1f} us/step",
                      flush=True)
                if not a.no_profile:
                    prof = probe.profile()
                    busy = sum(t for t, _ in prof.values())
                    launches = sum(c for _, c in prof.values())
                    row.update(kernel_us_per_step=busy, launches_per_step=launches, kernels=prof)
                    print(f"    kernel time {busy:.1f} us/step over {launches:.0f} launches/step "
                          f"(wall {row['us_per_step']:.1f}: gaps {row['us_per_step'] - busy:.1f})")
                    for g, (t, c) in list(prof.items())[:a.top]:
                        print(f"      {t:8.2f} us {c:6.1f}x  {g}")
                rows.append(row)
                del probe
        del params
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
