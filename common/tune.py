"""The tuners: `python -m jax_impl.tune` and `python -m torch_impl.tune` (the same flags).

    python -m torch_impl.tune --preset Qwen3-8B --batch 1,32 --budget-s 540
    python -m jax_impl.tune --model ~/models/Qwen3-0.6B

For every kernel of common.ops at the shapes of each model and batch bucket, time each candidate
tile (common.tile_rules.candidates) and the plain op, in chains over distinct per-layer buffers (far
past the L2; common.op_chains, as `python -m bench kernels`): torch with CUDA events over a graph
replay, jax with its profiler's kernel time. The fastest becomes the table entry ("plain" when
the plain op wins: that is the fused-or-plain choice), written at once to the user's table
(common.tiles.write_entry) - so a sweep can span several commands of ten minutes: a rerun skips
every entry the table already has (`--redo` measures them again). `--smoke` runs tiny shapes on
CPU in the interpreters (tests), writing to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
import time
import types
from pathlib import Path

from common import argparsing, progress, tile_rules, tiles
from common.config import PRESETS, Qwen3Config, shrink
from common.op_chains import Case, chain_layers, setup, time_chain
from common.timing import TimingPlan

KERNEL_OP = {"rmsnorm_qkv": "rmsnorm_qkv", "mlp_gate_up": "mlp", "linear_residual": "linear_residual",
             "decode_attention": "decode_attention", "prefill_attention": "prefill_attention", "rms_norm": "rms_norm"}


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparsing.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="DIR", help="checkpoint directory (its config)")
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help=f"a preset, no checkpoint needed: {', '.join(PRESETS)}")
    p.add_argument("--batch", default="1,8,32,128", help="decode batch sizes (token rows) to tune")
    p.add_argument("--contexts", default="512,4096", help="decode-attention cache capacities to tune")
    p.add_argument("--prefill", default="", help="prefill prompt lengths to tune (prefill attention)")
    p.add_argument("--kernels", default=",".join(KERNEL_OP), help="kernels to tune")
    p.add_argument("--budget-s", type=float, default=None, help="stop after this many seconds (a rerun resumes)")
    p.add_argument("--out", type=Path, default=None, help="table to write (default: your table for this GPU)")
    p.add_argument("--redo", action="store_true", help="measure entries the table already has")
    p.add_argument("--quantization", choices=["none", "int8", "fp8"], default="none",
                   help="tune the projections on int8 or fp8 weights (their own table rows, dtype "
                        "'bfloat16-int8' / 'bfloat16-fp8')")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the interpreters (tests)")
    return p


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    case: Case
    shape: dict  # the lookup's shape of `kernel`


QUANTIZED_KERNELS = ("linear_residual", "rmsnorm_qkv", "mlp_gate_up")  # the kernels that read the weights


def jobs_for(name: str, cfg: Qwen3Config, kernels, batches, contexts, prefill, framework: str,
             fmt: str | None = None) -> list[Job]:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    out = []
    for m in batches:
        if "linear_residual" in kernels:  # the MLP's down projection first: mlp's candidates use its best
            out.append(Job("linear_residual", Case(name, cfg, "linear_residual", "decode", m, k=i, fmt=fmt),
                           dict(m=m, n=h, k=i)))
            out.append(Job("linear_residual", Case(name, cfg, "linear_residual", "decode", m, fmt=fmt),
                           dict(m=m, n=h, k=cfg.q_size)))
        if "rmsnorm_qkv" in kernels:
            out.append(Job("rmsnorm_qkv", Case(name, cfg, "rmsnorm_qkv", "decode", m, fmt=fmt),
                           dict(m=m, n=cfg.qkv_size, k=h, head_dim=d)))
        if "mlp_gate_up" in kernels:
            out.append(Job("mlp_gate_up", Case(name, cfg, "mlp", "decode", m, fmt=fmt), dict(m=m, n=2 * i, k=h)))
        if "rms_norm" in kernels:
            out.append(Job("rms_norm", Case(name, cfg, "rms_norm", "decode", m), dict(m=m, n=h)))
        if "decode_attention" in kernels:
            for c in contexts:
                for layout in (("one-block",) if framework == "jax" else ("one-block", "paged")):
                    out.append(Job("decode_attention", Case(name, cfg, "decode_attention", "decode", m, c, layout),
                                   dict(batch=m, num_kv_heads=cfg.num_key_value_heads, max_context=c,
                                        one_block=layout == "one-block")))
    for t in prefill:
        if "prefill_attention" in kernels:
            out.append(Job("prefill_attention", Case(name, cfg, "prefill_attention", "prefill", t),
                           dict(max_seqlen_q=t, head_dim=d)))
    return out


class Tuner:
    def __init__(self, framework: str, device, info: tiles.Device, out: Path, plan: TimingPlan, smoke: bool):
        self.fw, self.device, self.info, self.out, self.plan, self.smoke = framework, device, info, out, plan, smoke
        self.K = importlib.import_module(f"{framework}_impl.kernels")
        self.P = importlib.import_module(f"{framework}_impl.plain")

    def done(self) -> set[str]:
        return set(tiles._read_table(self.out, self.fw)) if self.out.is_file() else set()

    def _ops(self, kernel: str, t):
        """The op of `kernel` bound to candidate tiles (mlp: gate/up tiles, the down shape's best)."""
        op = KERNEL_OP[kernel]
        fn = getattr(self.K, op)
        if self.fw == "jax" and not self.smoke:
            fn = functools.partial(fn, interpret=False)
        if kernel == "mlp_gate_up":
            fn = functools.partial(fn, tiles=t, down_tiles=self._down)
        elif t is not None:
            fn = functools.partial(fn, tiles=t)
        return types.SimpleNamespace(**{op: fn})

    def run(self, job: Job, dtype: str, bar, deadline: float | None) -> str:
        key = tiles.shape_key(job.kernel, dtype, job.shape)
        if job.kernel == "mlp_gate_up":  # the down projection's best tiles, from this run or the tables
            i, h = job.case.cfg.intermediate_size, job.case.cfg.hidden_size
            self._down = tiles.lookup("linear_residual", self.fw, self.info, dtype=dtype, m=job.case.tokens, n=h,
                                      k=i).tiles
        cands = tile_rules.candidates(job.kernel, self.fw, self.info, job.shape, smoke=self.smoke)
        n = 2 if self.smoke else chain_layers(job.case)
        carry, layers, shared, body_for = setup(job.case, n, self.fw, self.device)
        results: list[tuple[float, str, object]] = []
        for path, t in [("plain", None)] + [("fused", c) for c in cands]:
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                ops = self.P if path == "plain" else self._ops(job.kernel, t)
                r = time_chain(self.fw, body_for(ops), carry, layers, shared, self.plan, self.device)
                results.append((r["median_s"], path, t))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot compile or run is skipped
                progress.note(f"  {key} {t}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            bar.update(1)
        fused = [r for r in results if r[1] == "fused"]
        if not fused or (deadline is not None and time.monotonic() > deadline):
            return f"{key}: stopped (budget)" if fused else f"{key}: no candidate ran"
        best = min(results, key=lambda r: r[0])
        best_fused = min(fused, key=lambda r: r[0])
        plain_s = next((r[0] for r in results if r[1] == "plain"), None)
        note = f"plain {plain_s * 1e6:.2f} us" if plain_s else None
        tiles.write_entry(self.fw, self.info, key, best[1], best_fused[2], us=best[0] * 1e6, note=note, table=self.out)
        return f"{key}: {best[1]} {best[0] * 1e6:.2f} us ({best_fused[2]})"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def configs(a) -> list[tuple[str, Qwen3Config]]:
    out = [(name, PRESETS[name]) for name in a.preset if name in PRESETS]
    bad = [name for name in a.preset if name not in PRESETS]
    if bad:
        raise SystemExit(f"--preset {bad[0]}: unknown; expected one of {', '.join(PRESETS)}")
    for d in a.model:
        out.append((Path(d).name, Qwen3Config.from_pretrained(d)))
    if not out:
        raise SystemExit("give --preset NAME or --model DIR (repeatable)")
    if a.smoke:
        out = [(n, shrink(c, layers=1, width=8, vocab=256)) for n, c in out]
    return out


def main(framework: str, argv=None) -> int:
    a = parser(f"python -m {framework}_impl.tune").parse_args(argv)
    cfgs = configs(a)
    kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNEL_OP]
    if unknown:
        raise SystemExit(f"--kernels {unknown[0]}: unknown; expected some of {', '.join(KERNEL_OP)}")
    fmt = None if a.quantization == "none" else a.quantization
    if fmt:  # only the projections read the weights
        kernels = [k for k in kernels if k in QUANTIZED_KERNELS]
    dtype = "bfloat16" if fmt is None else f"bfloat16-{fmt}"
    lib = importlib.import_module(f"{framework}_impl.kernels._lib")
    if framework == "torch":
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
        info = lib.device_info(device)
    else:
        device, info = None, lib.device_info()
    if not info.is_gpu and not a.smoke:
        print(f"python -m {framework}_impl.tune: no CUDA GPU here ({info.name}); tuning needs one "
              f"(--smoke runs tiny shapes in the interpreters)", file=sys.stderr)
        return 2
    if a.smoke and a.out is None:
        raise SystemExit("--smoke writes to --out FILE (never to your table)")
    out = a.out or tiles.table_path(framework, info, user=True)
    plan = TimingPlan(repeats=1, target_s=0.0, max_iters=1, warmup=1) if a.smoke else \
        TimingPlan(repeats=5, target_s=0.01, warmup=2)
    tuner = Tuner(framework, device, info, out, plan, a.smoke)
    done = set() if a.redo else tuner.done()
    todo = [j for name, cfg in cfgs for j in jobs_for(name, cfg, kernels, _ints(a.batch), _ints(a.contexts),
                                                        _ints(a.prefill), framework, fmt)
            if tiles.shape_key(j.kernel, dtype, j.shape) not in done]
    deadline = time.monotonic() + a.budget_s if a.budget_s else None
    total = sum(1 + len(tile_rules.candidates(j.kernel, framework, info, j.shape, smoke=a.smoke)) for j in todo)
    progress.note(f"{framework}_impl.tune on {info.name}: {len(todo)} shapes to tune ({len(done)} in {out} already)")
    with progress.bar(total, f"tune {framework}", unit="run", delay=0, leave=True) as bar:
        for job in todo:
            if deadline is not None and time.monotonic() > deadline:
                progress.note("budget spent: rerun the same command to go on")
                break
            progress.note(tuner.run(job, dtype, bar, deadline))
    print(out)
    return 0
