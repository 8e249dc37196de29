"""Results on disk and on screen: the JSON document, Markdown tables, PNG plots, merging runs.

Document (bench.json): {"schema": 1, "runs": [{"env", "ceilings", "settings"}], "rows": [...]}.
Kernel rows have kind "kernel", decode rows kind "decode"; a row that could not be measured
carries "error" (its reason, e.g. "unavailable: ..." or "skipped: ...") instead of figures.
Separate runs (one per model, say, to fit a time limit) merge with `python -m bench report`; rows
are matched by what they measure (`row_key`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.decode import TWINS, variant
from bench.stages import table as stages_table
from bench.ttft import table as ttft_table
from common import formats

SCHEMA = 1
JSON_NAME, MD_NAME = "bench.json", "bench.md"
DECODE_ORDER = (*(f"{fw}-{kind}" for fw in TWINS for kind in ("fused", *formats.QUANTIZED, "plain")),
                "nanovllm", "hf-eager", "hf-compile")
# what identifies a row (row_key): kernel rows by these fields, decode rows by these and their variant
KERNEL_KEY = ("framework", "impl", "op", "model", "phase", "tokens", "ctx")
DECODE_KEY = ("impl", "model", "batch", "prompt_len", "new_tokens")


class Results:
    """Rows of one run, written to disk (atomically) after every row."""

    def __init__(self, out_dir: Path, env: dict, settings: dict):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run = dict(env=env, ceilings={}, settings=settings)
        self.rows: list[dict] = []

    def set_ceilings(self, ceilings: dict) -> None:
        self.run["ceilings"] = ceilings
        self.save()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def doc(self) -> dict:
        return dict(schema=SCHEMA, runs=[self.run], rows=self.rows)

    def save(self) -> Path:
        return write_json(self.out_dir / JSON_NAME, self.doc())


def write_json(path: Path, doc: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict:
    """A bench.json (or a folder holding one); refuses anything else with a clear message."""
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such results file (expected a {JSON_NAME} written by python -m bench)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{p}: expected a bench results document with a 'rows' list")
    return doc


def row_key(r: dict) -> tuple:
    """What a row measures, the same in every run: how rows are matched (merge, python -m bench compare,
    the suite's expected rows)."""
    kind = r.get("kind")
    if kind == "kernel":
        return (kind,) + tuple(r.get(f) for f in KERNEL_KEY)
    tp, tiles = variant(r)
    sp = r.get("sampling")
    return (kind,) + tuple(r.get(f) for f in DECODE_KEY) + ((f"TP={tp}",) if tp > 1 else ()) \
        + (("untuned",) if tiles == "untuned" else ()) \
        + ((f"sampled T={sp['temperature']} k={sp['top_k']} p={sp['top_p']}",) if sp else ())


def merge(docs: list[dict]) -> dict:
    """Runs concatenated; a later row with the same key (`row_key`) replaces an earlier one."""
    rows: dict = {}
    for d in docs:
        for r in d["rows"]:
            rows[row_key(r)] = r
    return dict(schema=SCHEMA, runs=[r for d in docs for r in d.get("runs", [])], rows=list(rows.values()))


# ----- Markdown --------------------------------------------------------------------------------

def _num(v, fmt="{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def figure(v) -> str:
    """A measured figure with the digits it needs: 3,012 / 41.5 / 0.012 (a CPU's TFLOP/s), "-" if none."""
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2g}"


DECODE_NOTE = ("decode tok/s: decode time only (the first new token comes from prefill); end-to-end tok/s: all new "
               "tokens over the wall time of the implementation's generate() call (the twins' runner.generate(): "
               "prefill and host overhead included).")


def decode_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("kind") == "decode"]
    if not rows:
        return ""
    batches = sorted({r["batch"] for r in rows})
    lines = ["| model | implementation | "
             + " | ".join(f"batch {b}: decode tok/s (% of floor) / end-to-end tok/s" for b in batches)
             + " | prefill tok/s (seconds) |", "|---|---|" + "---|" * (len(batches) + 1)]
    floors = {}
    for r in rows:
        if r.get("bw_floor_tok_s"):
            floors.setdefault((r["model"], r["batch"]), r["bw_floor_tok_s"])
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        if any((m, b) in floors for b in batches):
            cells = [_num(floors.get((m, b)), "{:,.0f}") for b in batches]
            lines.append(f"| {m} | bandwidth floor (weights + KV over measured copy bandwidth) | "
                         + " | ".join(cells) + " | - |")
        impls = sorted({(r["impl"], variant(r)) for r in rows if r["model"] == m},
                       key=lambda i: (DECODE_ORDER.index(i[0]) if i[0] in DECODE_ORDER else 99, i[1]))
        for impl, var in impls:
            by_b = {r["batch"]: r for r in rows if r["model"] == m and (r["impl"], variant(r)) == (impl, var)}
            cells = []
            for b in batches:
                r = by_b.get(b)
                if r is None:
                    cells.append("not run")
                elif r.get("decode_tok_s"):
                    cells.append(f"{r['decode_tok_s']:,.1f} ({_num(r.get('pct_bw_floor'), '{:.0f}')}%) / "
                                 f"{_num(r.get('end_to_end_tok_s'))}")
                else:
                    cells.append("error" if not str(r.get("error", "")).startswith(("unavailable", "skipped"))
                                 else r["error"].split(":")[0])
            pre = next((by_b[b] for b in sorted(by_b) if by_b[b].get("prefill_tok_s")), None)
            label = next(iter(by_b.values())).get("label", impl)
            seconds = f", {pre['prefill_s']:.3g} s" if pre and pre.get("prefill_s") else ""
            pre_cell = f"{pre['prefill_tok_s']:,.0f} (batch {pre['batch']}{seconds})" if pre else "-"
            lines.append(f"| {m} | {label} | " + " | ".join(cells) + f" | {pre_cell} |")
    return "\n".join(lines)


