"""The generate command line, shared by `python -m jax_impl.generate` and `python -m torch_impl.generate`.

    from common.cli import main
    main(load, prog="python -m jax_impl.generate")   # or interrupt.main(lambda: run(load, prog=...))

(The twins' entry modules import this module inside interrupt.main, so that a Ctrl-C while numpy
and the tokenizer load exits 130 as well.)

`load(model_dir, *, dtype, fused) -> Runner` is the twin's loader (common.harness interface).
For one prompt the text streams as it is produced when the runner has

    generate_stream(prompt_ids: list[int], max_new_tokens, *, temperature, top_k, top_p, seed,
                    eos_token_id) -> iterator of lists of token ids

where each yielded list holds the tokens produced since the previous yield (not cumulative);
otherwise `generate()` runs and its text is printed. One prompt on a terminal is echoed dimmed
before its completion; a batch prints each completion under a `=== [i/n] prompt: "..."` line.
Completions go to stdout; the timing report goes to stderr, from the runner's `last_stats` dict
when it has one (STATS_KEYS), else from the wall-clock time of the call.

Defaults: --temperature/--top-k/--top-p from generation_config.json when it samples, else
greedy; eos from generation_config.json (int or list), else tokenizer_config.json's eos_token.
Bad input is a one-line `error:` on stderr naming the flag or file (exit 2); Ctrl-C exits 130.
A closed stdout pipe (`... | head -2`) stops generation and exits 0 without a word: the reader has
what it asked for (status 0 rather than a shell's 141, so `set -o pipefail` scripts do not fail).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from common import argparsing, formats, interrupt, logs
from common.config import ConfigError, Qwen3Config
from common.environment import check_environment
from common.sampling import SEED_MAX
from common.textgen import (StreamDecoder, TextError, chat_template, eos_token_ids, load_tokenizer, read_json,
                            render_chat, sampling_defaults)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = interrupt.EXIT_INTERRUPTED
EXIT_PIPE_CLOSED = 0  # stdout's reader closed the pipe (`... | head`): not an error, the command stops quietly

# Runner.last_stats, as both twins fill it after each generate call (seconds, token counts):
STATS_KEYS = {
    "prompt_tokens": "prompt tokens of the batch",
    "new_tokens": "all new tokens of the batch",
    "decode_tokens": "new tokens made by decode steps (new_tokens less each sequence's first token)",
    "decode_steps": "decode steps run (jax: until every sequence is done; torch: to the end of the chunk)",
    "first_token_s": "from the call to the first tokens, compile included (time to first token)",
    "compile_s": "compile and warm-up time (jax: XLA compiles, each new decode program's first run; "
                 "torch: CUDA-graph captures), all of it",
    "compile_first_s": "the part of compile_s spent before the first token",
    "prefill_s": "prefill, compile excluded",
    "decode_s": "decode steps, compile excluded: decode_tokens / decode_s is the steady rate",
}


class CLIError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: argparse's own, or the rule written in the help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.option_strings == ["-h", "--help"]:
            return text
        return super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparsing.ArgumentParser(prog=prog, description="Generate text with a Qwen3 checkpoint.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", metavar="DIR",
                   help="Hugging Face checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text, repeat for a batch (default: none; give --prompt or --prompt-file)")
    p.add_argument("--prompt-file", metavar="FILE", help="one prompt per line ('-' reads stdin) (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt, at most")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json's when it samples, else 0)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation_config.json's, else 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="in (0, 1] (default: generation_config.json's, else 1)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="sampling seed, an integer in [0, 2**63 - 1] (greedy ignores it)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-new-tokens past any eos (benchmarks)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="a system message before each prompt; implies --chat (default: none)")
    p.add_argument("--no-think", action="store_true",
                   help="render the chat template with enable_thinking=False (Qwen3: no thinking block); "
                        "implies --chat")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="fused kernels: auto = where they run and are faster, on = always (raise if they "
                        "cannot run), off = plain ops")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="weights and activations")
    p.add_argument("--quantization", choices=formats.cli_choices(), default="none",
                   help="store the projections in a one-byte format, weight-only: about half the weight memory "
                        "and traffic (" + formats.cli_help() + "); a quantized checkpoint loads in its own "
                        "format by itself")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N GPUs of this machine (kv heads, the MLP and the projections' "
                        "weights; one all-reduce after o_proj and down); N must divide the kv heads")
    p.add_argument("--warmup", metavar="BxPxN[,...]", default=None,
                   help="compile ahead of time for batch B, prompts of up to P tokens and up to N new tokens "
                        "(e.g. 1x512x256): a later call of B's batch bucket (1, 2, 4, 8, ...) with a shorter "
                        "prompt or budget compiles nothing (torch_impl: captures no CUDA graph); its time is "
                        "reported apart (default: none)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile afresh and keep nothing on disk (default: compiled programs kept: jax_impl's "
                        "in ~/.cache/qwen3-fused/jax, torch_impl's Triton kernels in Triton's cache, "
                        "~/.triton/cache); QWEN3_FUSED_COMPILE_CACHE=0 also turns it off")
    return p


def seed_value(text: str) -> int:
    """--seed's type: an integer in [0, common.sampling.SEED_MAX], the range both twins' generators take."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected 0 .. 2**63 - 1)") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 2**63 - 1]")
    return seed


