"""Time to first token as a user meets it: each twin's generate command in processes of its own.

    python -m bench ttft [--models ...] [--frameworks jax,torch] [--prompt-len N[,N...]] [--new-tokens N]

Per twin, model and prompt length, on a random checkpoint with a tokenizer (written once), a prompt
of about `--prompt-len` tokens is generated four times, each run a process of its own:
- fresh: empty compile caches (jax_impl's persistent cache and Triton's kernel cache in a new
  folder, `XDG_CACHE_HOME` and `TRITON_CACHE_DIR`);
- second: the same caches, filled by the fresh run;
- warm: the same caches and `--warmup` of the call's shape, so the programs are compiled at load
  and the call's first token waits for its prefill alone;
- new-bucket: caches of its own, empty, and `--warmup` of another prompt bucket (`other_bucket`):
  the call meets a prompt bucket its running process has not compiled (--smoke leaves it out).
Each row carries `first_text_s`, seconds from the process's start to its first byte of text on
stdout (imports, loading, compiling and prefill included: what a user waits for), the command's own
stderr figures from its call (`first_token_s` with `compile_first_s` and `prefill_s` inside it) and
the process's wall time. The prompt's token count is the command's (`prompt_tokens`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("fresh", "second", "warm", "new-bucket")
SMOKE_RUNS = RUNS[:3]
TIMEOUT_S = 900  # one generate process at most (a fresh jax_impl process compiles its programs)
_STATS = re.compile(r"prompt tokens: (?P<prompt>\d+).*?first token (?P<first>[\d.]+) s \((?:compile (?P<compile>[\d.]+) s, )?"
                    r"prefill (?P<prefill>[\d.]+) s\)")


def prompt_text(tokens: int) -> str:
    """A prompt of about `tokens` tokens for the byte-level tokenizers of bench's checkpoints."""
    return " ".join(["x"] * max(1, tokens))


def command(fw: str, model_dir: Path, prompt: str, new_tokens: int, *, warmup: str | None, fused: str) -> list[str]:
    cmd = [sys.executable, "-m", f"{fw}_impl.generate", "--model", str(model_dir), "--prompt", prompt,
           "--max-new-tokens", str(new_tokens), "--ignore-eos", "--temperature", "0", "--fused", fused]
    return cmd + (["--warmup", warmup] if warmup else [])


def run_once(cmd: list[str], env: dict, timeout: float = TIMEOUT_S) -> dict:
    """Run `cmd`; seconds to its first byte of stdout and in all, and its stderr figures."""
    t0 = time.perf_counter()
    first = None
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        try:
            while True:
                b = proc.stdout.read1(1)
                if not b:
                    break
                if first is None:
                    first = time.perf_counter() - t0
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return dict(error=f"timed out after {timeout:.0f} s")
        finally:
            proc.stdout.close()
        wall = time.perf_counter() - t0
        err.seek(0)
        text = err.read().decode(errors="replace")
    if rc != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit status {rc}"]
        return dict(error=f"exit status {rc}: {last[0][:300]}")
    out = dict(first_text_s=first, wall_s=wall)
    m = _STATS.search(text)
    if m:
        out.update(prompt_tokens=int(m["prompt"]), first_token_s=float(m["first"]), prefill_s=float(m["prefill"]),
                   compile_first_s=float(m["compile"] or 0.0))
    return out


def other_bucket(prompt_len: int) -> int:
    """A prompt length in another bucket than prompt_len's (common.buckets: powers of two from
    MIN_PROMPT, 16): the smallest bucket, or 8 times it for prompts that fit the smallest."""
    from common.buckets import MIN_PROMPT  # noqa: PLC0415

    return MIN_PROMPT if prompt_len > MIN_PROMPT else 8 * MIN_PROMPT


def _warmup(run: str, prompt_len: int, new_tokens: int) -> str | None:
    if run == "warm":
        return f"1x{max(16, prompt_len * 2)}x{new_tokens}"
    return f"1x{other_bucket(prompt_len)}x{new_tokens}" if run == "new-bucket" else None


def measure(fw: str, model: str, model_dir: Path, prompt_len: int, new_tokens: int, *, fused: str,
            emit, progress, runs=RUNS) -> None:
    """The runs of one twin, model and prompt length, each emitted as a row as it ends."""
    prompt = prompt_text(prompt_len)
    with tempfile.TemporaryDirectory(prefix="bench-ttft-cache-") as cache:
        for run in runs:
            folder = Path(cache) / ("own" if run == "new-bucket" else "shared")
            env = dict(os.environ, XDG_CACHE_HOME=str(folder / "xdg"), TRITON_CACHE_DIR=str(folder / "triton"))
            progress(f"  ttft {fw} {model} {prompt_len} tokens: {run}")
            row = dict(kind="ttft", framework=fw, model=model, run=run, prompt_len=prompt_len, new_tokens=new_tokens,
                       fused=fused)
            cmd = command(fw, model_dir, prompt, new_tokens, warmup=_warmup(run, prompt_len, new_tokens), fused=fused)
            emit(dict(row, **run_once(cmd, env)))


def expected_rows(frameworks, models, prompt_lens, new_tokens: int, fused: str, runs=RUNS) -> list[dict]:
    return [dict(kind="ttft", framework=fw, model=m, run=run, prompt_len=n, new_tokens=new_tokens, fused=fused)
            for fw in frameworks for m in models for n in prompt_lens for run in runs]


def table(rows: list[dict]) -> str:
    """Markdown: per twin and model, each run's first text and the command's first-token figures."""
    rows = [r for r in rows if r.get("kind") == "ttft"]
    if not rows:
        return ""
    lines = ["| model | twin | prompt | run | first text, s | first token, s (compile, prefill) | wall, s | prompt tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = f"| {r['model']} | {r['framework']} | {r['prompt_len']} | {r['run']} |"
        if r.get("error"):
            lines.append(f"{lead} - | {r['error'][:80]} | - | - |")
            continue
        ft = (f"{r['first_token_s']:.3f} ({r.get('compile_first_s', 0.0):.2f}, {r['prefill_s']:.3f})"
              if r.get("first_token_s") is not None else "-")
        text = f"{r['first_text_s']:.2f}" if r.get("first_text_s") is not None else "-"
        lines.append(f"{lead} {text} | {ft} | {r['wall_s']:.2f} | {r.get('prompt_tokens', '-')} |")
    return "\n".join(lines)


__all__ = ["RUNS", "SMOKE_RUNS", "other_bucket", "prompt_text", "command", "run_once", "measure", "expected_rows", "table"]
