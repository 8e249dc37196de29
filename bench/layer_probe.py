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
    p.add_argument("--tiles", type=_tile_specs, default=[None], metavar="SPEC[;SPEC...]",
                   help="layer tiles to time, each a row: LayerTiles fields as name=value,... (e.g. "
                        "'block_n=32,num_splits=4;num_splits=1'; 'default': the lookup's) (default: default)")
    p.add_argument("--out", type=Path, help="write the rows as JSON to this new file (never overwritten)")
    return p


def _tile_specs(text: str) -> list[dict | None]:
    """argparse type of --tiles: ';'-separated specs, each 'default' or LayerTiles fields name=value,..."""
    from common.tiles import LayerTiles

    specs = []
    for spec in (s.strip() for s in text.split(";") if s.strip()):
        if spec == "default":
            specs.append(None)
            continue
        try:
            fields = {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
            LayerTiles(**fields)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected LayerTiles fields as name=value,... ({e})") from None
        specs.append(fields)
    if not specs:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one spec")
    return specs


def probe(preset: str, ctx: int, layers: int, max_spin: int, variants=(None,)) -> list[dict]:
    """One row per tile variant (None: the lookup's tiles), the per-op chain timed once for all."""
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
    cos_sin = model.model.cos_sin
    default = K.tiles_for("decode_layer", "layer_probe", None, K.LayerTiles, x0.device, x0.dtype, None,
                          **K.layer_shape(cfg, 1))

    def per_op(i, x, _):
        layer = model.model.layers[i]
        layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = caches[i][0], caches[i][1]
        return layer(meta, x, cos_sin)

    def one_launch(i, x, v):
        return K.decode_layer(x, model.model.layers[i], caches[i][0], caches[i][1], cos_sin, state=v["state"],
                              eps=cfg.rms_norm_eps, tiles=v["tiles"], max_spin=max_spin, **step)

    def timed(fn, v):
        """(seconds per layer of the chain in a CUDA graph, the final hidden state of one pass)."""
        x = x0
        for i in range(n):
            x = fn(i, x, v)
        chain = {"x": x0}

        def call(i):
            chain["x"] = fn(i, chain["x"] if i else x0, v)
        return time_torch_chain(call, n, torch.device("cuda"), TimingPlan(), state=chain)["median_s"] / n, x.float()

    rows = []
    with torch.inference_mode():
        per_op_s, per_op_final = timed(per_op, None)
        for fields in variants:
            tiles = default if fields is None else K.LayerTiles(**fields)
            v = dict(tiles=tiles, state=K.LayerState.new(torch.device("cuda")))
            one_s, final = timed(one_launch, v)
            # one more launch of the first layer with the kernel's timers: where its time goes, per stage
            state = v["state"]
            timers = K.timer_buffer(cfg, tiles, state.programs, x0.device)
            K.decode_layer(x0, model.model.layers[0], caches[0][0], caches[0][1], cos_sin, state=state,
                           eps=cfg.rms_norm_eps, tiles=tiles, max_spin=max_spin, timers=timers, **step)
            torch.cuda.synchronize()
            rows.append(dict(preset=preset, tiles=dataclasses.asdict(tiles), default_tiles=fields is None,
                             stages=K.stage_times(timers, cfg, tiles, state.programs), ctx=ctx, layers=n,
                             programs=state.programs, error_flag=int(state.error.item()),
                             per_op_us=per_op_s * 1e6, one_launch_us=one_s * 1e6, speedup=per_op_s / one_s,
                             max_abs_diff=float((per_op_final - final).abs().max()),
                             device=torch.cuda.get_device_name()))
    return rows


def _tiles_text(row: dict) -> str:
    t = row["tiles"]
    return ("default " if row["default_tiles"] else "") + \
        f"n{t['block_n']} k{t['block_k']} kv{t['block_kv']} s{t['num_splits']} w{t['num_warps']}"


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
    print("| preset | tiles | ctx | layers | programs | per-op us/layer | one launch us/layer | speedup | max diff | "
          "errors |\n|---|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        print(f"probing {preset} ...", file=sys.stderr, flush=True)
        for r in probe(preset, a.ctx, a.layers, a.max_spin, a.tiles):
            rows.append(r)
            print(f"| {preset} | {_tiles_text(r)} | {r['ctx']} | {r['layers']} | {r['programs']} | {r['per_op_us']:.2f} | "
                  f"{r['one_launch_us']:.2f} | {r['speedup']:.3f} | {r['max_abs_diff']:.3g} | {r['error_flag']} |",
                  flush=True)
    print("\n| preset | tiles | stage | tasks | wait us (mean) | work us (mean) | from us | to us |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        for st in r["stages"]:
            print(f"| {r['preset']} | {_tiles_text(r)} | {st['stage']} | {st['tasks']} | {st['wait_us']:.2f} | "
                  f"{st['work_us']:.2f} | {st['start_us']:.2f} | {st['end_us']:.2f} |")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "x") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    interrupt.main(main)
