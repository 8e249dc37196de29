"""The tuners: `python -m jax_impl.tune` and `python -m torch_impl.tune` (the same flags).

    python -m torch_impl.tune --preset Qwen3-8B --batch 1,32 --budget-s 540
    python -m jax_impl.tune --model ~/models/Qwen3-0.6B

For every kernel of common.ops at the shapes of each model and batch bucket, time each candidate
tile (common.tile_rules.candidates) and the plain op, in chains over distinct per-layer buffers (far
past the L2; measure.op_chains, as `python -m bench kernels`): torch with CUDA events over a graph
replay, jax with its profiler's kernel time. The fastest becomes the table entry ("plain" when
the plain op wins: that is the fused-or-plain choice), written at once to the user's table
(common.tiles.write_entry) - so a sweep can span several commands of ten minutes: a rerun skips
every entry the table already has (`--redo` measures them again). `--smoke` runs tiny shapes on
CPU in the interpreters (tests), writing to `--out`: one batch, one context, two candidate tiles
per kernel unless the flags name more (`plan` lists what a command would measure).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import types
from pathlib import Path

from common import argparsing, backend, formats, progress, tile_rules, tiles
from common.config import PRESETS, ConfigError, Qwen3Config, shrink
from common.ops import KERNEL_OP
from measure.op_chains import Case, chain_layers, setup, time_chain
from measure.timing import TimingPlan

DEFAULT_BATCH, SMOKE_BATCH = "1,8,32,128", "1"
DEFAULT_CONTEXTS, SMOKE_CONTEXTS = "512,4096", "64"
SMOKE_SIZE = 16  # --smoke: hidden, intermediate and head_dim of the tiny shapes (smoke_config)


def _sizes(text: str, *, empty_ok: bool = False) -> list[int]:
    """argparse type of --batch, --contexts, --prefill: comma-separated positive integers."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) < len(parts) or any(v < 1 for v in values) or not (values or empty_ok):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers such as 1,8,32")
    return values


def _lengths(text: str) -> list[int]:
    return _sizes(text, empty_ok=True)


