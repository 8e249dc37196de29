"""Compare any set of runners on one checkpoint: `python -m common.parity`.

    python -m common.parity --model DIR --runners reference,hf[,jax,torch,jax:off,torch:on] [--dtype float32]
        [--baseline reference] [--reference-dtype float64] [--json OUT]
        [--prompt-len 16] [--batch 2] [--new-tokens 8] [--seed 0] [--max-rel-err X]

Every runner sees the same random token ids (drawn from `--seed`). Against the baseline runner
it reports the max absolute logits error, the max relative error (max abs error / max abs
baseline logit), the argmax agreement over all positions, and the greedy-generation agreement
(tokens equal before the first divergence, per prompt and in total), as a Markdown table on
stdout; `--json` writes the same rows. `compare_logits` and `compare_generations` hold the
maths for tests and benchmarks.

A runner name may carry the fused flag after a colon (`jax:on`, `jax:off`, `torch:auto`), so
the fused and plain paths of one twin compare in one table; without it the runner's default
("auto") applies. `--dtype` is the precision of the runners under test; the numpy reference
runs in `--reference-dtype` (float64 by default: it is the truth the others are measured against).
float64 is transformers' only (`hf`); the twins compute in float32, bfloat16 or float16.

Nothing runs before everything is checked (`check_parity`): the model directory, each runner's
name, packages, dtype and fused path on this machine, and the prompt length against the model's
max_position_embeddings and this machine's memory; a problem is one `error:` line, exit 2. A
runner that fails anyway once the comparison runs does not lose the finished rows: the table
shows them, one `error:` line names the runner, exit 1. `--json` never overwrites a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__":  # before numpy and the harness import: a Ctrl-C while they do exits 130 too
    from common import interrupt

    interrupt.install()

import numpy as np

from common import argparsing
from common.config import Qwen3Config
from common.harness import check_runner, get_loader, resolve_fused, runner_dtypes
from common.logs import show_project_logs
from common.progress import note
from common.weights import Checkpoint


def compare_logits(logits, baseline) -> dict:
    """max_abs_err, max_rel_err (max abs err / max |baseline|) and argmax agreement (fraction)."""
    a, b = np.asarray(logits, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logits shape {a.shape} differs from the baseline's {b.shape}")
    finite = bool(np.isfinite(a).all())
    err = np.abs(a - b)
    max_abs = float(err.max()) if finite else float("inf")
    scale = float(np.abs(b).max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    agree = float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "argmax_agree": agree, "finite": finite}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def compare_generations(generations, baseline) -> dict:
    """Tokens equal before the first divergence, per prompt and in total (of the baseline's tokens)."""
    if len(generations) != len(baseline):
        raise ValueError(f"{len(generations)} generations against {len(baseline)} baseline generations")
    per_prompt = [common_prefix(g, b) for g, b in zip(generations, baseline)]
    total = sum(len(b) for b in baseline)
    return {"greedy_match": per_prompt, "greedy_matched": sum(per_prompt), "greedy_total": total,
            "greedy_identical": all(list(map(int, g)) == list(map(int, b)) for g, b in zip(generations, baseline))}


def parse_runner(spec: str) -> tuple[str, dict]:
    """"jax:off" -> ("jax", {"fused": False}); "hf" -> ("hf", {})."""
    name, _, fused = spec.partition(":")
    if not fused:
        return name, {}
    try:
        return name, {"fused": resolve_fused(fused)}
    except ValueError:
        raise ValueError(f"runner {spec!r}: the part after ':' must be auto, on or off") from None


def host_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def min_host_bytes(cfg: Qwen3Config, runners: Sequence[str], *, reference_dtype: str, batch: int,
                   prompt_len: int) -> int:
    """A lower bound of the host memory a comparison takes: the float32 logits kept for every runner,
    and the numpy reference's weights and attention scores ([heads, seq, seq], two alive at once)."""
    need = len(runners) * batch * prompt_len * cfg.vocab_size * 4
    if "reference" in {parse_runner(r)[0] for r in runners}:
        item = 8 if reference_dtype == "float64" else 4
        need += item * (cfg.num_parameters() + 2 * cfg.num_attention_heads * prompt_len ** 2
                        + prompt_len * cfg.vocab_size)
    return need


def check_parity(model_dir: str | Path, runners: Sequence[str], *, dtype: str = "float32",
                 baseline: str = "reference", reference_dtype: str = "float64", prompt_len: int = 16,
                 batch: int = 2, new_tokens: int = 8, loaders=None) -> Qwen3Config:
    """Everything a comparison needs, checked before any runner loads: the model directory and its
    checkpoint, each runner's name, packages, dtype and fused path on this machine, the prompt
    length against the model's context and this machine's memory. Returns the model's config;
    raises ValueError naming the flag (or the file) at fault."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"--model: {model_dir} is a file, expected a checkpoint directory" if path.exists()
                         else f"--model: directory {model_dir} does not exist")
    ckpt = Checkpoint(path)  # ConfigError / WeightsError name the file
    cfg, fmt = ckpt.config, ckpt.weight_format()
    for spec in dict.fromkeys([baseline, *runners]):
        base, extra = parse_runner(spec)
        if loaders and base in loaders:
            continue  # a test's runner: nothing known to check
        check_runner(base, fused=extra.get("fused", "auto"), weight_format=fmt, label=spec)
        flag, run_dtype = ("--reference-dtype", reference_dtype) if base == "reference" else ("--dtype", dtype)
        if run_dtype not in runner_dtypes(base):
            raise ValueError(f"{flag} {run_dtype}: runner {spec!r} computes in "
                             f"{', '.join(runner_dtypes(base))} only")
    if prompt_len + new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings} ({path / 'config.json'})")
    have = host_memory_bytes()
    need = min_host_bytes(cfg, list(dict.fromkeys([baseline, *runners])), reference_dtype=reference_dtype,
                          batch=batch, prompt_len=prompt_len)
    if have is not None and need > have:
        raise ValueError(f"--prompt-len {prompt_len}: comparing {batch} prompts of that length takes at least "
                         f"{_size(need)} of host memory, this machine has {_size(have)}; "
                         f"use a shorter --prompt-len or a smaller --batch")
    return cfg


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (ValueError, RuntimeError, OSError)) else f"{type(e).__name__}: {text}"


def run_parity(model_dir: str | Path, runners: Sequence[str], *, dtype: str = "float32",
               baseline: str = "reference", reference_dtype: str = "float64", prompt_len: int = 16,
               batch: int = 2, new_tokens: int = 8, seed: int = 0, loaders=None, progress: bool = False) -> dict:
    """Check everything (`check_parity`, ValueError before any runner loads), then load every runner,
    run the same inputs, compare with the baseline; returns the report dict.

    The baseline runs first. A runner that fails while loading or running does not end the
    comparison: the report's "failed" lists it with its error, the other rows stay (nothing is
    compared when the baseline fails: the others are not run). `loaders` (name -> load function)
    overrides the registry, for tests; `progress` prints a line per runner on stderr.
    """
    cfg = check_parity(model_dir, runners, dtype=dtype, baseline=baseline, reference_dtype=reference_dtype,
                       prompt_len=prompt_len, batch=batch, new_tokens=new_tokens, loaders=loaders)
    specs = list(dict.fromkeys([baseline, *runners]))  # the table's order: the baseline first unless listed
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, prompt_len), dtype=np.int64)
    rows, results, failed = [], {}, []
    for name in [baseline, *(s for s in specs if s != baseline)]:
        base, extra = parse_runner(name)
        load = (loaders or {}).get(base) or get_loader(base)
        run_dtype = reference_dtype if base == "reference" else dtype
        try:
            t0 = time.perf_counter()
            runner = load(model_dir, dtype=run_dtype, **extra)
            t1 = time.perf_counter()
            logits = runner.logits(ids)
            t2 = time.perf_counter()
            gens = runner.generate([list(map(int, row)) for row in ids], new_tokens, temperature=0.0)
            t3 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - reported with the runner's name; the finished rows stay
            failed.append({"runner": name, "error": _one_line(e)})
            if progress:
                note(f"{name}: failed")
            if name == baseline:
                break
            continue
        finally:
            runner = None  # free the model before the next one loads
        results[name] = (logits, gens)
        if progress:
            note(f"{name}: loaded in {t1 - t0:.2f} s, logits {t2 - t1:.3f} s, generate {t3 - t2:.3f} s")
        rows.append({"runner": name, "dtype": run_dtype, "load_s": t1 - t0, "logits_s": t2 - t1,
                     "generate_s": t3 - t2, "generated": [list(map(int, g)) for g in gens]})
    rows.sort(key=lambda r: specs.index(r["runner"]))
    if baseline in results:
        base_logits, base_gens = results[baseline]
        for row in rows:
            logits, gens = results[row["runner"]]
            row.update(compare_logits(logits, base_logits))
            row.update(compare_generations(gens, base_gens))
    return {"model": str(model_dir), "baseline": baseline, "dtype": dtype, "reference_dtype": reference_dtype,
            "seed": seed, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "token_ids": ids.tolist(), "rows": rows, "failed": failed}


def markdown_table(report: dict) -> str:
    head = (f"Parity on {report['model']} - baseline `{report['baseline']}`, {report['batch']} prompts x "
            f"{report['prompt_len']} random tokens (seed {report['seed']}), {report['new_tokens']} greedy tokens\n\n")
    lines = ["| runner | dtype | max abs err | max rel err | argmax agree | greedy match (per prompt) "
             "| load s | logits s | generate s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        match = f"{r['greedy_matched']}/{r['greedy_total']} ({', '.join(map(str, r['greedy_match']))})"
        lines.append(f"| {r['runner']} | {r['dtype']} | {r['max_abs_err']:.3g} | {r['max_rel_err']:.3g} "
                     f"| {100 * r['argmax_agree']:.1f}% | {match} | {r['load_s']:.2f} | {r['logits_s']:.3f} "
                     f"| {r['generate_s']:.3f} |")
    return head + "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparsing.ArgumentParser(prog="python -m common.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--runners", default="reference,hf",
                   help="comma-separated: reference, hf, jax, torch; jax:on / jax:off pick the fused path")
    p.add_argument("--baseline", default="reference", help="runner the others are compared against")
    p.add_argument("--dtype", default="float32", choices=["float64", "float32", "bfloat16", "float16"],
                   help="dtype of the runners under test: float32, bfloat16 or float16 for every runner, "
                        "float64 for hf only (the reference runs in --reference-dtype)")
    p.add_argument("--reference-dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the numpy reference runner")
    p.add_argument("--prompt-len", type=_positive, default=16)
    p.add_argument("--batch", type=_positive, default=2)
    p.add_argument("--new-tokens", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--max-rel-err", type=float, default=None,
                   help="exit 1 when any runner's max relative logits error exceeds this")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    show_project_logs(sys.stderr)
    runners = [r.strip() for r in a.runners.split(",") if r.strip()]
    if not runners:
        print("error: --runners: expected a comma-separated list of runner names", file=sys.stderr)
        return 2
    if a.json and (Path(a.json).exists() or Path(a.json).is_symlink()):
        print(f"error: --json {a.json}: the file exists (never overwritten); choose a new name", file=sys.stderr)
        return 2
    try:
        report = run_parity(a.model, runners, dtype=a.dtype, baseline=a.baseline,
                            reference_dtype=a.reference_dtype, prompt_len=a.prompt_len, batch=a.batch,
                            new_tokens=a.new_tokens, seed=a.seed, progress=True)
    except (ValueError, ImportError, NotImplementedError) as e:  # incl. ConfigError, WeightsError: nothing ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report["rows"]:
        print(markdown_table(report))
    if a.json:
        try:
            with open(a.json, "x") as f:  # "x": created here, never an existing file overwritten
                json.dump(report, f, indent=2)
        except OSError as e:
            print(f"error: --json {a.json}: {e.strerror}", file=sys.stderr)
            return 2
    status = 0
    for f in report["failed"]:
        what = "the baseline failed, nothing compared" if f["runner"] == a.baseline else "failed"
        print(f"error: runner {f['runner']!r} {what}: {f['error']}", file=sys.stderr)
        status = 1
    if a.max_rel_err is not None and report["rows"]:
        worst = max(r["max_rel_err"] for r in report["rows"])
        if not worst <= a.max_rel_err:
            print(f"FAIL: max relative logits error {worst:.3g} exceeds --max-rel-err {a.max_rel_err:g}",
                  file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    interrupt.main(main)