def parse_warmup(text: str, max_positions: int | None = None) -> list[tuple[int, int, int]]:
    """"1x512x256,8x128x64" -> [(1, 512, 256), (8, 128, 64)]; each shape's prompt and new tokens
    together at most max_positions (the model's max_position_embeddings) when given."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            b, l, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise CLIError(f"--warmup={text}: {part!r} is not BATCHxPROMPTxNEW (e.g. 1x512x256)") from None
        if min(b, l, n) < 1:
            raise CLIError(f"--warmup={text}: {part!r}: every number must be >= 1")
        if max_positions is not None and l + n > max_positions:
            raise CLIError(f"--warmup={text}: {part!r}: {l} prompt tokens + {n} new tokens exceed the model's "
                           f"max_position_embeddings={max_positions}")
        shapes.append((b, l, n))
    if not shapes:
        raise CLIError(f"--warmup={text}: expected BATCHxPROMPTxNEW[,...] (e.g. 1x512x256)")
    return shapes


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
    if path.is_file():
        raise CLIError(f"--model: {path} is a file; expected a checkpoint directory (config.json, "
                       f"*.safetensors, tokenizer.json)")
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
    if not (s["temperature"] >= 0 and math.isfinite(s["temperature"])):
        raise CLIError(f"--temperature={s['temperature']}: expected a finite value >= 0 (0 = greedy)")
    if s["top_k"] < 0:
        raise CLIError(f"--top-k={s['top_k']}: expected an integer >= 0 (0 = off)")
    if not 0.0 < s["top_p"] <= 1.0:
        raise CLIError(f"--top-p={s['top_p']}: expected a value in (0, 1]")
    return s


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or an XLA allocation failure."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def uses_chat(args) -> bool:
    """--system and --no-think shape a chat prompt, so they imply --chat."""
    return bool(args.chat or args.system is not None or args.no_think)


def encode_prompts(prompts: list[str], model_dir: Path, tokenizer, cfg: Qwen3Config, args,
                   err: TextIO | None = None) -> list[list[int]]:
    err = err or sys.stderr
    if uses_chat(args):
        template = chat_template(model_dir)
        tcfg = read_json(model_dir / "tokenizer_config.json")
        extra = {"enable_thinking": False} if args.no_think else {}
        if args.no_think and "enable_thinking" not in template:
            err.write(f"note: {model_dir}'s chat template has no enable_thinking switch; --no-think changes "
                      f"nothing\n")
        system = [{"role": "system", "content": args.system}] if args.system else []
        texts = [render_chat(template, [*system, {"role": "user", "content": p}], tcfg, **extra) for p in prompts]
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

DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def _echo_prompt(prompt: str, chat: bool, out: TextIO) -> None:
    """On a terminal, one prompt is echoed dimmed before its completion, so it is clear where the
    model's text starts; a pipe or file gets the completion alone (NO_COLOR: no echo)."""
    if os.environ.get("NO_COLOR") or not getattr(out, "isatty", lambda: False)():
        return
    out.write(DIM + prompt + PLAIN + ("\n" if chat else ""))


