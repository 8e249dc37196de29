"""python -m bench headline BENCH_JSON [--readme README.md] [--check]: README's headline table from one run.

The table lives in README.md between two marker comments:

    <!-- bench-headline:begin source=bench/results/<gpu>/<commit>/bench.json -->
    ...generated text: GPU, commit, the commands, decode and end-to-end tok/s, % of the floor...
    <!-- bench-headline:end -->

`python -m bench headline FILE` renders FILE's decode rows (`render`) and rewrites what lies
between the markers, naming FILE in the begin marker; `--check` rewrites nothing and exits 1 when
the README's table differs from what FILE gives. `check(readme_text, root)` does the same for a
test: it reads the source named in the begin marker, so README.md alone says where its table came from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from bench.decode import TWINS
from common import argparsing, formats

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-headline:begin", "<!-- bench-headline:end -->"
_BEGIN_RE = re.compile(r"<!-- bench-headline:begin(?: source=(?P<source>\S+))? -->\n")
ORDER = (*(f"{fw}-{kind}" for kind in ("fused", *formats.QUANTIZED, "plain") for fw in TWINS),
         "nanovllm", "hf-compile", "hf-eager")


class HeadlineError(ValueError):
    """README.md without one pair of markers, or a results file the headline cannot come from."""


def _n(v, fmt="{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _short(commit: str) -> str:
    sha, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
    return (sha[:7] if re.fullmatch(r"[0-9a-f]{40}", sha) else sha) + (" (with uncommitted changes)" if dirty else "")


def render(doc: dict, source: str) -> str:
    """The headline (a sentence and a table) from the decode rows of one bench.json named `source`."""
    runs = doc.get("runs") or []
    if not runs:
        raise HeadlineError(f"{source}: no run recorded (expected a bench.json written by python -m bench)")
    envs = [r.get("env", {}) for r in runs]
    if any(e.get("smoke") for e in envs):
        raise HeadlineError(f"{source}: a --smoke run (CPU, shrunk models): no headline comes from it")
    rows = [r for r in doc.get("rows", []) if r.get("kind") == "decode" and (r.get("tensor_parallel_size") or 1) == 1
            and (r.get("tiles") or "tuned") == "tuned" and not r.get("sampling")]
    if not any(r.get("decode_tok_s") for r in rows):
        raise HeadlineError(f"{source}: no measured decode row (greedy, one GPU, tuned) to show")
    gpus = list(dict.fromkeys(e.get("gpu", "?") for e in envs))
    commits = list(dict.fromkeys(_short(e.get("commit", "?")) for e in envs))
    commands = list(dict.fromkeys(e.get("command", "?") for e in envs))
    settings = runs[0].get("settings", {})
    copy = [r.get("ceilings", {}).get("copy_GBps") for r in runs if r.get("ceilings", {}).get("copy_GBps")]
    batches = sorted({r["batch"] for r in rows})
    prompt = sorted({r.get("prompt_len") for r in rows})
    new = sorted({r.get("new_tokens") for r in rows})
    head = (f"Measured on {' / '.join(gpus)} (commit {', '.join(commits)}; `{'`, `'.join(commands)}`, table by "
            f"`python -m bench headline {source}`): greedy decode, {'/'.join(map(str, prompt))}-token prompt, "
            f"{'/'.join(map(str, new))} new tokens, random bf16 weights with the real shapes, best of "
            f"{settings.get('runs', '?')}, one process per job. Decode tok/s counts decode time only (the first new "
            f"token comes from prefill), with % of the bandwidth floor (weights + KV cache over the copy bandwidth "
            f"measured in the run, {' / '.join(f'{c:,.0f}' for c in copy) or '?'} GB/s) in brackets; end-to-end "
            f"tok/s is all new tokens over the wall time of the twin's `generate()` call (prefill and host overhead "
            f"included).")
    lines = ["| model | implementation | " + " | ".join(
        f"batch {b} decode tok/s | batch {b} end-to-end tok/s" for b in batches) + " |",
        "|---|---|" + "---|---|" * len(batches)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        impls = sorted({r["impl"] for r in rows if r["model"] == m},
                       key=lambda i: ORDER.index(i) if i in ORDER else len(ORDER))
        for impl in impls:
            by_b = {r["batch"]: r for r in rows if r["model"] == m and r["impl"] == impl}
            cells = []
            for b in batches:
                r = by_b.get(b, {})
                if r.get("decode_tok_s"):
                    cells += [f"{r['decode_tok_s']:,.1f} ({_n(r.get('pct_bw_floor'), '{:.0f}')}%)",
                              _n(r.get("end_to_end_tok_s"))]
                else:
                    cells += ["not measured" if r else "not run", "-"]
            label = next(iter(by_b.values())).get("label", impl)
            lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")
    return head + "\n\n" + "\n".join(lines) + "\n"


def parse(readme_text: str) -> tuple[str | None, str]:
    """(the source named in the begin marker or None, the text between the markers)."""
    begins = list(_BEGIN_RE.finditer(readme_text))
    if len(begins) != 1 or readme_text.count(BEGIN) != 1 or readme_text.count(END) != 1:
        raise HeadlineError(f"expected one '{BEGIN} ... -->' line and one '{END}' line in the README")
    start = begins[0].end()
    end = readme_text.index(END)
    if end < start:
        raise HeadlineError(f"'{END}' comes before '{BEGIN}' in the README")
    return begins[0].group("source"), readme_text[start:end]


def replace(readme_text: str, doc: dict, source: str) -> str:
    """readme_text with the headline rendered from `doc` (named `source`) between the markers."""
    parse(readme_text)  # one pair of markers, in order
    m = _BEGIN_RE.search(readme_text)
    end = readme_text.index(END)
    return (readme_text[:m.start()] + f"{BEGIN} source={source} -->\n" + render(doc, source)
            + readme_text[end:])


def check(readme_text: str, root: Path = REPO) -> list[str]:
    """Differences between the README's headline and what its source (relative to `root`) renders; [] if none."""
    from bench import report

    source, current = parse(readme_text)
    if source is None:
        return ["the headline names no source: it was not written by python -m bench headline"]
    try:
        expected = render(report.load(root / source), source)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    if current == expected:
        return []
    cur, exp = current.splitlines(), expected.splitlines()
    diff = [f"line {i + 1}: README has {c!r}, {source} gives {e!r}" for i, (c, e) in enumerate(zip(cur, exp)) if c != e]
    if len(cur) != len(exp):
        diff.append(f"README has {len(cur)} lines, {source} gives {len(exp)}")
    return diff