def kernel_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("kind") == "kernel"]
    if not rows:
        return ""
    # a peer library's row of the same case (torch's SDPA beside prefill_attention), whichever job timed it
    sdpa = {(r["op"], r["model"], r["phase"], r["tokens"]): r for r in rows if r["impl"] == "sdpa"}
    rows = [r for r in rows if r["impl"] != "sdpa"]
    lines = ["| framework | op | model | phase | T | fused us | plain us | speedup | fused GB/s (% copy) "
             "| fused TFLOP/s (% matmul) | fused % of roofline |"
             + (" SDPA us, TFLOP/s (fused speedup) |" if sdpa else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sdpa else "")]
    keys = list(dict.fromkeys((r["framework"], r["op"], r["model"], r["phase"], r["tokens"]) for r in rows))
    # each case's frameworks side by side, in the order the cases first appear (each framework's
    # rows come from a process of its own, one framework after the other)
    first: dict = {}
    for k in keys:
        first.setdefault(k[1:], len(first))
    keys.sort(key=lambda k: first[k[1:]])
    for k in keys:
        pair = {r["impl"]: r for r in rows if (r["framework"], r["op"], r["model"], r["phase"], r["tokens"]) == k}
        f, p = pair.get("fused", {}), pair.get("plain", {})
        ctx = f" (ctx {f.get('ctx') or p.get('ctx')})" if k[1] == "decode_attention" else ""
        fw = k[0] + (" (fused: interpreter)" if f.get("kernels") == "interpreter" else "")
        us = lambda r: _num(r.get("us"), "{:,.1f}") if r.get("us") else ("n/a" if r.get("error") else "-")  # noqa: E731
        lines.append(
            f"| {fw} | {k[1]}{ctx} | {k[2]} | {k[3]} | {k[4]} | {us(f)} | {us(p)} | "
            f"{_num(f.get('speedup_vs_plain'), '{:.2f}x')} | "
            f"{figure(f.get('GBps'))} ({_num(f.get('pct_copy_bw'), '{:.0f}')}%) | "
            f"{figure(f.get('TFLOPs'))} ({_num(f.get('pct_matmul'), '{:.0f}')}%) | "
            f"{_num(f.get('pct_roofline'), '{:.0f}')}% |" + (f" {_sdpa_cell(f, sdpa.get(k[1:]))} |" if sdpa else ""))
    return "\n".join(lines)


