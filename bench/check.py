"""python -m bench check [--out DIR] [--dry-run]: the standard GPU check of a commit.

Two steps, within BUDGET_S (8 minutes) on an H100:
1. a fixed subset of the GPU tests (TEST_FILES, TEST_SELECTION: the Qwen3-0.6B full-shape kernel
   cases of both twins at 1 and 32 tokens and every attention case, the quantized kernels at one
   token, the torch model's CUDA-graph tests, nano-vllm's engine where installed), in a pytest
   process of its own that is stopped after TESTS_BUDGET_S; its log and junit XML are kept;
2. `python -m bench decode` at Qwen3-0.6B and Qwen3-8B, batch 1 and 32, both twins' fused rows
   (greedy, random weights made in GPU memory, 256 new tokens, best of 2 after a warm-up: --quick's
   repeats), one process per job as the suite runs them, given what is left of the budget
   (--budget-s: a job that would start past it is skipped and its rows say so).

Results go to bench/results/<gpu-slug>/<short-commit>/ of the source checkout (--out to choose):
bench.json, bench.md (the table), decode.png, tests.log, tests.xml and check.json (what ran and
how it ended). A folder that already holds any of them is refused. Needs a CUDA GPU and the
checkout's tests/ folder; `--dry-run` prints the plan (the jobs, their commands, where results go)
on any machine. Exit status 0 when every selected test passed (or skipped) and every decode row
has its figures, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from common import argparsing

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0  # the whole check on an H100
TESTS_BUDGET_S = 180.0  # the pytest process is stopped after this; decode gets the rest
TEST_FILES = ("tests/test_kernels.py", "tests/test_quant_kernels.py", "tests/test_torch_model.py",
              "tests/test_torch_nanovllm.py")
TEST_SELECTION = ("(TestGPU and not TestGPUFloat32 and Qwen3-0.6B and (-1-bfloat16 or -32-bfloat16 or attention))"
                  " or (TestGPU and Qwen3-0.6B-t1-) or cuda_graph or real_nanovllm_engine")
MODELS = ("Qwen3-0.6B", "Qwen3-8B")
BATCHES = (1, 32)
IMPLS = ("jax-fused", "torch-fused")
NEW_TOKENS = 256
NO_GPU_SLUG = "<gpu-slug>"  # in a --dry-run plan on a machine without a GPU
FILES = ("bench.json", "bench.md", "decode.png", "tests.log", "tests.xml", "check.json")


@dataclasses.dataclass(frozen=True)
class Plan:
    out: Path
    gpu: str
    commit: str
    test_command: tuple[str, ...]  # run in the checkout's root
    bench_argv: tuple[str, ...]  # python -m bench's arguments, less --budget-s (what the tests leave)
    budget_s: float = BUDGET_S
    tests_budget_s: float = TESTS_BUDGET_S


def short_commit() -> str | None:
    """The checkout's commit as 7 hex digits, "-dirty" when tracked files differ from it; None off git."""
    from bench import env

    full = env.git_commit()
    if full.startswith("unknown"):
        return None
    return full[:7] + ("-dirty" if full.endswith("-dirty") else "")


def make_plan(gpu: str | None, commit: str, out: Path | None = None) -> Plan:
    """What `python -m bench check` runs for a GPU named `gpu` (None: not known here) at `commit`."""
    from bench import env

    slug = env.slug(gpu) if gpu else NO_GPU_SLUG
    out = Path(out) if out else REPO / "bench" / "results" / slug / commit
    test_command = (sys.executable, "-m", "pytest", "-m", "gpu", *TEST_FILES, "-k", TEST_SELECTION, "-q", "-rs",
                    "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}")
    bench_argv = ("decode", "--models", ",".join(MODELS), "--batch", ",".join(map(str, BATCHES)),
                  "--impls", ",".join(IMPLS), "--random-weights", "--quick", "--new-tokens", str(NEW_TOKENS),
                  "--out", str(out), "--commit", commit)  # rows carry the check's commit, not a copy's .git
    return Plan(out=out, gpu=gpu or "(no GPU here)", commit=commit, test_command=test_command, bench_argv=bench_argv)


