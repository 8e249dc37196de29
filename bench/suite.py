"""The run commands of `python -m bench` (kernels, decode, stages, ttft, all): their flags
(`parser`) and the run (`run`: the ceilings, one job per framework or implementation and model, the
results folder). `run_main(argv)` is `python -m bench <command> ...`: the entry point
(bench/__main__.py, whose docstring is the usage --help prints) and `python -m bench check`
(bench/check.py) both call it, and share its helpers `_early_env` (settings that precede the first
jax / triton import), `_progress` and `refuse_existing`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from common import argparsing, formats

RUN_COMMANDS = ("kernels", "decode", "stages", "ttft", "all")
DEFAULT_MODELS = "Qwen3-0.6B,Qwen3-8B"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("bench-results")  # under the current directory, never inside the source tree
SMOKE_SHRINK = dict(layers=2, width=8, vocab=512)  # common.config.shrink's arguments under --smoke
OUTPUT_NAMES = ("bench.json", "bench.md", "decode.png", "kernels_bw.png")  # what a run writes to --out
SMOKE_SKIP = {
    "jax-fused": "the Pallas interpreter inside the decode loop takes minutes on CPU; same code path as jax-plain",
    "torch-fused": "the Triton interpreter takes seconds per token on CPU; same code path as torch-plain",
    "hf-compile": "torch.compile takes minutes on CPU",
    "nanovllm": "nano-vllm's engine runs on a CUDA GPU",
}


def _early_env(argv: list[str]) -> None:
    """Settings that must precede the first jax / triton import."""
    if "--smoke" in argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels in the interpreter on CPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Pallas in interpret mode
    else:
        # jax must not grab 75% of the GPU up front: this process and, with --in-process, the
        # jobs hold jax and torch side by side.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag}={text!r}: expected comma-separated positive integers") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"error: {flag}={text!r}: expected comma-separated positive integers")
    return vals


def _positive_int(text: str) -> int:
    """argparse type of the one-number flags: a usage error (one line, exit 2) unless a positive integer."""
    try:
        val = int(text)
    except ValueError:
        val = 0
    if val < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return val


def refuse_existing(out: Path, names=OUTPUT_NAMES, flag: str = "--out") -> None:
    """One error line when `out` already holds any of the result files a run writes: never overwritten."""
    found = [n for n in names if (Path(out) / n).exists()]
    if found:
        raise SystemExit(f"error: {flag} {out}: already holds {', '.join(found)}; results are never overwritten "
                         f"- choose another folder or move those away")


def model_label(preset: str, smoke: bool) -> str:
    """What rows call a model: the preset's name, or under --smoke what was run instead of it."""
    if not smoke:
        return preset
    return (f"{preset} shrunk ({SMOKE_SHRINK['layers']} layers, 1/{SMOKE_SHRINK['width']} width, "
            f"vocab {SMOKE_SHRINK['vocab']})")