def _source_name(path: Path, readme: Path) -> str:
    """How the README names the results file: relative to the README's folder when inside it."""
    p = path.resolve()
    if p.is_dir():
        from bench.report import JSON_NAME

        p = p / JSON_NAME
    try:
        return p.relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    from bench import report

    p = argparsing.ArgumentParser(prog="python -m bench headline", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a bench.json (or the folder holding it), e.g. from python -m bench check")
    p.add_argument("--readme", type=Path, default=REPO / "README.md", help="the file to rewrite (default README.md)")
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when the table differs")
    a = p.parse_args(argv)
    try:
        text = a.readme.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: --readme {a.readme}: {e.strerror or e}") from None
    source = _source_name(a.results, a.readme)
    try:
        doc = report.load(a.results)
        new = replace(text, doc, source)
    except (FileNotFoundError, ValueError) as e:  # HeadlineError included
        raise SystemExit(f"error: {e}") from None
    if a.check:
        diff = check(text, a.readme.resolve().parent) if parse(text)[0] == source else [
            f"the README's headline comes from {parse(text)[0]}, not {source}"]
        for d in diff:
            print(d)
        return 1 if diff else 0
    if new == text:
        print(f"{a.readme}: headline already as {source} gives it")
        return 0
    tmp = a.readme.with_name(a.readme.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(a.readme)
    print(f"{a.readme}: headline rewritten from {source}", file=sys.stderr)
    return 0