def describe(plan: Plan) -> str:
    bench = "python -m bench " + " ".join(_quote(a) for a in plan.bench_argv) + " --budget-s REST"
    return "\n".join([
        f"python -m bench check: commit {plan.commit} on {plan.gpu}",
        f"budget: {plan.budget_s / 60:.0f} minutes on an H100 (GPU tests stopped after {plan.tests_budget_s:.0f} s; "
        f"decode gets the rest as --budget-s)",
        f"results: {plan.out}/ ({', '.join(FILES)})",
        "1. GPU tests (log tests.log, junit XML tests.xml), in the checkout's root:",
        "   " + " ".join(_quote(a) for a in ["python", *plan.test_command[1:]]),
        f"2. decode: {', '.join(MODELS)} x batch {', '.join(map(str, BATCHES))} x {', '.join(IMPLS)} "
        f"(greedy, random weights in GPU memory, {NEW_TOKENS} new tokens, one process per job):",
        "   " + bench,
    ])


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def run_tests(plan: Plan, log) -> dict:
    """The GPU tests in a pytest process of their own (stopped after tests_budget_s): outcome counts."""
    t0 = time.monotonic()
    with open(plan.out / "tests.log", "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(_quote(a) for a in plan.test_command) + "\n")
        f.flush()
        proc = subprocess.Popen(plan.test_command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc, stopped = proc.wait(timeout=plan.tests_budget_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, stopped = proc.wait(), True
        except BaseException:  # Ctrl-C: leave no pytest running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if stopped:
            f.write(f"\nstopped: the tests ran past their {plan.tests_budget_s:.0f} s\n")
    out = dict(returncode=rc, stopped=stopped, seconds=time.monotonic() - t0, **junit_counts(plan.out / "tests.xml"))
    log(f"GPU tests: {out}")
    return out


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a junit XML file (none when pytest wrote none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return dict(junit="missing")
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def run_decode(plan: Plan, budget_s: float) -> dict:
    """python -m bench decode (one process per job) with `budget_s` seconds: rows measured / not."""
    from bench import report
    from bench.suite import run_main

    rc = run_main([*plan.bench_argv, "--budget-s", f"{max(budget_s, 1.0):.0f}"])
    rows = [r for r in report.load(plan.out)["rows"] if r.get("kind") == "decode"]
    missing = [f"{r['impl']} {r['model']} batch {r['batch']}: {r.get('error')}" for r in rows
               if not r.get("decode_tok_s")]
    return dict(returncode=rc, rows=len(rows), measured=len(rows) - len(missing), not_measured=missing)


def main(argv: list[str] | None = None) -> int:
    from bench import env
    from bench.suite import _early_env, _progress, refuse_existing

    p = argparsing.ArgumentParser(prog="python -m bench check", description=__doc__.splitlines()[0],
                                  epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<gpu-slug>/<short-commit>/ "
                                            "of the source checkout)")
    p.add_argument("--commit", help="the commit to name the results and their rows by (default: the checkout's; "
                                         "needed where the tree has no .git, or a stale one)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (any machine)")
    a = p.parse_args(argv)
    _early_env([])
    commit = a.commit or short_commit()
    if commit is None:
        raise SystemExit(f"error: {REPO}: no git checkout here to name the commit; pass --commit")
    if not (REPO / "tests").is_dir():
        raise SystemExit(f"error: {REPO / 'tests'}: no such folder; python -m bench check runs the GPU tests of a "
                         f"source checkout (pip install -e . from a clone)")
    ok, gpu = env.has_gpu()
    if a.dry_run:
        print(describe(make_plan(gpu if ok else None, commit, a.out)))
        return 0
    if not ok:
        raise SystemExit(f"error: python -m bench check needs a CUDA GPU ({gpu}); --dry-run prints its plan")
    plan = make_plan(gpu, commit, a.out)
    refuse_existing(plan.out, FILES)
    plan.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _progress(describe(plan))
    tests = run_tests(plan, _progress)
    decode = run_decode(plan, plan.budget_s - (time.monotonic() - t0))
    passed = tests["returncode"] == 0 and not tests["stopped"]
    summary = dict(commit=commit, gpu=gpu, budget_s=plan.budget_s, seconds=time.monotonic() - t0,
                   tests=tests, decode=decode, test_command=list(plan.test_command),
                   bench_command="python -m bench " + " ".join(plan.bench_argv),
                   ok=passed and decode["returncode"] == 0 and not decode["not_measured"])
    (plan.out / "check.json").write_text(json.dumps(summary, indent=1))
    _progress(f"check {'passed' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s "
              f"(budget {plan.budget_s:.0f} s): tests {'passed' if passed else 'failed'} ({plan.out / 'tests.log'}), "
              f"decode rows measured {decode['measured']}/{decode['rows']}; results in {plan.out}")
    return 0 if summary["ok"] else 1