def parser(usage: str | None = None) -> argparse.ArgumentParser:
    """The run commands' flags; `usage` (bench/__main__.py's docstring) is what --help prints."""
    from bench.decode import IMPLS
    from bench.kernels import OPS
    from bench.stages import STAGES

    p = argparsing.ArgumentParser(prog="python -m bench", description=usage.splitlines()[0] if usage else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=usage)
    p.add_argument("command", choices=RUN_COMMANDS)
    p.add_argument("--out", type=Path, help=f"results folder (default ./{DEFAULT_OUT}/<gpu-slug>/ under the current "
                                              "directory); one that already holds results is refused")
    p.add_argument("--models", help=f"comma-separated presets, any of {', '.join(_preset_names())} "
                                    f"(default {DEFAULT_MODELS}; --smoke: Qwen3-0.6B, shrunk)")
    p.add_argument("--batch", help="decode batch sizes (default 1,8,32,128; --smoke: 2)")
    p.add_argument("--prefill", help="prefill token counts of the kernel rows (default 512,4096; --smoke: 16)")
    p.add_argument("--ctx", type=_positive_int, help="context length of the decode_attention rows (default 1024)")
    p.add_argument("--stages", help=f"stages: which (default all: {','.join(STAGES)})")
    p.add_argument("--stage-ctx", help="stages: the attention stage's contexts (default 1024,8192; --smoke: 32)")
    p.add_argument("--hf-batch", help="batch sizes for the transformers peers (default 1: they are slow)")
    p.add_argument("--impls", help=f"decode implementations (default all: {','.join(IMPLS)})")
    p.add_argument("--tensor-parallel-size", metavar="N[,N...]", default="1",
                   help="decode: run each twin's rows at these tensor-parallel sizes (GPUs of this machine; "
                        "transformers' rows at 1); rows carry `tensor_parallel_size`")
    p.add_argument("--quantization", metavar=",".join(formats.cli_choices()),
                   help="decode: run each chosen twin's fused row in these weight formats (none = bf16; a format "
                        "F adds jax-F for jax-fused); rows carry `quantization`. stages: the projections' and "
                        "head's formats (default all)")
    p.add_argument("--tiles", metavar="tuned,untuned", default="tuned",
                   help="decode: run each twin's fused rows with the tile tables (tuned, the default) and/or "
                        "without them (untuned: the default rule alone, as on a GPU without a table; "
                        "QWEN3_TILE_TABLES=off); rows carry `tiles`")
    p.add_argument("--sampling", metavar="T,K,P",
                   help="decode: sample with temperature T, top-k K and top-p P (e.g. 0.7,40,0.95, seed 0) "
                        "instead of greedy decoding; rows carry `sampling`")
    p.add_argument("--ops", help=f"kernel ops (default all: {','.join(OPS)})")
    p.add_argument("--frameworks", default="jax,torch", help="kernel frameworks (default jax,torch)")
    p.add_argument("--new-tokens", type=_positive_int, help="decode tokens per run (default 256; --quick 64)")
    p.add_argument("--prompt-len", metavar="N[,N...]",
                   help="prompt tokens per sequence (default 16; --smoke 8); ttft: a list, each length measured")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreter mode, CPU: checks the code runs")
    p.add_argument("--quick", action="store_true", help="fewer repeats and 64 new tokens")
    p.add_argument("--budget-s", type=float, help="skip what is left after this many seconds (rows say so)")
    p.add_argument("--ckpt-dir", type=Path, help="where random checkpoints are written and reused")
    p.add_argument("--random-weights", action="store_true",
                   help="decode: build random weights in GPU memory instead of writing checkpoint files "
                        "(Qwen3-32B's 65 GB need no disk; load times then exclude reading files)")
    p.add_argument("--commit", help="git commit to record when the tree has no .git")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run every job in this process (debugging; the old behaviour) instead of one process per job")
    return p


def _preset_names() -> list[str]:
    from common.config import PRESETS

    return list(PRESETS)


def _progress(msg: str) -> None:
    from common.progress import note

    note(msg)


def _models(a) -> dict:
    from common.config import PRESETS, shrink

    names = [m.strip() for m in (a.models or ("Qwen3-0.6B" if a.smoke else DEFAULT_MODELS)).split(",") if m.strip()]
    bad = [m for m in names if m not in PRESETS]
    if bad or not names:
        raise SystemExit(f"error: --models {a.models!r}: unknown preset(s) {', '.join(bad)}; "
                         f"expected some of {', '.join(PRESETS)}")
    return {model_label(m, a.smoke): shrink(PRESETS[m], **SMOKE_SHRINK) if a.smoke else PRESETS[m] for m in names}


def _choices(text: str | None, allowed, flag: str) -> list[str]:
    if text is None:
        return list(allowed)
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise SystemExit(f"error: {flag}={text!r}: unknown {', '.join(bad)}; expected some of "
                         f"{', '.join(allowed)}")
    return vals


def _torch_device(smoke: bool) -> str | None:
    if smoke:
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def _checkpoint(name: str, cfg, a, tmp: Path, *, tokenizer: bool = False) -> Path:
    from bench import env
    from bench.checkpoints import DEFAULT_DIR, random_checkpoint

    if a.smoke:
        from common.checkpoint import write_checkpoint, write_tokenizer

        path = tmp / env.slug(name)
        if not (path / "config.json").is_file():
            write_checkpoint(path, cfg, dtype="bfloat16", fast=True)
        if tokenizer and not (path / "tokenizer.json").is_file():
            write_tokenizer(path, cfg.vocab_size)
        return path
    return random_checkpoint(name, root=a.ckpt_dir or DEFAULT_DIR, tokenizer=tokenizer)


