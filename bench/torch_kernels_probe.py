"""Probe of torch_impl on a GPU: per-kernel time and bandwidth, a tile sweep, end-to-end decode.

    python bench/torch_kernels_probe.py [--sections sweep,e2e,kernels] [--out DIR] [--write-tuned] [--baselines]

- env: GPU, versions, device-to-device copy bandwidth (the ceiling the kernels are measured against).
- kernels: each op, fused (Triton) and plain (torch), at batch 1 and 16 for Qwen3-0.6B and -8B
  shapes: a chain of one call per layer with per-layer weights (28 / 36 layers, so weights come from
  HBM, not L2) captured in a CUDA graph; time per call, bytes / time, % of the copy bandwidth,
  speedup of fused over plain.
- sweep: MatmulTiles candidates per projection and AttentionTiles for decode attention; the best
  go to tuned/<gpu>.json (with --write-tuned into torch_impl/kernels/tuned/, used from then on).
- e2e: random-weight models made on the GPU, a 16-token prompt, 256 greedy new tokens through
  torch_impl's Runner (decode step in a CUDA graph): batch-1 tok/s fused and plain, batched 8/32/128.
Results: a compact table on stdout and probe.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Qwen3Config  # noqa: E402
from common.tiles import AttentionTiles, MatmulTiles  # noqa: E402
from torch_impl import kernels as K  # noqa: E402
from torch_impl import ops_plain as P  # noqa: E402
from torch_impl.kernels import _common, tuning  # noqa: E402
from torch_impl.kernels.attn_out import linear_residual  # noqa: E402
from torch_impl.kernels.mlp import norm_gate_up  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
RESULTS: dict = {"kernels": [], "sweep": [], "e2e": []}
CONTEXT = 1024  # keys per sequence in the decode-attention rows


def log(*a):
    print(*a, flush=True)


def time_chain(calls, reps: int = 30) -> float:
    """Microseconds per call of a list of closures replayed as one CUDA graph (median of reps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del g
    return statistics.median(times) * 1000 / len(calls)


def copy_bandwidth() -> float:
    """Bytes moved (read + write) per second by a 1 GiB device-to-device copy."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    return 2 * x.numel() / (ms * 1e-3)


class Layers:
    """Per-layer random bf16 weights and activations of one preset for a decode batch of m tokens."""

    def __init__(self, cfg: Qwen3Config, m: int):
        self.cfg, self.m = cfg, m
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16) * 0.02  # noqa: E731
        self.layers = [dict(norm=1 + r(h), w_qkv=r(cfg.qkv_size, h), qn=1 + 10 * r(d).abs(), kn=1 + 10 * r(d).abs(),
                            w_o=r(h, cfg.q_size), w_gu=r(2 * i, h), w_down=r(h, i))
                       for _ in range(cfg.num_hidden_layers)]
        self.x = torch.randn(m, h, device=DEV, dtype=BF16)
        self.attn = torch.randn(m, cfg.q_size, device=DEV, dtype=BF16)
        self.act = torch.randn(m, i, device=DEV, dtype=BF16)
        self.q = torch.randn(m, cfg.num_attention_heads, d, device=DEV, dtype=BF16)
        self.cos_sin = P.rope_table(4096, d, cfg.rope_theta, device=DEV)
        bs = 256
        nb = CONTEXT // bs
        self.kc = torch.randn(m * nb, bs, cfg.num_key_value_heads, d, device=DEV, dtype=BF16)
        self.vc = torch.randn_like(self.kc)
        self.tables = torch.arange(m * nb, device=DEV, dtype=torch.int32).view(m, nb)
        self.lens = torch.full((m,), CONTEXT, device=DEV, dtype=torch.int32)
        self.positions = torch.full((m,), CONTEXT - 1, device=DEV, dtype=torch.int64)
        self.slots = (torch.arange(m, device=DEV) * CONTEXT + CONTEXT - 1).to(torch.int32)

    def calls(self, op: str, impl, tiles=None):
        cfg, out = self.cfg, []
        kw = {} if tiles is None else {"tiles": tiles}
        for w in self.layers:
            if op == "rmsnorm_qkv":
                out.append(lambda w=w: impl(self.x, w["norm"], w["w_qkv"], w["qn"], w["kn"], self.cos_sin,
                                            self.positions, self.slots, self.kc, self.vc,
                                            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                                            eps=cfg.rms_norm_eps, **kw))
            elif op == "mlp":
                out.append(lambda w=w: impl(self.x, w["norm"], w["w_gu"], w["w_down"], eps=cfg.rms_norm_eps, **kw))
            elif op == "mlp_gate_up":
                out.append(lambda w=w: impl(self.x, w["norm"], w["w_gu"], eps=cfg.rms_norm_eps, **kw))
            elif op == "mlp_down":
                out.append(lambda w=w: impl(self.act, w["w_down"], self.x, **kw))
            elif op == "attn_out":
                out.append(lambda w=w: impl(self.attn, w["w_o"], self.x, **kw))
            elif op == "decode_attention":
                out.append(lambda: impl(self.q, self.kc, self.vc, self.tables, self.lens, **kw))
        return out

    def bytes(self, op: str) -> int:
        cfg, w, m = self.cfg, self.layers[0], self.m
        act = 2 * m * cfg.hidden_size
        if op == "rmsnorm_qkv":
            return 2 * w["w_qkv"].numel() + act + 2 * m * cfg.qkv_size
        if op == "mlp":
            return 2 * (w["w_gu"].numel() + w["w_down"].numel()) + 2 * act + 4 * m * cfg.intermediate_size
        if op == "mlp_gate_up":
            return 2 * w["w_gu"].numel() + act + 2 * m * cfg.intermediate_size
        if op == "mlp_down":
            return 2 * w["w_down"].numel() + 2 * act + 2 * m * cfg.intermediate_size
        if op == "attn_out":
            return 2 * w["w_o"].numel() + 2 * act + 2 * m * cfg.q_size
        return 2 * 2 * m * CONTEXT * cfg.num_key_value_heads * cfg.head_dim


PLAIN = {"rmsnorm_qkv": P.rmsnorm_qkv, "mlp": P.mlp, "attn_out": P.attn_out, "decode_attention": P.decode_attention}
FUSED = {"rmsnorm_qkv": K.rmsnorm_qkv, "mlp": K.mlp, "attn_out": K.attn_out, "decode_attention": K.decode_attention,
         "mlp_gate_up": norm_gate_up, "mlp_down": linear_residual}
PRESETS = ("Qwen3-0.6B", "Qwen3-8B")


def section_kernels(copy_bw: float) -> None:
    log(f"\n{'op':18} {'preset':11} {'M':>3} {'fused us':>9} {'plain us':>9} {'speedup':>7} {'GB/s':>7} {'% copy':>6}")
    for preset in PRESETS:
        for m in (1, 16):
            lay = Layers(Qwen3Config.preset(preset), m)
            for op in ("rmsnorm_qkv", "mlp", "mlp_gate_up", "mlp_down", "attn_out", "decode_attention"):
                try:
                    fused = time_chain(lay.calls(op, FUSED[op]))
                    plain = time_chain(lay.calls(op, PLAIN[op])) if op in PLAIN else None
                except Exception as e:  # keep probing the rest
                    log(f"{op:18} {preset:11} {m:3} ERROR {type(e).__name__}: {e}")
                    continue
                gbs = lay.bytes(op) / (fused * 1e-6) / 1e9
                row = dict(op=op, preset=preset, m=m, fused_us=fused, plain_us=plain, bytes=lay.bytes(op), gbs=gbs,
                           pct_copy=100 * gbs * 1e9 / copy_bw, speedup=(plain / fused) if plain else None)
                RESULTS["kernels"].append(row)
                log(f"{op:18} {preset:11} {m:3} {fused:9.2f} {plain or float('nan'):9.2f} "
                    f"{row['speedup'] or float('nan'):7.2f} {gbs:7.0f} {row['pct_copy']:6.1f}")
            # the model's head: final norm (plain torch vs the Triton kernel) and lm_head (cuBLAS)
            cfg = lay.cfg
            head = torch.randn(cfg.vocab_size, cfg.hidden_size, device=DEV, dtype=BF16) * 0.02
            nw = lay.layers[0]["norm"]
            rows = [("final_norm", lambda: K.rms_norm(lay.x, nw, eps=1e-6), lambda: P.rms_norm(lay.x, nw, 1e-6),
                     4 * m * cfg.hidden_size),
                    ("lm_head (F.linear)", lambda: torch.nn.functional.linear(lay.x, head), None, 2 * head.numel())]
            for op, f, pl, nbytes in rows:
                fused = time_chain([f] * 4)
                plain = time_chain([pl] * 4) if pl else None
                gbs = nbytes / (fused * 1e-6) / 1e9
                RESULTS["kernels"].append(dict(op=op, preset=preset, m=m, fused_us=fused, plain_us=plain, bytes=nbytes,
                                               gbs=gbs, pct_copy=100 * gbs * 1e9 / copy_bw,
                                               speedup=(plain / fused) if plain else None))
                log(f"{op:18} {preset:11} {m:3} {fused:9.2f} {plain or float('nan'):9.2f} "
                    f"{(plain / fused) if plain else float('nan'):7.2f} {gbs:7.0f} {100 * gbs * 1e9 / copy_bw:6.1f}")
            del lay, head
            torch.cuda.empty_cache()


# (block_m, block_n, block_k, num_warps, num_stages); block_m 1 = multiply-and-reduce, 16 = tensor-core dot
# (block_n >= 64 with block_m 16: W as the left operand of a warpgroup MMA)
M1 = [(1, 8, 512, 4, 2), (1, 8, 1024, 8, 2), (1, 8, 2048, 8, 2), (1, 4, 2048, 4, 2), (1, 4, 4096, 8, 2),
      (1, 2, 2048, 4, 2), (1, 2, 4096, 8, 2), (1, 2, 1024, 4, 2),
      (1, 16, 1024, 8, 2), (1, 16, 2048, 8, 2), (16, 16, 256, 4, 3), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4),
      (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 128, 128, 8, 4)]
M16 = [(16, 16, 256, 4, 3), (16, 64, 128, 8, 3), (16, 128, 128, 8, 4), (16, 64, 128, 4, 5), (16, 32, 256, 8, 3)]
ATTN = [(64, 1), (128, 1), (64, 2), (64, 4), (64, 8), (32, 8), (32, 16), (128, 4)]


def section_sweep(tuned: dict, ms=(1, 16)) -> None:
    log(f"\nsweep m={ms}: best tiles per projection (us per call), then every candidate's time")
    for preset in PRESETS:
        cfg = Qwen3Config.preset(preset)
        for m in ms:
            lay = Layers(cfg, m)
            shapes = {"rmsnorm_qkv": (cfg.qkv_size, cfg.hidden_size), "mlp_gate_up": (2 * cfg.intermediate_size,
                      cfg.hidden_size), "mlp_down": (cfg.hidden_size, cfg.intermediate_size),
                      "attn_out": (cfg.hidden_size, cfg.q_size)}
            for op, (n, k) in shapes.items():
                default = MatmulTiles.default_for(m, n, k)
                results = []
                for bm, bn, bk, nw, ns in (M1 if m == 1 else M16):
                    if op == "rmsnorm_qkv" and bn > cfg.head_dim // 2:
                        continue
                    t = MatmulTiles(bm, bn, bk, num_warps=nw, num_stages=ns)
                    try:
                        results.append((time_chain(lay.calls(op, FUSED[op], t), reps=15), t))
                    except Exception as e:
                        log(f"  {op} {preset} m{m} {t}: {type(e).__name__}: {str(e)[:120]}")
                base = time_chain(lay.calls(op, FUSED[op], default), reps=15)
                best_us, best = min(results, key=lambda r: r[0])
                key = tuning.matmul_key(op, m, n, k)
                tuned.pop(key, None)
                if best_us < base:
                    tuned[key] = {f: getattr(best, f) for f in ("block_m", "block_n", "block_k", "num_warps",
                                                                "num_stages")}
                RESULTS["sweep"].append(dict(op=op, preset=preset, m=m, default_us=base, best_us=best_us,
                                             best=str(best), all=[(round(u, 2), str(t)) for u, t in results]))
                log(f"  {op:12} {preset:11} m{m:<3} default {base:7.2f}  best {best_us:7.2f}  "
                    f"(m{best.block_m} n{best.block_n} k{best.block_k} w{best.num_warps} s{best.num_stages}); "
                    + " ".join(f"{u:.1f}" for u, _ in results))
            # decode attention at the e2e context (272 keys in a 2-block table) and at CONTEXT
            for ctx in (272, CONTEXT):
                nb = -(-ctx // 256)
                lens = torch.full((m,), ctx, device=DEV, dtype=torch.int32)
                tables = lay.tables[:, :nb].contiguous()
                results = []
                for bkv, splits in ATTN:
                    t = AttentionTiles(block_kv=bkv, num_splits=splits)
                    call = lambda t=t: K.decode_attention(lay.q, lay.kc, lay.vc, tables, lens, tiles=t)  # noqa: E731
                    calls = [call] * len(lay.layers)
                    results.append((time_chain(calls, reps=15), t))
                default = AttentionTiles.default_for(m, cfg.num_key_value_heads, nb * 256)
                base = time_chain([lambda: K.decode_attention(lay.q, lay.kc, lay.vc, tables, lens, tiles=default)]
                                  * len(lay.layers), reps=15)
                best_us, best = min(results, key=lambda r: r[0])
                tuned.pop(tuning.attention_key(m, cfg.num_key_value_heads, nb * 256), None)
                if best_us < base:
                    tuned[tuning.attention_key(m, cfg.num_key_value_heads, nb * 256)] = dict(
                        block_kv=best.block_kv, num_splits=best.num_splits, num_warps=best.num_warps,
                        num_stages=best.num_stages)
                RESULTS["sweep"].append(dict(op="decode_attention", preset=preset, m=m, context=ctx, default_us=base,
                                             best_us=best_us, best=str(best),
                                             all=[(round(u, 2), str(t)) for u, t in results]))
                log(f"  decode_attn  {preset:11} m{m:<3} ctx {ctx:5} default {base:7.2f}  best {best_us:7.2f} "
                    f"(kv{best.block_kv} x{best.num_splits}); " + " ".join(f"{u:.1f}" for u, _ in results))
            del lay
            torch.cuda.empty_cache()


def random_runner(preset: str, fused):
    from torch_impl.runner import TorchRunner, build_model

    cfg = Qwen3Config.preset(preset)
    model = build_model(cfg, BF16, DEV, fused)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=g)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(1.0, 30.0, generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g)
    return TorchRunner.from_model(model)


def _e2e_rows(preset, fused, label, batches, new_tokens):
    runner = random_runner(preset, fused)
    for b in batches:
        prompts = torch.randint(0, 150000, (b, 16)).tolist()
        best = None
        for _ in range(2):  # the first run compiles and captures
            runner.generate(prompts, new_tokens)
            st = runner.last_stats
            best = max(best or 0, b * (new_tokens - 1) / st["decode_s"])
        row = dict(preset=preset, path=label, batch=b, tok_s=best, prefill_s=st["prefill_s"],
                   ms_per_step=1000 * st["decode_s"] / (new_tokens - 1))
        RESULTS["e2e"].append(row)
        log(f"  {preset:11} {label:13} batch {b:4}: {best:9.1f} tok/s "
            f"({row['ms_per_step']:.3f} ms/step, prefill {st['prefill_s'] * 1000:.1f} ms)")
    del runner
    torch.cuda.empty_cache()


def section_e2e(batches=(1, 8, 32, 128), new_tokens: int = 256, baselines: bool = False) -> None:
    log("\ne2e: 16-token prompt, greedy, decode tok/s (all sequences)")
    for preset in PRESETS:
        paths = [(True, "fused", batches)]
        if baselines:
            paths += [(False, "plain", (1,)), (True, "fused, no PDL", (1,))]
        for fused, label, bs in paths:
            if label == "fused, no PDL":  # the fused path without programmatic dependent launch
                os.environ["TORCH_IMPL_PDL"] = "0"
            _common._PDL.clear()
            try:
                _e2e_rows(preset, fused, label, bs, new_tokens)
            except Exception as e:
                log(f"  {preset} {label}: ERROR {type(e).__name__}: {e}")
            finally:
                os.environ.pop("TORCH_IMPL_PDL", None)
                _common._PDL.clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="sweep,e2e,kernels",
                   help="in order: sweep | sweep1 | sweep16, e2e, kernels (env always)")
    p.add_argument("--baselines", action="store_true", help="e2e also without fusion and without PDL")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--write-tuned", action="store_true", help="write the sweep's winners into torch_impl/kernels/tuned")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = a.sections.split(",")
    name = torch.cuda.get_device_name()
    RESULTS["env"] = dict(gpu=name, torch=torch.__version__, triton=triton.__version__)
    copy_bw = copy_bandwidth()
    RESULTS["env"]["copy_GBs"] = copy_bw / 1e9
    log(f"{name}: torch {torch.__version__}, triton {triton.__version__}, copy {copy_bw / 1e9:.0f} GB/s")
    t0 = time.time()

    def save():
        (out / "probe.json").write_text(json.dumps(RESULTS, indent=1))

    tuned: dict = json.loads(tuning.device_file(name).read_text()) if tuning.device_file(name).is_file() else {}

    def sweep(ms):
        section_sweep(tuned, ms)
        RESULTS["tuned"] = tuned
        (out / tuning.device_file(name).name).write_text(json.dumps(tuned, indent=1, sort_keys=True))
        if a.write_tuned:
            tuning.TUNED_DIR.mkdir(exist_ok=True)
            tuning.device_file(name).write_text(json.dumps(tuned, indent=1, sort_keys=True))
            tuning._table.cache_clear()
        save()

    for section in sections:
        if section == "sweep":
            sweep((1, 16))
        elif section in ("sweep1", "sweep16"):
            sweep((int(section[5:]),))
        elif section == "e2e":
            section_e2e(baselines=a.baselines)
            save()
        elif section == "kernels":
            section_kernels(copy_bw)
            save()
        elif section != "env":
            raise SystemExit(f"unknown section {section!r}")
    log(f"probe done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