def _sdpa_cell(fused: dict, peer: dict | None) -> str:
    """The SDPA peer's time and TFLOP/s, and the fused row's speedup over it (SDPA time / fused time)."""
    if not peer:
        return "-"
    if not peer.get("us"):
        return "n/a" if peer.get("error") else "-"
    speedup = peer["us"] / fused["us"] if fused.get("us") else None
    return f"{_num(peer['us'], '{:,.1f}')}, {figure(peer.get('TFLOPs'))} ({_num(speedup, '{:.2f}x')})"


def errors_list(rows: list[dict], limit: int = 40) -> str:
    seen, lines = {}, []
    for r in rows:
        if not r.get("error"):
            continue
        what = (f"{r['framework']} {r['impl']} {r['op']}" if r.get("kind") == "kernel"
                else f"{r['framework']} stage {r['stage']} {r['weights']}" if r.get("kind") == "stage"
                else f"ttft {r['framework']} {r['run']}" if r.get("kind") == "ttft"
                else f"decode {r.get('impl')}")
        seen.setdefault((what, r["error"][:160]), []).append(r)
    for (what, err), rs in list(seen.items())[:limit]:
        lines.append(f"- {what} ({len(rs)} row{'s' if len(rs) > 1 else ''}): {err}")
    if len(seen) > limit:
        lines.append(f"- ... {len(seen) - limit} more distinct errors in the JSON")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    parts = []
    for run in doc.get("runs", [])[:4]:
        env, c = run.get("env", {}), run.get("ceilings", {})
        v = env.get("versions", {})
        if env.get("smoke"):  # no GPU: say what ran and that its ceilings are the CPU's
            where = (f"on CPU ({env.get('cpu') or '?'}; --smoke: shrunk models, fused kernels in their "
                     f"interpreters)")
            ceil = "CPU ceilings measured in the run (no GPU)"
        else:
            where = f"on {env.get('gpu', '?')} (driver {env.get('driver', '?')})"
            ceil = "Ceilings measured in the run"
        parts.append(f"Run {env.get('date', '?')} {where}, commit "
                     f"{env.get('commit', '?')}; jax {v.get('jax', '-')}, torch {v.get('torch', '-')}, triton "
                     f"{v.get('triton', '-')}, transformers {v.get('transformers', '-')}. {ceil}: copy "
                     f"{figure(c.get('copy_GBps'))} GB/s, bf16 matmul {figure(c.get('matmul_TFLOPs'))} TFLOP/s.")
    dec, ker, err = decode_table(doc["rows"]), kernel_table(doc["rows"]), errors_list(doc["rows"])
    if dec:
        s = next((r for r in doc["rows"] if r.get("kind") == "decode"), {})
        hf = sorted({r["batch"] for r in doc["rows"] if r.get("kind") == "decode" and str(r.get("impl")).startswith("hf")})
        note = (f"\n\nThe transformers peers ran at batch {', '.join(map(str, hf))} only (they are slow; "
                f"--hf-batch adds more)." if hf else "")
        sp = s.get("sampling")
        how = (f"Sampled decode (temperature {sp['temperature']}, top-k {sp['top_k']}, top-p {sp['top_p']}; "
               if sp else "Greedy decode (")
        parts.append(f"### {how}{s.get('prompt_len')}-token prompt, {s.get('new_tokens')} new tokens, "
                     f"best run; % of the bandwidth floor in brackets)\n\n{dec}\n\n{DECODE_NOTE}{note}")
    if ker:
        parts.append("### Fused kernels vs the plain ops of the same framework (median per call)\n\n" + ker)
    stage = stages_table(doc["rows"])
    if stage:
        parts.append("### Batch-1 decode stages (median per call; GB/s with % of the copy bandwidth and % of a "
                     "plain read of the same bytes)\n\n" + stage)
    first = ttft_table(doc["rows"])
    if first:
        parts.append("### Time to first token (each run a process of its own: fresh compile caches, a second "
                     "process, a warm-up at load; first text from the process's start)\n\n" + first)
    if err:
        parts.append("### Not measured\n\n" + err)
    return "\n\n".join(parts) + "\n"


