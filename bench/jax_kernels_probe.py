"""GPU timing probe of jax_impl's Pallas kernels against the plain XLA ops they replace.

Method: a chain of n decoder layers without the attention itself (x -> rmsnorm_qkv -> q used
as the attention output -> attn_out -> mlp -> x), each layer on its own weight buffers (more
bytes than the 50 MB L2), every op depending on the previous one as in the model, inside one
jit. The device time of every kernel comes from a profiler trace (jax.profiler.ProfileData):
a Pallas kernel is found by its name, and a plain-XLA op's time is the layer's kernel time minus
the Pallas kernels of the other ops (chains with just that op on the plain path). Sweeps vary
the tiles of all four projections at once (one compile per sweep point). Decode attention is
timed in a chain of its own (q -> attention -> q). Bandwidth = bytes the op must move / its
kernel time, against a device-to-device copy timed the same way in the same run.

    python -m bench.jax_kernels_probe --presets Qwen3-8B,Qwen3-0.6B --tokens 1,16 --sweep --json out.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import importlib
import json
import tempfile
import time

import jax
import jax.numpy as jnp

from common.config import PRESETS, shrink
from common.tiles import AttentionTiles as AT
from common.tiles import MatmulTiles as MT
from common.tiles import next_pow2
from jax_impl import ops_plain as P

# The package re-exports each op under its module's name, so fetch the modules themselves.
ao, da, mk, qk = (importlib.import_module(f"jax_impl.kernels.{m}")
                  for m in ("attn_out", "decode_attention", "mlp", "rmsnorm_qkv"))
BF16 = jnp.bfloat16
# Pallas kernel name (substring of the GPU kernel's name) -> op it belongs to.
KERNEL_OPS = (("rmsnorm_qkv", "qkv"), ("mlp_norm_gate_up", "gate_up"), ("mlp_down", "down"),
              ("attn_out", "attn_out"), ("decode_attention", "decode_attention"))


def trace_kernels(fn, args, calls: int = 3):
    """{category: device ns per call} of fn's GPU kernels, plus 'span' (first start to last end)
    and {kernel name: device ns per call}. Categories: KERNEL_OPS' ops and 'other'."""
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp(prefix="probe_trace_")
    jax.profiler.start_trace(d)
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    per = collections.defaultdict(float)
    names, starts, ends = collections.defaultdict(float), [], []
    on_gpu = jax.default_backend() == "gpu"  # off the GPU (a smoke test): the CPU's XLA threads
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU" if on_gpu else "/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream" if on_gpu else "tf_XLA"):
                continue
            for ev in line.events:
                cat = next((op for key, op in KERNEL_OPS if key in ev.name), "other")
                per[cat] += ev.duration_ns / calls
                names[ev.name[:70]] += ev.duration_ns / calls
                starts.append(ev.start_ns)
                ends.append(ev.start_ns + ev.duration_ns)
    if not starts:
        raise RuntimeError(f"no GPU kernel events in the trace {path}")
    for _, op in KERNEL_OPS:
        per.setdefault(op, 0.0)
    per["span"] = (max(ends) - min(starts)) / calls  # includes the host gaps between the calls
    per["busy"] = sum(v for k, v in per.items() if k not in ("span",))
    return dict(per), dict(names)


def wall_per_call(fn, args, calls: int = 10) -> float:
    """Seconds per call with `calls` calls dispatched back to back (best of 3)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def copy_bandwidth(nbytes: int) -> dict:
    """Device-to-device copy (read + write) and read-only bandwidth, bytes/s, by kernel time."""
    a = jnp.zeros((nbytes // 4,), jnp.float32)
    out = {}
    for name, f, moved in (("copy", jax.jit(jnp.copy), 2 * nbytes), ("add1", jax.jit(lambda x: x + 1.0), 2 * nbytes),
                           ("read", jax.jit(jnp.sum), nbytes)):
        per, _ = trace_kernels(f, (a,))
        out[name] = moved / (per["busy"] * 1e-9)
    out["copy"] = max(out["copy"], out.pop("add1"))
    return out


def _randn(key, shape, scale=0.02):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(BF16)


class Layers:
    """n layers of bf16 weights with the preset's shapes, each its own buffer."""

    def __init__(self, cfg, n: int, seed: int = 0):
        k = jax.random.split(jax.random.key(seed), 4 * n)
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        self.n = n
        self.w = dict(
            norm=[jnp.ones((h,), BF16)] * n, post_norm=[jnp.ones((h,), BF16)] * n,
            w_qkv=[_randn(k[4 * l], (cfg.qkv_size, h)) for l in range(n)],
            q_norm=[jnp.full((d,), 20.0, BF16)] * n, k_norm=[jnp.full((d,), 40.0, BF16)] * n,
            w_o=[_randn(k[4 * l + 1], (h, cfg.q_size)) for l in range(n)],
            w_gu=[_randn(k[4 * l + 2], (2 * i, h)) for l in range(n)],
            w_down=[_randn(k[4 * l + 3], (h, i)) for l in range(n)])
        jax.block_until_ready(self.w)


