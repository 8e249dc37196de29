"""The generate command line, shared by `python -m jax_impl.generate` and `python -m torch_impl.generate`.

    from common.cli import main
    main(load, prog="python -m jax_impl.generate")

`load(model_dir, *, dtype, fused) -> Runner` is the twin's loader (common.harness interface).
For one prompt the text streams as it is produced when the runner has

    generate_stream(prompt_ids: list[int], max_new_tokens, *, temperature, top_k, top_p, seed,
                    eos_token_id) -> iterator of lists of token ids

where each yielded list holds the tokens produced since the previous yield (not cumulative);
otherwise `generate()` runs and its text is printed. A batch prints each completion. Completions
go to stdout; the timing report (prompt tokens, prefill time, decode tokens/s) to stderr, from
the runner's `last_stats` dict (prefill_s, decode_s, new_tokens = all new tokens of the batch)
when it has one, else from the wall-clock time of the call.

Defaults: --temperature/--top-k/--top-p from generation_config.json when it samples, else
greedy; eos from generation_config.json (int or list), else tokenizer_config.json's eos_token.
Bad input is a one-line `error:` on stderr naming the flag or file (exit 2); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from common.config import ConfigError, Qwen3Config
from common.harness import resolve_fused
from common.textgen import (StreamDecoder, TextError, chat_template, eos_token_ids, load_tokenizer, read_json,
                            render_chat, sampling_defaults)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate text with a Qwen3 checkpoint.")
    p.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (default: the shipped model)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", metavar="FILE", help="one prompt per line ('-' reads stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json's when it samples, else 0)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation_config.json's)")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1] (default: generation_config.json's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    return p


# ----- input --------------------------------------------------------------------------------------

def resolve_model_dir(arg: str | None) -> Path:
    if arg is None:
        import common

        default = getattr(common, "default_model", None)
        if default is None:
            raise CLIError("--model: no model directory given and no default model is installed")
        try:
            arg = default()
        except Exception as e:
            raise CLIError(f"--model: no model directory given and the default model is unavailable ({e})") from None
        if arg is None:
            raise CLIError("--model: no model directory given and no default model is installed")
    path = Path(arg)
    if not path.is_dir():
        raise CLIError(f"--model: directory {path} does not exist")
    return path


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise CLIError(f"--prompt: prompt {i + 1} is empty")
    if args.prompt_file:
        if args.prompt_file == "-":
            text = sys.stdin.read()
        else:
            path = Path(args.prompt_file)
            if not path.is_file():
                raise CLIError(f"--prompt-file: {path} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CLIError(f"--prompt-file: {path} is not UTF-8 text ({e})") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"--prompt-file: {args.prompt_file} holds no prompt (empty file)")
        prompts += lines
    if not prompts:
        raise CLIError("--prompt: give at least one --prompt TEXT or a --prompt-file FILE")
    return prompts


def sampling_args(args, model_dir: Path) -> dict:
    s = sampling_defaults(model_dir)
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens={args.max_new_tokens}: expected an integer >= 1")
    if not s["temperature"] >= 0:
        raise CLIError(f"--temperature={s['temperature']}: expected >= 0 (0 = greedy)")
    if s["top_k"] < 0:
        raise CLIError(f"--top-k={s['top_k']}: expected an integer >= 0 (0 = off)")
    if not 0.0 < s["top_p"] <= 1.0:
        raise CLIError(f"--top-p={s['top_p']}: expected a value in (0, 1]")
    return s


def encode_prompts(prompts: list[str], model_dir: Path, tokenizer, cfg: Qwen3Config, args) -> list[list[int]]:
    if args.chat:
        template = chat_template(model_dir)
        tcfg = read_json(model_dir / "tokenizer_config.json")
        texts = [render_chat(template, [{"role": "user", "content": p}], tcfg) for p in prompts]
        ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    else:
        ids = [tokenizer.encode(p).ids for p in prompts]
    limit = cfg.max_position_embeddings
    for i, seq in enumerate(ids):
        if not seq:
            raise CLIError(f"--prompt: prompt {i + 1} encodes to no tokens")
        if max(seq) >= cfg.vocab_size:
            raise CLIError(f"{model_dir / 'tokenizer.json'}: token id {max(seq)} is outside the model's "
                           f"vocab_size={cfg.vocab_size}")
        if len(seq) + args.max_new_tokens > limit:
            raise CLIError(f"--prompt: prompt {i + 1} has {len(seq)} tokens; with --max-new-tokens="
                           f"{args.max_new_tokens} that exceeds max_position_embeddings={limit}")
    return ids


# ----- output -------------------------------------------------------------------------------------

def _stream(runner, ids: list[int], max_new: int, kw: dict, tokenizer, out: TextIO, timing: dict) -> list[int]:
    dec = StreamDecoder(tokenizer)
    timing["first"] = None
    try:
        for chunk in runner.generate_stream(ids, max_new, **kw):
            if timing["first"] is None:
                timing["first"] = (time.perf_counter(), len(chunk))
            out.write(dec.push(chunk))
            out.flush()
    finally:  # on Ctrl-C too: print what was produced
        out.write(dec.finish() + "\n")
        out.flush()
    return dec.ids


def report(runner, prompt_ids: list[list[int]], new_ids: list[list[int]], total_s: float, timing: dict,
           err: TextIO) -> None:
    n_prompt = sum(map(len, prompt_ids))
    n_new = sum(map(len, new_ids))
    head = f"prompt tokens: {n_prompt}" + (f" ({len(prompt_ids)} prompts)" if len(prompt_ids) > 1 else "")
    stats = getattr(runner, "last_stats", None)
    if isinstance(stats, dict) and {"prefill_s", "decode_s", "new_tokens"} <= set(stats):
        decode_s, n = float(stats["decode_s"]), int(stats["new_tokens"])
        rate = f"{n / decode_s:.1f} tok/s" if decode_s > 0 else "n/a"
        err.write(f"{head} | prefill {float(stats['prefill_s']):.3f} s | decode {n} tokens in "
                  f"{decode_s:.3f} s = {rate}\n")
    elif timing.get("first"):
        t_first, n_first = timing["first"]
        ttft, rest = t_first - timing["start"], timing["end"] - t_first
        n = n_new - n_first
        rate = f"{n / rest:.1f} tok/s" if rest > 0 and n > 0 else "n/a"
        err.write(f"{head} | time to first token {ttft:.3f} s | decode {n} tokens in {rest:.3f} s = {rate}\n")
    else:
        rate = f"{n_new / total_s:.1f} tok/s" if total_s > 0 else "n/a"
        err.write(f"{head} | generate {n_new} tokens in {total_s:.3f} s = {rate} (prefill included)\n")


# ----- main ---------------------------------------------------------------------------------------

def run(load_fn: Callable, argv=None, *, prog: str | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """The whole command; returns the exit status (0, 2 bad input, 130 interrupted)."""
    out, err = out or sys.stdout, err or sys.stderr
    # The twins log their one fused-or-plain choice at INFO: show it on stderr.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=err)
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # usage errors (exit 2) and --help (exit 0), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return _run(load_fn, args, out, err)
    except (CLIError, TextError, ConfigError) as e:
        err.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out.flush()
        err.write("\ninterrupted\n")
        return EXIT_INTERRUPTED


def _run(load_fn: Callable, args, out: TextIO, err: TextIO) -> int:
    model_dir = resolve_model_dir(args.model)
    cfg = Qwen3Config.from_pretrained(model_dir)
    prompts = read_prompts(args)
    kw = sampling_args(args, model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompts(prompts, model_dir, tokenizer, cfg, args)
    eos = eos_token_ids(model_dir, tokenizer)
    kw.update(seed=args.seed, eos_token_id=eos or None)
    try:
        runner = load_fn(str(model_dir), dtype=args.dtype, fused=resolve_fused(args.fused))
    except (ValueError, NotImplementedError, RuntimeError, ImportError, OSError) as e:
        raise CLIError(f"--model {model_dir} (--dtype {args.dtype}, --fused {args.fused}): {e}") from None
    timing = {"start": time.perf_counter()}
    streamed = len(prompt_ids) == 1 and hasattr(runner, "generate_stream")
    try:
        if streamed:
            new_ids = [_stream(runner, prompt_ids[0], args.max_new_tokens, kw, tokenizer, out, timing)]
        else:
            new_ids = runner.generate(prompt_ids, args.max_new_tokens, **kw)
    except ValueError as e:  # GenerationArgsError, or a runner's own limit (cache size, ...)
        raise CLIError(str(e)) from None
    timing["end"] = time.perf_counter()
    if not streamed:
        for i, (prompt, ids) in enumerate(zip(prompts, new_ids)):
            text = tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
            if len(prompts) > 1:
                out.write(("\n" if i else "") + f"[{i + 1}] {prompt}\n")
            out.write(text + "\n")
        out.flush()
    report(runner, prompt_ids, new_ids, timing["end"] - timing["start"], timing, err)
    return 0


def main(load_fn: Callable, prog: str | None = None, argv=None) -> None:
    sys.exit(run(load_fn, argv, prog=prog))