def _ceilings(a) -> dict:
    """Each framework's copy and matmul ceilings (in a process of its own unless --in-process)."""
    from bench import env, isolate

    by: dict = {}
    for fw in ("torch", "jax"):
        got: list = []
        failure = isolate.run_job(dict(kind="ceilings", framework=fw, smoke=a.smoke, quick=a.quick),
                                  emit=got.append, in_process=a.in_process, progress=_progress)
        by.update(got[0]["by_framework"] if got else {fw: {"error": failure or "the job reported nothing"}})
    return env.combine_ceilings(by)


def _variants(impl: str, tps: list[int], tile_modes: list[str]) -> list[tuple[int, str]]:
    """The (tensor-parallel size, tiles) jobs of one impl: transformers' at (1, tuned); plain rows
    have no tiles."""
    from bench import decode

    if impl.startswith("hf"):
        return [(1, "tuned")]
    modes = tile_modes if decode.tiled(impl) else ["tuned"]
    return [(tp, t) for tp in tps for t in modes]


def run(a) -> int:
    from bench import decode, env, isolate, kernels, report, stages
    from measure.timing import TimingPlan

    t_start, t_start_unix = time.monotonic(), time.time()
    if a.smoke:
        gpu_name = "cpu-smoke"
    else:
        ok, gpu_name = env.has_gpu()
        if not ok:
            print(f"error: no CUDA GPU here ({gpu_name}); the benchmarks need one - "
                  f"run with --smoke for the CPU smoke test", file=sys.stderr)
            return 2
    models = _models(a)
    ops = _choices(a.ops, kernels.OPS, "--ops")
    frameworks = _choices(a.frameworks, kernels.FRAMEWORKS, "--frameworks")
    impls = _choices(a.impls, decode.IMPLS, "--impls")
    if a.quantization is not None:
        impls = decode.with_quantization(impls, _choices(a.quantization, formats.cli_choices(), "--quantization"))
    # --smoke skips by default what costs minutes on CPU and shares its code path with a row that runs
    smoke_skip = {i: SMOKE_SKIP[i] for i in impls if a.smoke and a.impls is None and i in SMOKE_SKIP}
    batches = _ints(a.batch or ("2" if a.smoke else "1,8,32,128"), "--batch")
    tps = _ints(a.tensor_parallel_size, "--tensor-parallel-size")
    tile_modes = _choices(a.tiles, ("tuned", "untuned"), "--tiles")
    prefill = _ints(a.prefill or ("16" if a.smoke else "512,4096"), "--prefill")
    hf_batches = _ints(a.hf_batch or ("2" if a.smoke else "1"), "--hf-batch")
    ctx = a.ctx or (32 if a.smoke else 1024)
    new_tokens = a.new_tokens or (4 if a.smoke else 64 if a.quick else 256)
    sampling = decode.parse_sampling(a.sampling)
    prompt_lens = _ints(a.prompt_len or ("8" if a.smoke else "16"), "--prompt-len")
    if len(prompt_lens) > 1 and a.command != "ttft":
        raise SystemExit(f"error: --prompt-len {a.prompt_len}: {a.command} takes one length (ttft takes a list)")
    prompt_len = prompt_lens[0]
    if a.command in ("decode", "ttft", "all"):
        room = min(c.max_position_embeddings for c in models.values())
        if max(prompt_lens) + new_tokens > room:
            raise SystemExit(f"error: --prompt-len {max(prompt_lens)} + --new-tokens {new_tokens}: more than the "
                             f"{room} positions the chosen models hold")
    runs = 1 if a.smoke else 2 if a.quick else 3
    # wall clock, not time.monotonic(): the jobs' processes compare against it
    deadline_unix = t_start_unix + a.budget_s if a.budget_s else None
    if a.smoke:
        plan = TimingPlan(repeats=2, target_s=0.0, max_iters=1, warmup=1)
        ks = kernels.Settings(plan, min_bytes=0, max_layers=2)
    else:
        plan = TimingPlan(repeats=5, target_s=0.01, warmup=2) if a.quick else TimingPlan(repeats=15, target_s=0.02)
        ks = kernels.Settings(plan)
    out = a.out or Path.cwd() / DEFAULT_OUT / env.slug(gpu_name)
    refuse_existing(out)
    settings = dict(command=a.command, models=list(models), smoke=a.smoke, quick=a.quick, ops=ops,
                    frameworks=frameworks, impls=impls, batches=batches, prefill=prefill, hf_batches=hf_batches,
                    ctx=ctx, prompt_len=prompt_len if a.command != "ttft" else prompt_lens, new_tokens=new_tokens, runs=runs, sampling=sampling,
                    random_weights=a.random_weights, tensor_parallel_sizes=tps, tiles=tile_modes,
                    timing=dataclasses.asdict(plan), min_layer_bytes=ks.min_bytes, budget_s=a.budget_s,
                    isolation="in-process" if a.in_process else "process per job")
    res = report.Results(out, env.collect(smoke=a.smoke, commit=a.commit, argv=a.argv), settings)
    _progress(f"python -m bench {a.command}: {gpu_name}; results in {out}"
              + ("; every job in this process" if a.in_process else "; every job in a process of its own"))
    from common.progress import bar

    torch_device = _torch_device(a.smoke)
    n_jobs = 2 + (len(frameworks) if a.command in ("kernels", "all", "stages") else 0) \
        + (len(frameworks) * len(models) if a.command == "ttft" else 0) \
        + (len(models) * sum(len(_variants(i, tps, tile_modes)) for i in impls) if a.command in ("decode", "all") else 0)
    jobs_bar = bar(n_jobs, f"bench {a.command}", unit="job", delay=0, leave=True)
    ceilings = _ceilings(a)
    jobs_bar.update(2)
    res.set_ceilings(ceilings)
    _progress(("CPU ceilings (--smoke: no GPU)" if a.smoke else "ceilings")
              + f": copy {report.figure(ceilings.get('copy_GBps'))} GB/s, "
                f"bf16 matmul {report.figure(ceilings.get('matmul_TFLOPs'))} TFLOP/s")
    shared = dict(ceilings=ceilings, torch_device=torch_device, deadline_unix=deadline_unix)

    if a.command in ("kernels", "all"):
        cases = kernels.make_cases(models, ops, batches, prefill, ctx)
        cfgs = {m: dataclasses.asdict(c) for m, c in models.items()}
        st = {k: v for k, v in dataclasses.asdict(ks).items() if k != "deadline"}
        no_figures = {p: {} for p in kernels.PROVIDERS}
        for fw in frameworks:  # one job per framework: its rows of every case
            job = dict(shared, kind="kernels", framework=fw, models=cfgs, ops=ops, batches=batches,
                       prefill=prefill, ctx=ctx, settings=st)
            expected = [r for c in cases for r in kernels.case_rows(fw, c, no_figures, ceilings)]
            isolate.run_job(job, emit=res.add, expected=expected, in_process=a.in_process, progress=_progress)
            jobs_bar.update(1)

    if a.command == "stages":
        stage_list = stages.make_stages(models, _choices(a.stages, stages.STAGES, "--stages"),
                                        [None if q == "none" else q for q in
                                         _choices(a.quantization, formats.cli_choices(), "--quantization")],
                                        _ints(a.stage_ctx or ("32" if a.smoke else "1024,8192"), "--stage-ctx"))
        cfgs = {m: dataclasses.asdict(c) for m, c in models.items()}
        st = {k: v for k, v in dataclasses.asdict(ks).items() if k != "deadline"}
        for fw in frameworks:  # one job per framework: its rows of every stage
            job = dict(shared, kind="stages", framework=fw, models=cfgs,
                       stages=[dict(model=s.model, stage=s.stage, fmt=s.fmt, ctx=s.ctx) for s in stage_list],
                       settings=st)
            isolate.run_job(job, emit=res.add, expected=stages.expected_rows(stage_list, [fw]),
                            in_process=a.in_process, progress=_progress)
            jobs_bar.update(1)

    if a.command == "ttft":
        from bench import ttft

        runs = ttft.SMOKE_RUNS if a.smoke else ttft.RUNS
        with tempfile.TemporaryDirectory(prefix="bench-smoke-ckpt-") as tmp:
            for m in models:
                try:
                    path = _checkpoint(m, models[m], a, Path(tmp), tokenizer=True).resolve()
                except Exception as e:  # noqa: BLE001 - the rows say why
                    for r in ttft.expected_rows(frameworks, [m], prompt_lens, new_tokens, "auto", runs):
                        res.add(dict(r, error=f"checkpoint: {type(e).__name__}: {e}"))
                    continue
                for fw in frameworks:
                    _progress(f"ttft {fw} {m}")
                    for n in prompt_lens:
                        ttft.measure(fw, m, path, n, new_tokens, fused="auto", emit=res.add, progress=_progress,
                                     runs=runs)
                    jobs_bar.update(1)

    if a.command in ("decode", "all"):
        with tempfile.TemporaryDirectory(prefix="bench-smoke-ckpt-") as tmp:
            jobs = [(m, i, tp, t) for m in models for i in impls for tp, t in _variants(i, tps, tile_modes)]
            paths: dict = {}
            for k, (m, impl, tp, tiles) in enumerate(jobs, start=1):
                _progress(f"[{k}/{len(jobs)}] decode {impl} {m}" + (f" tensor parallel {tp}" if tp > 1 else "")
                          + (" untuned" if tiles == "untuned" else ""))
                bs = hf_batches if impl.startswith("hf") else batches
                expected = [dict(decode.base_row(impl, m, prompt_len=prompt_len, new_tokens=new_tokens,
                                                 ceilings=ceilings, tensor_parallel_size=tp, tiles=tiles,
                                                 sampling=sampling), batch=b)
                            for b in bs]
                dev = torch_device if impl.startswith(("hf", "torch", "nanovllm")) else "-"
                if impl in smoke_skip:
                    why = f"skipped in --smoke: {smoke_skip[impl]} (ask with --impls)"
                elif dev is None:
                    why = "unavailable: torch sees no CUDA GPU"
                else:  # the checkpoint (written here, once per model) or why there is none
                    files = impl == "nanovllm"  # nano-vllm loads a checkpoint (with a tokenizer) even with --random-weights
                    key = (m, files)
                    if key not in paths:
                        try:
                            paths[key] = None if a.random_weights and not files else \
                                _checkpoint(m, models[m], a, Path(tmp), tokenizer=files).resolve()
                        except Exception as e:  # noqa: BLE001
                            paths[key] = f"checkpoint: {type(e).__name__}: {e}"
                    why = paths[key] if isinstance(paths[key], str) else None  # None: written, or --random-weights
                if why is not None:
                    for r in expected:
                        res.add(dict(r, error=why))
                    jobs_bar.update(1)
                    continue
                job = dict(shared, kind="decode", impl=impl, model=m, cfg=dataclasses.asdict(models[m]),
                           path=None if paths[key] is None else str(paths[key]), batches=bs, prompt_len=prompt_len, new_tokens=new_tokens,
                           runs=runs, warmup=1, torch_device=dev, tensor_parallel_size=tp, tiles=tiles,
                           sampling=sampling)
                isolate.run_job(job, emit=res.add, expected=expected, in_process=a.in_process, progress=_progress)
                jobs_bar.update(1)
    jobs_bar.close()

    try:
        md = report.finish(res.doc(), out, plot=not a.no_plots)
    except Exception as e:  # noqa: BLE001 - bench.json is on disk already (written after every row)
        md = f"(report failed: {type(e).__name__}: {e}; the rows are in {out / report.JSON_NAME})"
    print(md, flush=True)
    _progress(f"done in {time.monotonic() - t_start:.0f} s: {out / report.JSON_NAME}")
    return 0


def run_main(argv: list[str], usage: str | None = None) -> int:
    """`python -m bench <command> [options]` for a command of RUN_COMMANDS (argv[0], or -h / --help)."""
    _early_env(argv)
    a = parser(usage).parse_args(argv)
    a.argv = argv
    return run(a)