def op_bytes(cfg, t):
    h, i = cfg.hidden_size, cfg.intermediate_size
    return dict(qkv=2 * cfg.qkv_size * h, attn_out=2 * h * cfg.q_size, gate_up=4 * i * h, down=2 * h * i,
                mlp=6 * i * h)


def layer_chain(cfg, W, t, qkv_op, ao_op, mlp_op):
    """jit of n layers: q, caches = qkv(x); x = attn_out(q, x); x = mlp(x)."""
    kw = dict(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps)
    qkv_op, ao_op = jax.jit(functools.partial(qkv_op, **kw)), jax.jit(ao_op)  # lowered once each
    mlp_op = jax.jit(functools.partial(mlp_op, eps=cfg.rms_norm_eps))

    def f(x, w, cs, pos, slots, kc, vc):
        for l in range(W.n):
            q, kc, vc = qkv_op(x, w["norm"][l], w["w_qkv"][l], w["q_norm"][l], w["k_norm"][l], cs, pos, slots, kc, vc)
            x = ao_op(q.reshape(t, -1), w["w_o"][l], x)
            x = mlp_op(x, w["post_norm"][l], w["w_gu"][l], w["w_down"][l])
        return x, kc, vc

    cache = jnp.zeros((1, max(64, t), cfg.num_key_value_heads, cfg.head_dim), BF16)
    args = (_randn(jax.random.key(1), (t, cfg.hidden_size), 1.0), W.w, P.rope_table(4096, cfg.head_dim, cfg.rope_theta),
            jnp.arange(t, dtype=jnp.int32) + 100, jnp.arange(t, dtype=jnp.int32), cache, cache)
    return jax.jit(f), args


def attention_chain(cfg, n, b, ctx, op):
    hkv, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    keys = jax.random.split(jax.random.key(6), 2 * n)
    kcs = [_randn(keys[2 * l], (b, ctx, hkv, d), 1.0) for l in range(n)]
    vcs = [_randn(keys[2 * l + 1], (b, ctx, hkv, d), 1.0) for l in range(n)]
    op = jax.jit(op)

    def f(q, kcs, vcs, tables, lens):
        for l in range(n):
            q = op(q, kcs[l], vcs[l], tables, lens)
        return q

    return jax.jit(f), (_randn(jax.random.key(7), (b, hq, d), 1.0), kcs, vcs,
                        jnp.arange(b, dtype=jnp.int32)[:, None], jnp.full((b,), ctx, jnp.int32))


def _tag(t):
    if t is None:
        return "default"
    if isinstance(t, AT):
        return f"kv{t.block_kv} s{t.num_splits} w{t.num_warps}"
    return f"m{t.block_m} n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"


def sweeps(t):
    """Sweep point i: (qkv tiles, projection tiles for attn_out, gate/up and down)."""
    if t >= 16:
        mm = [MT(16, 32, 256), MT(16, 16, 512), MT(16, 32, 512), MT(16, 32, 512, num_stages=3),
              MT(16, 16, 1024), MT(16, 64, 256, num_warps=8, num_stages=3)]
        q = [MT(16, 16, 256), MT(16, 16, 512), MT(16, 32, 256), MT(16, 8, 512), MT(16, 16, 512, num_stages=3),
             MT(16, 128, 64)]
        return list(zip(q, mm))
    m = next_pow2(t)
    if m > 1:
        mm = [MT(m, 4, 1024), MT(m, 4, 512), MT(m, 8, 512), MT(m, 4, 2048), MT(m, 8, 1024, num_warps=8),
              MT(m, 2, 1024)]
        return list(zip(mm, mm))
    mm = [MT(1, 4, 2048), MT(1, 4, 1024), MT(1, 8, 2048, num_warps=8), MT(1, 2, 2048), MT(1, 4, 4096, num_warps=8)]
    return list(zip(mm, mm))


