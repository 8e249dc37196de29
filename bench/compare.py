"""`python -m bench compare OLD NEW`: flag regressions over a threshold (default 5%); exit 1 if any.

Rows are matched by what they measure (bench.report.row_key - kernel: framework, impl, op, model,
phase, tokens, ctx; decode: impl, model, batch, prompt and new-token counts). Compared figures: a
kernel's median time (lower is better), decode, end-to-end and prefill tok/s (higher is better).
A row that measured in OLD and fails in NEW is a regression too; rows only in one file are listed,
not flagged.
"""

from __future__ import annotations

import sys

from bench import report
from bench.report import row_key  # what a row measures
from common import argparsing

# figure -> True when higher is better
METRICS = {"kernel": {"median_s": False},
           "decode": {"decode_tok_s": True, "end_to_end_tok_s": True, "prefill_tok_s": True}}


def _label(key: tuple) -> str:
    return " ".join(str(k) for k in key if k is not None)


def compare(old: dict, new: dict, threshold_pct: float = 5.0) -> tuple[list[dict], list[str]]:
    """(findings, notes): one finding per compared figure, with 'regression' True when worse than
    the threshold; notes on rows present in only one document."""
    old_rows = {row_key(r): r for r in old["rows"]}
    new_rows = {row_key(r): r for r in new["rows"]}
    findings, notes = [], []
    for key, o in old_rows.items():
        n = new_rows.get(key)
        if n is None:
            notes.append(f"only in OLD: {_label(key)}")
            continue
        for metric, higher_better in METRICS.get(o.get("kind"), {}).items():
            ov, nv = o.get(metric), n.get(metric)
            if not ov:
                continue
            if not nv:
                findings.append(dict(key=_label(key), metric=metric, old=ov, new=None, change_pct=None,
                                     regression=bool(n.get("error")), why=n.get("error", "no figure")))
                continue
            # change as "how much worse" in percent: positive = slower
            worse = (ov / nv - 1) if higher_better else (nv / ov - 1)
            findings.append(dict(key=_label(key), metric=metric, old=ov, new=nv, change_pct=100 * worse,
                                 regression=100 * worse > threshold_pct))
    notes += [f"only in NEW: {_label(k)}" for k in new_rows if k not in old_rows]
    return findings, notes


def main(argv=None) -> int:
    p = argparsing.ArgumentParser(prog="python -m bench compare", description=__doc__.splitlines()[0])
    p.add_argument("old", help="results JSON (or folder holding bench.json) of the earlier run")
    p.add_argument("new", help="results JSON (or folder) of the later run")
    p.add_argument("--threshold", type=float, default=5.0, help="percent worse that counts as a regression")
    p.add_argument("--all", action="store_true", help="list every compared figure, not only regressions")
    a = p.parse_args(argv)
    try:
        old, new = report.load(a.old), report.load(a.new)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m bench compare: {e}", file=sys.stderr)
        return 2
    findings, notes = compare(old, new, a.threshold)
    bad = [f for f in findings if f["regression"]]
    shown = findings if a.all else bad
    if shown:
        print("| row | figure | old | new | worse by |\n|---|---|---|---|---|")
        for f in shown:
            ch = "fails now: " + str(f.get("why"))[:80] if f["change_pct"] is None else f"{f['change_pct']:+.1f}%"
            new_v = "-" if f["new"] is None else f"{f['new']:.4g}"
            flag = " **REGRESSION**" if f["regression"] else ""
            print(f"| {f['key']} | {f['metric']} | {f['old']:.4g} | {new_v} | {ch}{flag} |")
    for n in notes[:20]:
        print(n)
    if len(notes) > 20:
        print(f"... {len(notes) - 20} more rows in only one file")
    print(f"{len(findings)} figures compared, {len(bad)} regression(s) over {a.threshold:g}%")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