def _stream(runner, ids: list[int], max_new: int, kw: dict, tokenizer, out: TextIO, timing: dict) -> list[int]:
    dec = StreamDecoder(tokenizer)
    timing["first"] = None
    reader_gone = False
    try:
        for chunk in runner.generate_stream(ids, max_new, **kw):
            if timing["first"] is None:
                timing["first"] = (time.perf_counter(), len(chunk))
            out.write(dec.push(chunk))
            out.flush()
    except BrokenPipeError:  # stdout's reader closed the pipe: the stream stops, nothing more to print
        reader_gone = True
        raise
    finally:  # on Ctrl-C too: print what was produced
        if not reader_gone:
            out.write(dec.finish() + "\n")
            out.flush()
    return dec.ids


def batch_header(i: int, n: int, prompt: str) -> str:
    """The line before completion i of n: a shape no completion line is likely to take, with the
    prompt quoted (its newlines escaped), so a completion starting with a newline stays its own."""
    return f"=== [{i}/{n}] prompt: {json.dumps(prompt, ensure_ascii=False)}"


def _print_batch(prompts: list[str], new_ids, tokenizer, out: TextIO) -> None:
    for i, (prompt, ids) in enumerate(zip(prompts, new_ids)):
        text = tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
        if len(prompts) > 1:
            out.write(batch_header(i + 1, len(prompts), prompt) + "\n")
        out.write(text + "\n")
    out.flush()


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if seconds > 0 and n > 0 else "n/a"


def report(runner, prompt_ids: list[list[int]], new_ids: list[list[int]], total_s: float, timing: dict,
           err: TextIO) -> None:
    """One line on stderr: prompt tokens, time to first token (compile and prefill apart), and the
    steady decode rate, which leaves compile time out."""
    n_prompt = sum(map(len, prompt_ids))
    n_new = sum(map(len, new_ids))
    head = f"prompt tokens: {n_prompt}" + (f" ({len(prompt_ids)} prompts)" if len(prompt_ids) > 1 else "")
    stats = getattr(runner, "last_stats", None)
    if isinstance(stats, dict) and {"prefill_s", "decode_s", "new_tokens"} <= set(stats):
        decode_s = float(stats["decode_s"])
        n = int(stats.get("decode_tokens", stats["new_tokens"]))
        parts = [head]
        if "first_token_s" in stats:
            compile_first = float(stats.get("compile_first_s", 0.0))
            detail = f"prefill {float(stats['prefill_s']):.3f} s"
            if compile_first > 0:
                detail = f"compile {compile_first:.2f} s, " + detail
            parts.append(f"first token {float(stats['first_token_s']):.3f} s ({detail})")
        else:
            parts.append(f"prefill {float(stats['prefill_s']):.3f} s")
        line = f"decode {n} tokens in {decode_s:.3f} s = {_rate(n, decode_s)}"
        compile_decode = float(stats.get("compile_s", 0.0)) - float(stats.get("compile_first_s", 0.0))
        if compile_decode > 0.0005:
            line += f" (+ {compile_decode:.2f} s compile, not counted)"
        parts.append(line)
        err.write(" | ".join(parts) + "\n")
    elif timing.get("first"):
        t_first, n_first = timing["first"]
        ttft, rest = t_first - timing["start"], timing["end"] - t_first
        n = n_new - n_first
        err.write(f"{head} | time to first token {ttft:.3f} s | decode {n} tokens in {rest:.3f} s = "
                  f"{_rate(n, rest)}\n")
    else:
        err.write(f"{head} | generate {n_new} tokens in {total_s:.3f} s = {_rate(n_new, total_s)} "
                  f"(prefill included)\n")


# ----- main ---------------------------------------------------------------------------------------

