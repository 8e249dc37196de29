"""python -m bench.layer_probe: one launch per decoder layer against the per-op layer, batch 1, on a GPU.

For each preset, a model of random weights with all its layers, one token at context `--ctx`: the
chain of every layer (the decode step without embedding and head) timed in a CUDA graph
(measure.timing) twice - each layer as the per-op path runs it (torch_impl's fused kernels, PDL), and
each layer as one launch of torch_impl/kernels/decode_layer.py (as many programs as fit at once) -
in the same process. Prints a table and, with --out, writes the rows as JSON: microseconds per layer,
the ratio, the grid size, the largest difference of the final hidden state between the two paths,
the error flag of the bounded waits, and from one more launch with the kernel's timers
(%globaltimer) each stage's mean wait and work per task and its span within the launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from common import interrupt
from common.config import PRESETS, Qwen3Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.layer_probe", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="Qwen3-0.6B,Qwen3-8B", help="comma-separated presets (default %(default)s)")
    p.add_argument("--ctx", type=int, default=300, help="context length of the token (default %(default)s)")
    p.add_argument("--layers", type=int, default=0, help="layers in the chain (default 0: the preset's all)")
    p.add_argument("--max-spin", type=int, default=1 << 22, help="bound of every wait (0: unbounded)")
    p.add_argument("--out", type=Path, help="write the rows as JSON to this new file (never overwritten)")
    return p


def probe(preset: str, ctx: int, layers: int, max_spin: int) -> dict:
    import torch

    import torch_impl
    from common.ops import AttentionMeta
    from measure.timing import TimingPlan, time_torch_chain
    from torch_impl.kernels import decode_layer as K

    cfg = Qwen3Config.preset(preset)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    runner = torch_impl.load_random(cfg, fused=True, device="cuda")
    model = runner.model
    n = cfg.num_hidden_layers
    rows = max(256, 1 << (ctx - 1).bit_length())
    caches = [torch.zeros(2, 1, rows, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
              for _ in range(n)]
    step = dict(positions=torch.tensor([ctx - 1], device="cuda"), slots=torch.tensor([ctx - 1], device="cuda"),
                context_lens=torch.tensor([ctx], dtype=torch.int32, device="cuda"),
                block_tables=torch.tensor([[0]], dtype=torch.int32, device="cuda"))
    meta = AttentionMeta(positions=step["positions"], slots=step["slots"].to(torch.int32), cu_seqlens_q=None,
                         cu_seqlens_k=None, context_lens=step["context_lens"], block_tables=step["block_tables"],
                         max_seqlen_q=1, max_seqlen_k=ctx, is_prefill=False)
    x0 = torch.randn(1, cfg.hidden_size, device="cuda").to(torch.bfloat16)
    state = K.LayerState.new(torch.device("cuda"))
    cos_sin = model.model.cos_sin

    def per_op(i, x):
        layer = model.model.layers[i]
        layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = caches[i][0], caches[i][1]
        return layer(meta, x, cos_sin)

    def one_launch(i, x):
        return K.decode_layer(x, model.model.layers[i], caches[i][0], caches[i][1], cos_sin, state=state,
                              eps=cfg.rms_norm_eps, max_spin=max_spin, **step)

    out = {}
    finals = {}
    with torch.inference_mode():
        for name, fn in (("per_op", per_op), ("one_launch", one_launch)):
            x = x0
            for i in range(n):
                x = fn(i, x)
            finals[name] = x.float()
            chain = {"x": x0}

            def call(i, fn=fn, chain=chain):
                chain["x"] = fn(i, chain["x"] if i else x0)
            out[name] = time_torch_chain(call, n, torch.device("cuda"), TimingPlan(), state=chain)["median_s"] / n
        # one more launch of the first layer with the kernel's timers: where its time goes, per stage
        tiles = K.tiles_for("decode_layer", "layer_probe", None, K.LayerTiles, x0.device, x0.dtype, None,
                            **K.layer_shape(cfg, 1))
        timers = K.timer_buffer(cfg, tiles, state.programs, x0.device)
        K.decode_layer(x0, model.model.layers[0], caches[0][0], caches[0][1], cos_sin, state=state, eps=cfg.rms_norm_eps,
                       max_spin=max_spin, timers=timers, **step)
        torch.cuda.synchronize()
        stages = K.stage_times(timers, cfg, tiles, state.programs)
    return dict(preset=preset, stages=stages, ctx=ctx, layers=n, programs=state.programs, error_flag=int(state.error.item()),
                per_op_us=out["per_op"] * 1e6, one_launch_us=out["one_launch"] * 1e6,
                speedup=out["per_op"] / out["one_launch"],
                max_abs_diff=float((finals["per_op"] - finals["one_launch"]).abs().max()),
                device=torch.cuda.get_device_name())


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        print(f"error: --presets: unknown {', '.join(unknown)}; expected any of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if a.out is not None and a.out.exists():
        print(f"error: --out {a.out} exists; refusing to overwrite it", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("error: python -m bench.layer_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    print("| preset | ctx | layers | programs | per-op us/layer | one launch us/layer | speedup | max diff | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        print(f"probing {preset} ...", file=sys.stderr, flush=True)
        r = probe(preset, a.ctx, a.layers, a.max_spin)
        rows.append(r)
        print(f"| {preset} | {r['ctx']} | {r['layers']} | {r['programs']} | {r['per_op_us']:.2f} | "
              f"{r['one_launch_us']:.2f} | {r['speedup']:.3f} | {r['max_abs_diff']:.3g} | {r['error_flag']} |", flush=True)
    print("\n| preset | stage | tasks | wait us (mean) | work us (mean) | from us | to us |\n|---|---|---|---|---|---|---|")
    for r in rows:
        for st in r["stages"]:
            print(f"| {r['preset']} | {st['stage']} | {st['tasks']} | {st['wait_us']:.2f} | {st['work_us']:.2f} | "
                  f"{st['start_us']:.2f} | {st['end_us']:.2f} |")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "x") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    interrupt.main(main)