def _seconds(text: str) -> float:
    """argparse type of --budget-s: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _kernels(text: str) -> list[str]:
    """argparse type of --kernels: some of KERNEL_OP, comma-separated."""
    names = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in names if k not in KERNEL_OP] or ([] if names else [text])
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: unknown; expected some of {', '.join(KERNEL_OP)}")
    return names


def _preset(name: str) -> tuple[str, Qwen3Config]:
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"{name!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    return name, PRESETS[name]


def _model(directory: str) -> tuple[str, Qwen3Config]:
    """argparse type of --model: a checkpoint directory's name and config (its config.json read now)."""
    try:
        return Path(directory).name, Qwen3Config.from_pretrained(directory)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser(prog: str) -> argparse.ArgumentParser:
    """The tuners' flags; each help text states its default in words (--batch and --contexts: None
    until `_setup` picks the sizes of a sweep or of --smoke)."""
    p = argparsing.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], type=_model, metavar="DIR",
                   help="checkpoint directory (its config.json); repeatable")
    p.add_argument("--preset", action="append", default=[], type=_preset, metavar="NAME",
                   help=f"a preset, no checkpoint needed: {', '.join(PRESETS)}; repeatable")
    p.add_argument("--batch", type=_sizes, default=None, metavar="SIZES",
                   help=f"decode batch sizes (token rows) to tune (default: {DEFAULT_BATCH}; with --smoke: "
                        f"{SMOKE_BATCH})")
    p.add_argument("--contexts", type=_sizes, default=None, metavar="SIZES",
                   help=f"decode-attention cache capacities to tune (default: {DEFAULT_CONTEXTS}; with --smoke: "
                        f"{SMOKE_CONTEXTS})")
    p.add_argument("--prefill", type=_lengths, default=[], metavar="LENGTHS",
                   help="prefill prompt lengths to tune (default: none; prefill attention is tuned only at these)")
    p.add_argument("--kernels", type=_kernels, default=list(KERNEL_OP), metavar="NAMES",
                   help=f"kernels to tune, comma-separated, some of {', '.join(KERNEL_OP)} (default: all)")
    p.add_argument("--budget-s", type=_seconds, default=None, metavar="SECONDS",
                   help="stop after this many seconds; a rerun resumes (default: no limit)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="table to write: a new file or a tile table of this framework, extended (default: your "
                        "table for this GPU)")
    p.add_argument("--redo", action="store_true", help="measure entries the table already has")
    p.add_argument("--quantization", choices=formats.cli_choices(), default="none",
                   help="tune the projections on weights of this format (their own table rows, dtype " +
                        " / ".join(repr(formats.get(n).tile_dtype("bfloat16")) for n in formats.QUANTIZED) +
                        ") (default: none)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny shapes on CPU in the interpreters (tests), at most two candidate tiles per "
                        f"kernel, batch {SMOKE_BATCH} and context {SMOKE_CONTEXTS} unless --batch/--contexts say "
                        f"otherwise; needs --out")
    return p


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    case: Case
    shape: dict  # the lookup's shape of `kernel`
    candidates: tuple = ()  # the tiles to time (common.tile_rules.candidates; `plan` fills them in)


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
                for layout in backend.get(framework).layouts:
                    out.append(Job("decode_attention", Case(name, cfg, "decode_attention", "decode", m, c, layout),
                                   dict(batch=m, num_kv_heads=cfg.num_key_value_heads, max_context=c,
                                        one_block=layout == "one-block")))
    for t in prefill:
        if "prefill_attention" in kernels:
            out.append(Job("prefill_attention", Case(name, cfg, "prefill_attention", "prefill", t),
                           dict(max_seqlen_q=t, head_dim=d)))
    return out


@dataclasses.dataclass
class Budget:
    """--budget-s: a sweep stops between measurements once it is spent (None: no limit)."""

    seconds: float | None
    start: float = dataclasses.field(default_factory=lambda: time.monotonic())

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds


class Tuner:
    def __init__(self, framework: str, device, info: tiles.Device, out: Path, plan: TimingPlan, smoke: bool):
        self.fw, self.device, self.info, self.out, self.plan, self.smoke = framework, device, info, out, plan, smoke
        self.backend = backend.get(framework)

    def _ops(self, kernel: str, t):
        """The op of `kernel` bound to candidate tiles (mlp: gate/up tiles, the down shape's best)."""
        op = KERNEL_OP[kernel]
        fn = self.backend.kernel(op, interpret=None if self.smoke else False)
        if kernel == "mlp_gate_up":
            fn = functools.partial(fn, tiles=t, down_tiles=self._down)
        elif t is not None:
            fn = functools.partial(fn, tiles=t)
        return types.SimpleNamespace(**{op: fn})

    def run(self, job: Job, dtype: str, bar, budget: Budget) -> str:
        """Time `job`'s candidates and write the fastest: "written", "failed" (no candidate ran)
        or "stopped" (the budget ran out first; nothing written)."""
        key = tiles.shape_key(job.kernel, dtype, job.shape)
        if job.kernel == "mlp_gate_up":  # the down projection's best tiles, from this run or the tables
            i, h = job.case.cfg.intermediate_size, job.case.cfg.hidden_size
            self._down = tiles.lookup("linear_residual", self.fw, self.info, dtype=dtype, m=job.case.tokens, n=h,
                                      k=i).tiles
        cands = job.candidates
        n = 1 if self.smoke else chain_layers(job.case)
        carry, layers, shared, body_for = setup(job.case, n, self.fw, self.device)
        results: list[tuple[float, str, object]] = []
        stopped = False
        for path, t in [("plain", None)] + [("fused", c) for c in cands]:
            stopped = budget.spent()
            if stopped:
                break
            try:
                ops = self.backend.plain if path == "plain" else self._ops(job.kernel, t)
                r = time_chain(self.fw, body_for(ops), carry, layers, shared, self.plan, self.device)
                results.append((r["median_s"], path, t))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot compile or run is skipped
                progress.note(f"  {key} {t}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            bar.update(1)
        fused = [r for r in results if r[1] == "fused"]
        if stopped or not fused:
            progress.note(f"{key}: stopped (budget)" if stopped else f"{key}: no candidate ran")
            return "stopped" if stopped else "failed"
        best = min(results, key=lambda r: r[0])
        best_fused = min(fused, key=lambda r: r[0])
        plain_s = next((r[0] for r in results if r[1] == "plain"), None)
        note = f"plain {plain_s * 1e6:.2f} us" if plain_s else None
        tiles.write_entry(self.fw, self.info, key, best[1], best_fused[2], us=best[0] * 1e6, note=note, table=self.out)
        progress.note(f"{key}: {best[1]} {best[0] * 1e6:.2f} us ({best_fused[2]})")
        return "written"


def smoke_config(cfg: Qwen3Config, fmt: str | None) -> Qwen3Config:
    """--smoke's shapes of `cfg`: the smallest with its GQA ratio - hidden and intermediate 16, one kv
    head of head_dim 16 (a block-scaled format: head_dim and intermediate one block, as its weights need)."""
    small = shrink(cfg, layers=1, width=cfg.hidden_size, vocab=256)
    block = max(SMOKE_SIZE, formats.get(fmt).row_block)
    return dataclasses.replace(small, head_dim=block, intermediate_size=block)


def _configs(p: argparse.ArgumentParser, a, fmt: str | None) -> list[tuple[str, Qwen3Config]]:
    out = a.preset + a.model
    if not out:
        p.error("give --preset NAME or --model DIR (repeatable)")
    return [(n, smoke_config(c, fmt)) for n, c in out] if a.smoke else out


def _jobs(p: argparse.ArgumentParser, a, framework: str, fmt: str | None) -> list[Job]:
    """Every job the flags name, each shape once; a usage error when they name none."""
    kernels = [k for k in a.kernels if k in QUANTIZED_KERNELS] if fmt else a.kernels  # only these read weights
    if not kernels:
        p.error(f"--quantization {fmt} tunes only {', '.join(QUANTIZED_KERNELS)}; --kernels names none of them")
    jobs = [j for name, cfg in _configs(p, a, fmt)
            for j in jobs_for(name, cfg, kernels, a.batch, a.contexts, a.prefill, framework, fmt)]
    if not jobs:
        p.error("--kernels prefill_attention needs --prefill LENGTHS (the prompt lengths to tune)")
    return jobs


def _device(framework: str, smoke: bool):
    """The device to time on and what the tables read of it."""
    b = backend.get(framework)
    device = b.device(gpu=not smoke)
    return device, b.device_info(device)


def _out(p: argparse.ArgumentParser, a, framework: str, info: tiles.Device) -> Path:
    """The table to write: --out, else the user's table of this GPU - checked before anything is
    measured: a new file in a writable folder, or a tile table of this framework (extended)."""
    out = a.out or tiles.table_path(framework, info, user=True)
    try:
        tiles.check_writable(framework, out, make_folders=a.out is None)
    except ValueError as e:
        p.error(f"{'--out' if a.out is not None else 'your tile table'}: {e}")
    return out


def _sweep(tuner: Tuner, todo: list[Job], dtype: str, budget: Budget, total: int) -> dict[str, int]:
    """Run the jobs in order until the budget is spent; how many ended in each status."""
    counts = {"written": 0, "failed": 0, "stopped": 0}
    with progress.bar(total, f"tune {tuner.fw}", unit="run", delay=0, leave=True) as bar:
        for job in todo:
            if budget.spent():
                break
            counts[tuner.run(job, dtype, bar, budget)] += 1
    return counts


def _setup(framework: str, argv):
    """Parse the flags and check them, the table and the device: a namespace of what `main` runs,
    or None when there is no GPU (said on stderr). Nothing is measured."""
    prog = f"python -m {framework}_impl.tune"
    p = parser(prog)
    a = p.parse_args(argv)
    if a.smoke and a.out is None:
        p.error("--smoke writes to --out FILE (never to your table)")
    a.batch = a.batch or _sizes(SMOKE_BATCH if a.smoke else DEFAULT_BATCH)
    a.contexts = a.contexts or _sizes(SMOKE_CONTEXTS if a.smoke else DEFAULT_CONTEXTS)
    fmt = None if a.quantization == "none" else a.quantization
    jobs = _jobs(p, a, framework, fmt)
    if a.smoke:
        backend.get(framework).use_interpreter()  # before the kernels are imported
    device, info = _device(framework, a.smoke)
    if not info.is_gpu and not a.smoke:
        print(f"error: {prog}: no CUDA GPU here ({info.name}); tuning needs one "
              f"(--smoke runs tiny shapes in the interpreters)", file=sys.stderr)
        return None
    out = _out(p, a, framework, info)
    done = set() if a.redo else set(tiles._read_table(out, framework))
    dtype = formats.get(fmt).tile_dtype("bfloat16")
    todo: dict[str, Job] = {}  # each shape key once (two models, or a model whose o_proj is its down)
    for j in jobs:
        key = tiles.shape_key(j.kernel, dtype, j.shape)
        if key not in done and key not in todo:
            todo[key] = dataclasses.replace(j, candidates=tuple(
                tile_rules.candidates(j.kernel, framework, info, j.shape, smoke=a.smoke)))
    return types.SimpleNamespace(prog=prog, a=a, device=device, info=info, out=out, done=done, dtype=dtype,
                                 todo=list(todo.values()))


def plan(framework: str, argv=None) -> list[Job]:
    """What `main(framework, argv)` would measure, in order, each job with its candidate tiles (the
    plain op is timed too); nothing is timed. Usage errors exit as in `main`; [] without a GPU."""
    s = _setup(framework, argv)
    return s.todo if s else []


def main(framework: str, argv=None) -> int:
    """The tuner's command line: 0 when it wrote entries (or had none left to write), 1 when it
    measured nothing, 2 on bad input or without a GPU (--smoke aside)."""
    s = _setup(framework, argv)
    if s is None:
        return 2
    plan_ = TimingPlan(repeats=1, target_s=0.0, max_iters=1, warmup=1) if s.a.smoke else \
        TimingPlan(repeats=5, target_s=0.01, warmup=2)
    tuner = Tuner(framework, s.device, s.info, s.out, plan_, s.a.smoke)
    total = sum(1 + len(j.candidates) for j in s.todo)
    progress.note(f"{framework}_impl.tune on {s.info.name}: {len(s.todo)} shapes to tune "
                  f"({len(s.done)} in {s.out} already)")
    counts = _sweep(tuner, s.todo, s.dtype, Budget(s.a.budget_s), total)
    return _report(s.prog, s.a, s.out, len(s.todo), counts)


def _report(prog: str, a, out: Path, todo: int, counts: dict[str, int]) -> int:
    left = todo - counts["written"] - counts["failed"]
    if left:
        progress.note(f"budget spent (--budget-s {a.budget_s:g}): {left} of {todo} shapes left; "
                      f"rerun the same command to go on")
    if todo and not counts["written"]:
        why = "the budget ran out before the first shape was measured" if left else \
            f"no candidate ran at any of the {todo} shapes (the lines above say why)"
        print(f"error: {prog}: nothing measured: {why}; no entry written to {out}", file=sys.stderr)
        return 1
    if counts["failed"]:
        progress.note(f"{counts['failed']} of {todo} shapes had no candidate that ran (the lines above say why)")
    print(out)
    return 0