def run(load_fn: Callable, argv=None, *, prog: str | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """The whole command; returns the exit status (0, also when stdout's reader closed the pipe; 2 bad
    input; 130 interrupted)."""
    out, err = out or sys.stdout, err or sys.stderr
    logs.show_project_logs(err)  # the twins' one fused-or-plain line; never other libraries' INFO lines
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # usage errors (exit 2, one line: common.argparsing) and --help (exit 0), printed
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return _run(load_fn, args, out, err)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; generation stops, quietly
        _discard_output(out)
        return EXIT_PIPE_CLOSED
    except (CLIError, TextError, ConfigError) as e:
        err.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out.flush()
        err.write("\ninterrupted\n")
        return EXIT_INTERRUPTED


def _run(load_fn: Callable, args, out: TextIO, err: TextIO) -> int:
    try:
        check_environment()  # QWEN3_FUSED_COMPILE_CACHE, QWEN3_TILE_TABLES: on every backend
    except ValueError as e:
        raise CLIError(str(e)) from None
    model_dir = resolve_model_dir(args.model)
    cfg = Qwen3Config.from_pretrained(model_dir)
    prompts = read_prompts(args)
    kw = sampling_args(args, model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompts(prompts, model_dir, tokenizer, cfg, args, err)
    eos = eos_token_ids(model_dir, tokenizer)
    kw.update(seed=args.seed, eos_token_id=None if args.ignore_eos else (eos or None))
    warmup = []
    if args.warmup is not None:  # with the sampling this command uses, so the very programs it runs compile
        warmup = [dict(batch=b, prompt_tokens=l, new_tokens=n, temperature=kw["temperature"], top_k=kw["top_k"],
                       top_p=kw["top_p"]) for b, l, n in parse_warmup(args.warmup, cfg.max_position_embeddings)]
    quant = f", --quantization {args.quantization}" if args.quantization != "none" else ""
    quant += f", --tensor-parallel-size {args.tensor_parallel_size}" if args.tensor_parallel_size != 1 else ""
    where = f"--model {model_dir} (--dtype {args.dtype}, --fused {args.fused}{quant})"
    from common.load_options import LoadOptions  # noqa: PLC0415 - numpy: after the Ctrl-C handler (run)

    try:  # common.load_options: checked here, once, as load() checks them
        opts = LoadOptions(dtype=args.dtype, fused=args.fused, quantization=args.quantization,
                           tensor_parallel_size=args.tensor_parallel_size, warmup=warmup,
                           compile_cache=not args.no_compile_cache)
        extra = {k: (list(v) if k == "warmup" else v) for k, v in opts.changed().items()
                 if k not in ("dtype", "fused")}
        runner = load_fn(str(model_dir), dtype=opts.dtype, fused=opts.fused, **extra)
    except (ValueError, NotImplementedError, RuntimeError, ImportError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = " (out of memory loading the weights: see docs/USER_GUIDE.md, Memory)" if is_out_of_memory(e) else ""
        raise CLIError(f"{where}: {first}{hint}") from None
    if getattr(runner, "warmup_s", 0):
        err.write(f"warm-up: {len(opts.warmup)} shape(s) compiled in {runner.warmup_s:.2f} s\n")
    try:
        return _generate(runner, args, prompts, prompt_ids, kw, tokenizer, out, err)
    finally:
        if hasattr(runner, "close"):  # torch_impl under tensor parallelism: its worker processes
            runner.close()


def _generate(runner, args, prompts, prompt_ids, kw, tokenizer, out: TextIO, err: TextIO) -> int:
    timing = {"start": time.perf_counter()}
    streamed = len(prompt_ids) == 1 and hasattr(runner, "generate_stream")
    try:
        if streamed:
            _echo_prompt(prompts[0], uses_chat(args), out)
            new_ids = [_stream(runner, prompt_ids[0], args.max_new_tokens, kw, tokenizer, out, timing)]
        else:
            new_ids = runner.generate(prompt_ids, args.max_new_tokens, **kw)
    except ValueError as e:  # GenerationArgsError, or a runner's own limit (cache size, ...)
        raise CLIError(str(e)) from None
    except RuntimeError as e:  # torch.OutOfMemoryError, jax's RESOURCE_EXHAUSTED
        if not is_out_of_memory(e):
            raise
        raise CLIError(f"out of memory generating {len(prompt_ids)} prompt(s) x --max-new-tokens="
                       f"{args.max_new_tokens} with --dtype {args.dtype}: use fewer or shorter prompts, fewer new "
                       f"tokens, or a GPU with more memory ({str(e).splitlines()[0][:200]})") from None
    timing["end"] = time.perf_counter()
    if not streamed:
        _print_batch(prompts, new_ids, tokenizer, out)
    report(runner, prompt_ids, new_ids, timing["end"] - timing["start"], timing, err)
    return 0


def _discard_output(out: TextIO) -> None:
    """After a closed pipe: point stdout's file descriptor at os.devnull (the Python documentation's
    recipe for SIGPIPE), so that the text still buffered goes nowhere instead of failing again at exit."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(load_fn: Callable, prog: str | None = None, argv=None) -> None:
    """The command: exit status 0, 2 on bad input, 130 on Ctrl-C at any moment (common.interrupt)."""
    interrupt.main(lambda: run(load_fn, argv, prog=prog))