def attn_sweep(b, hkv, ctx):
    base = AT.default_for(b, hkv, ctx)
    s = base.num_splits
    out = [AT(128, s), AT(128, s, num_warps=8), AT(256, s, num_warps=8), AT(128, max(1, s // 2)),
           AT(128, s * 2), AT(64, s), AT(32, s)]
    return [o for o in dict.fromkeys(out) if o != base]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="Qwen3-8B,Qwen3-0.6B")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--sweep", action="store_true", help="also time the tile sweeps (else defaults only)")
    p.add_argument("--attention", action="store_true", help="also time decode attention")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later measurements are skipped")
    p.add_argument("--shrink", action="store_true", help="shrunken presets (a smoke test)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    bw = copy_bandwidth(1 << 24 if a.shrink else 1 << 30)
    copy = bw["copy"]
    print(f"device: {dev.device_kind}, jax {jax.__version__}; copy {copy / 1e12:.3f} TB/s, "
          f"read {bw['read'] / 1e12:.3f} TB/s (kernel time)", flush=True)
    rows, shown = [], [False]

    def row(op, preset, t, variant, ns, nbytes, xla_ns=None, **extra):
        ns = max(ns, 1.0)  # a kernel not found (e.g. interpreter mode off the GPU) reads as 1 ns
        r = dict(op=op, preset=preset, tokens=t, variant=variant, us=ns / 1e3, tb_s=nbytes / ns / 1e3,
                 frac_copy=nbytes / (ns * 1e-9) / copy, speedup_vs_xla=(xla_ns / ns) if xla_ns else None, **extra)
        rows.append(r)
        print(f"  {op:16s} {preset:10s} T={t:<3d} {variant:40s} {r['us']:8.2f} us {r['tb_s']:6.3f} TB/s "
              f"{100 * r['frac_copy']:5.1f}%" + (f"  x{r['speedup_vs_xla']:.2f} vs XLA" if xla_ns else ""), flush=True)

    def over_budget(what):
        if time.perf_counter() - t_start > a.budget:
            print(f"  {what}: skipped (over budget)", flush=True)
            return True
        return False

    for preset in a.presets.split(","):
        cfg = shrink(PRESETS[preset]) if a.shrink else PRESETS[preset]
        n = 2 if a.shrink else 8 if cfg.hidden_size >= 4096 else 16
        W = Layers(cfg, n)
        for t in [int(x) for x in a.tokens.split(",")]:
            nb = op_bytes(cfg, t)

            def measure(qkv_op, ao_op, mlp_op):
                f, args = layer_chain(cfg, W, t, qkv_op, ao_op, mlp_op)
                per, names = trace_kernels(f, args)
                if not shown[0]:  # the first chain's kernels by name, to check the categories
                    top = sorted(names.items(), key=lambda kv: -kv[1])[:16]
                    print("  kernels (us per layer):", [(k, round(v / n / 1e3, 2)) for k, v in top], flush=True)
                    shown[0] = True
                per = {k: v / n for k, v in per.items()}  # per layer
                per["wall"] = wall_per_call(f, args) * 1e9 / n
                return per

            if over_budget(f"{preset} T={t}"):
                continue
            shown[0] = False
            t0 = time.perf_counter()
            try:
                fused = measure(qk.rmsnorm_qkv, ao.attn_out, mk.mlp)
                plain = measure(P.rmsnorm_qkv, P.attn_out, P.mlp)
                xq = measure(P.rmsnorm_qkv, ao.attn_out, mk.mlp)
                xa = measure(qk.rmsnorm_qkv, P.attn_out, mk.mlp)
                xm = measure(qk.rmsnorm_qkv, ao.attn_out, P.mlp)
            except Exception as e:  # report and go on
                print(f"  {preset} T={t}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            g = lambda per, *ks: sum(per.get(k, 0.0) for k in ks)  # noqa: E731
            xla = dict(qkv=xq["busy"] - g(xq, "attn_out", "gate_up", "down"),
                       attn_out=xa["busy"] - g(xa, "qkv", "gate_up", "down"),
                       mlp=xm["busy"] - g(xm, "qkv", "attn_out"))
            for op in ("qkv", "attn_out", "mlp"):
                row(op, preset, t, "xla", xla[op], nb[op], xla[op])
                row(op, preset, t, "pallas default", g(fused, *(("gate_up", "down") if op == "mlp" else (op,))),
                    nb[op], xla[op])
            row("gate_up", preset, t, "pallas default", fused["gate_up"], nb["gate_up"])
            row("down", preset, t, "pallas default", fused["down"], nb["down"])
            for name, per in (("layer all-xla", plain), ("layer all-pallas", fused)):
                layer_bytes = nb["qkv"] + nb["attn_out"] + nb["mlp"]
                row("layer", preset, t, name + " (busy)", per["busy"], layer_bytes, plain["busy"])
                row("layer", preset, t, name + " (wall)", per["wall"], layer_bytes, plain["wall"], span_us=per["span"] / 1e3)
            print(f"  (baselines took {time.perf_counter() - t0:.1f} s)", flush=True)

            best = {}
            for tq, tm in (sweeps(t) if a.sweep else []):
                if over_budget(f"{preset} T={t} sweep"):
                    break
                try:
                    per = measure(functools.partial(qk.rmsnorm_qkv, tiles=tq), functools.partial(ao.attn_out, tiles=tm),
                                  functools.partial(mk.mlp, tiles=tm, down_tiles=tm))
                except Exception as e:
                    print(f"  sweep {_tag(tq)} / {_tag(tm)}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                    continue
                for op, tl in (("qkv", tq), ("attn_out", tm), ("gate_up", tm), ("down", tm)):
                    row(op, preset, t, f"pallas {_tag(tl)}", per[op], nb[op], xla.get(op))
                    if op not in best or per[op] < best[op][0]:
                        best[op] = (per[op], tl)
            if best:
                print("  best:", {k: (round(v[0] / 1e3, 2), _tag(v[1])) for k, v in best.items()}, flush=True)
                gu_b, dn_b = best["gate_up"][1], best["down"][1]
                per = measure(functools.partial(qk.rmsnorm_qkv, tiles=best["qkv"][1]),
                              functools.partial(ao.attn_out, tiles=best["attn_out"][1]),
                              functools.partial(mk.mlp, tiles=gu_b, down_tiles=dn_b))
                row("mlp", preset, t, f"pallas best gu[{_tag(gu_b)}] down[{_tag(dn_b)}]",
                    per["gate_up"] + per["down"], nb["mlp"], xla["mlp"])
                layer_bytes = nb["qkv"] + nb["attn_out"] + nb["mlp"]
                row("layer", preset, t, "layer best-pallas (busy)", per["busy"], layer_bytes, plain["busy"])
                row("layer", preset, t, "layer best-pallas (wall)", per["wall"], layer_bytes, plain["wall"])

            if a.attention and not over_budget(f"{preset} T={t} attention"):
                ctx = 64 if a.shrink else 4096 if t == 1 else 1024
                hkv, d = cfg.num_key_value_heads, cfg.head_dim
                att_bytes = 2 * t * ctx * hkv * d * 2
                variants = [("xla", P.decode_attention), ("pallas default", da.decode_attention)]
                variants += [(f"pallas {_tag(tl)}", functools.partial(da.decode_attention, tiles=tl))
                             for tl in attn_sweep(t, hkv, ctx)] if a.sweep else []
                xla_ns = None
                for name, op in variants:
                    if over_budget("attention"):
                        break
                    try:
                        f, args = attention_chain(cfg, n, t, ctx, op)
                        per, _ = trace_kernels(f, args)
                    except Exception as e:
                        print(f"  attention {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                        continue
                    ns = per["busy"] / n
                    xla_ns = xla_ns or ns
                    row("decode_attention", preset, t, f"{name} ctx={ctx}", ns, att_bytes, xla_ns,
                        span_us=per["span"] / n / 1e3)
        del W

    print(f"\ndevice {dev.device_kind}, jax {jax.__version__}, copy {copy / 1e12:.3f} TB/s, "
          f"read {bw['read'] / 1e12:.3f} TB/s, total {time.perf_counter() - t_start:.0f} s")
    print("| op | preset | T | variant | us | TB/s | % copy | vs XLA |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['speedup_vs_xla']:.2f}x" if r["speedup_vs_xla"] else ""
        print(f"| {r['op']} | {r['preset']} | {r['tokens']} | {r['variant']} | {r['us']:.2f} | {r['tb_s']:.3f} | "
              f"{100 * r['frac_copy']:.1f} | {sp} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_tb_s=copy / 1e12,
                           read_tb_s=bw["read"] / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