# ----- plots -----------------------------------------------------------------------------------

def plots(doc: dict, out_dir: Path) -> list[Path]:
    """decode.png and kernels_bw.png with matplotlib's Agg backend; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows = doc["rows"]
    dec = [r for r in rows if r.get("kind") == "decode" and r.get("decode_tok_s")]
    if dec:
        models = list(dict.fromkeys(r["model"] for r in dec))
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
        for ax, m in zip(axes[0], models):
            mr = [r for r in dec if r["model"] == m]
            batches = sorted({r["batch"] for r in mr})
            impls = [(i, v) for i in DECODE_ORDER for v in sorted({variant(r) for r in mr})
                     if any((r["impl"], variant(r)) == (i, v) for r in mr)]
            width = 0.8 / max(1, len(impls))
            for j, (impl, (tp, tiles)) in enumerate(impls):
                xs, ys, e2e = [], [], []
                for bi, b in enumerate(batches):
                    r = next((r for r in mr if (r["impl"], variant(r)) == (impl, (tp, tiles)) and r["batch"] == b),
                             None)
                    if r:
                        xs.append(bi + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["decode_tok_s"])
                        if r.get("end_to_end_tok_s"):
                            e2e.append((xs[-1], r["end_to_end_tok_s"]))
                bars = ax.bar(xs, ys, width, label=impl + (f" TP={tp}" if tp > 1 else "")
                              + (" untuned" if tiles == "untuned" else ""))
                if e2e:  # end-to-end generate() tok/s: a marker on its decode bar
                    ax.plot(*zip(*e2e), "v", color=bars.patches[0].get_facecolor(), markeredgecolor="black",
                            linestyle="none", label="end-to-end generate()" if j == 0 else None)
            for bi, b in enumerate(batches):
                fl = next((r.get("bw_floor_tok_s") for r in mr if r["batch"] == b and r.get("bw_floor_tok_s")), None)
                if fl:
                    ax.hlines(fl, bi - 0.45, bi + 0.45, colors="black", linestyles="dashed",
                              label="bandwidth floor" if bi == 0 else None)
            ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
            ax.set_yscale("log")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(m)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "decode.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    ker = [r for r in rows if r.get("kind") == "kernel" and r.get("GBps")]
    if ker:
        ops = list(dict.fromkeys(r["op"] for r in ker))
        models = list(dict.fromkeys(r["model"] for r in ker))
        fig, axes = plt.subplots(len(ops), len(models), figsize=(5.5 * len(models), 3.3 * len(ops)), squeeze=False)
        ceil = next((r["ceiling_copy_GBps"] for r in ker if r.get("ceiling_copy_GBps")), None)
        for i, op in enumerate(ops):
            for j, m in enumerate(models):
                ax = axes[i][j]
                for fw in ("jax", "torch"):
                    for impl, style in (("fused", "-o"), ("plain", "--x")):
                        pts = sorted((r["tokens"], r["GBps"]) for r in ker
                                     if (r["op"], r["model"], r["framework"], r["impl"]) == (op, m, fw, impl))
                        if pts:
                            ax.plot(*zip(*pts), style, label=f"{fw} {impl}")
                if ceil:
                    ax.axhline(ceil, color="black", linestyle=":", label="copy ceiling")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{op} - {m}", fontsize=9)
                ax.set_xlabel("tokens (decode batch / prefill tokens)", fontsize=8)
                ax.set_ylabel("GB/s", fontsize=8)
                ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out_dir / "kernels_bw.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def finish(doc: dict, out_dir: Path, *, plot: bool = True) -> str:
    """Write bench.json, bench.md and the plots to out_dir; return the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / JSON_NAME, doc)
    md = markdown(doc)
    (out_dir / MD_NAME).write_text(md)
    if plot:
        try:
            plots(doc, out_dir)
        except Exception as e:  # noqa: BLE001 - the numbers are on disk already; say why no plot
            md += f"\n(plots failed: {type(e).__name__}: {e})\n"
    return md
