"""python -m bench {kernels,decode,stages,ttft,all} [options] | compare OLD NEW | report RESULTS... --out DIR | check | headline

  kernels  each fused kernel of both twins vs the plain op of the same framework, at the chosen
           presets' shapes: decode batches (--batch) and prefill token counts (--prefill);
           decode_attention at a context of --ctx tokens, prefill_attention over one prompt of
           each --prefill token count
  decode   end-to-end decode tok/s (greedy, or --sampling) and prefill tok/s: jax_impl and torch_impl fused/plain,
           transformers eager and static cache + torch.compile (batch 1 only unless --hf-batch)
  stages   each stage of a batch-1 decode step (qkv, o_proj, gate_up, down, lm_head + argmax,
           attention at --stage-ctx) of both twins in every weight format, timed as a chain as decode
           runs it, beside a plain streaming read of the same bytes: GB/s, % of copy, % of the read
           (bench/stages.py)
  ttft     time to first token as a user meets it: each twin's generate command on a random
           checkpoint, one process per run - fresh compile caches, a second process, and a warm-up
           at load - seconds to the first text and the command's first-token figures (bench/ttft.py)
  all      kernels and decode (the default when no command is given)
  compare  flag regressions over 5% between two results files (exit 1 when any)
  report   merge results of several runs (say one per model) into one folder: JSON, table, plots
  check    the standard GPU check of a commit (a subset of the GPU tests and decode at Qwen3-0.6B and
           Qwen3-8B, batch 1 and 32, both twins; within 8 minutes on an H100): bench/check.py;
           --dry-run prints its plan on any machine
  headline rewrite README.md's headline table (between its bench-headline markers) from one
           bench.json: bench/headline.py

Every run also measures the two ceilings (device-to-device copy, bf16 matmul) and records the
GPU, driver, library versions, date and git commit. The ceilings of each framework, every decode
job (one implementation on one model) and the kernel rows of each framework run in a Python
process of their own (bench/isolate.py says why; --in-process runs them all in this one). Needs
a CUDA GPU, except with --smoke (each preset shrunk to 2 layers, 1/8 of its width and a 512-token
vocabulary, the fused kernels in their interpreters on CPU, a few repeats: keeps the code alive in
CI; rows name the shrunk model as such). Results go to --out (default ./bench-results/<gpu>/ under
the current directory): bench.json, bench.md, decode.png, kernels_bw.png; a folder that already
holds results is refused, never overwritten. The JSON is rewritten after every row, so a run cut
short keeps what it measured.

Decode rows carry two speeds: decode tok/s (decode time only: batch * (new tokens - 1) over the
time after the first new token) and end-to-end tok/s (all new tokens over the wall time of the
implementation's public generate() call: prefill and host overhead included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import suite
from bench.suite import REPO, RUN_COMMANDS, SMOKE_SKIP, model_label, refuse_existing, run_main
from common import argparsing

# The docstring above is the usage (--help). This module dispatches the commands: the run commands
# are bench/suite.py (REPO, SMOKE_SKIP, model_label: re-exported), compare, check and headline their
# own modules; report is report_main below, over bench/report.py.
__all__ = ["main", "report_main", "parser", "REPO", "SMOKE_SKIP", "model_label"]


def parser() -> argparse.ArgumentParser:
    """The run commands' flags (bench.suite.parser) with this module's docstring as --help's text."""
    return suite.parser(__doc__)


def report_main(argv: list[str]) -> int:
    from bench import report

    p = argparsing.ArgumentParser(prog="python -m bench report", description="merge results and redraw")
    p.add_argument("results", nargs="+", help="bench.json files or folders holding one")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the merged bench.json, bench.md, plots (one holding results is refused)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    refuse_existing(a.out)
    try:
        docs = [report.load(r) for r in a.results]
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m bench report: {e}", file=sys.stderr)
        return 2
    print(report.finish(report.merge(docs), a.out, plot=not a.no_plots))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from bench import compare

        return compare.main(argv[1:])
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    if argv and argv[0] == "check":
        from bench import check

        return check.main(argv[1:])
    if argv and argv[0] == "headline":
        from bench import headline

        return headline.main(argv[1:])
    if not argv or argv[0] not in RUN_COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["all"] + argv
    return run_main(argv, __doc__)


if __name__ == "__main__":
    from common import interrupt

    interrupt.main(main)

