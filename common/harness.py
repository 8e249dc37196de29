"""The Runner interface both twins implement, the reference runner, and the runner registry.

    load(model_dir, *, dtype="bfloat16", fused="auto") -> Runner
    Runner.logits(token_ids)            int [batch, seq] -> float32 numpy [batch, seq, vocab]
    Runner.generate(prompts, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                    eos_token_id=None) -> list[list[int]]   (new tokens only; 0 = greedy)
    Runner.generate_stream(prompt_ids, max_new_tokens, *, chunk=16, **sampling) -> one prompt's new tokens, in pieces

`fused`: "auto" (fused kernels where the GPU supports them, plain path elsewhere, logged once),
True (fused; on CPU through the interpreter; raise when they cannot run), False (plain).
Runners by name (`get_loader`): "reference" (numpy), "hf" (transformers), and the twins of common.backend.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from common import backend, reference, sampling
from common.config import Qwen3Config
from common.weights import Checkpoint, round_trip_projections

FUSED_CHOICES = ("auto", True, False)
DTYPES = ("float32", "bfloat16", "float16")


def resolve_fused(fused) -> str | bool:
    """Normalize a fused flag: "auto"/"on"/"off"/True/False -> "auto" | True | False."""
    aliases = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if isinstance(fused, bool):
        return fused
    if isinstance(fused, str) and fused.lower() in aliases:
        return aliases[fused.lower()]
    raise ValueError(f"fused={fused!r}: expected 'auto', True ('on') or False ('off')")


def check_token_ids(token_ids, vocab_size: int, max_len: int | None = None) -> np.ndarray:
    """int [batch, seq] ids of the vocabulary, at most `max_len` (max_position_embeddings) per row."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids: expected an integer array [batch, seq], got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token_ids: ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"token_ids: {ids.shape[1]} tokens exceed max_position_embeddings={max_len}")
    return ids


class Runner(abc.ABC):
    """One model on one checkpoint; see the module doc for the contract. A runner implements
    `logits` and `_run`, the generator of one call's tokens; `generate` and `generate_stream` are
    the same for every runner over it."""

    name: str = "runner"
    config: Qwen3Config
    generate_chunk: int | None = None  # decode steps per round of a plain generate (None: the budget at once)
    ops = None  # a twin's: the common.ops.Ops its model runs (op_paths)

    @property
    def decode_path(self) -> str:
        """What the last decode step ran: "per-op" (each op its kernel or plain op), or "one launch per
        layer" (torch_impl's decode_layer kernel, where the tile lookup chooses it)."""
        return "per-op"

    @property
    def op_paths(self) -> dict[str, str]:
        """A twin's: what runs each op, "fused", "plain", or "per-shape" (fused="auto"'s lookup per shape)."""
        return dict(self.ops.paths)

    @abc.abstractmethod
    def logits(self, token_ids) -> np.ndarray:
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None) -> list[list[int]]:
        outs: list[list[int]] = []
        for outs in self._checked_run(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                      chunk=self.generate_chunk):
            pass
        return outs

    def generate_stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, chunk: int = 16,
                        **sampling_kwargs) -> Iterator[list[int]]:
        """Yield the new tokens of one prompt as they are produced, `chunk` decode steps at a time."""
        unknown = set(sampling_kwargs) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"generate_stream: unknown argument(s) {', '.join(sorted(unknown))}")
        done = 0
        for outs in self._checked_run([list(prompt_ids)], max_new_tokens, chunk=chunk,
                                      **(SAMPLING_DEFAULTS | sampling_kwargs)):
            new = outs[0][done:]
            done += len(new)
            if new:
                yield new

    def _checked_run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, *, chunk,
                     **kwargs) -> Iterator[list[list[int]]]:
        """`_run` after common.sampling's checks of the arguments, with the eos ids as a set."""
        cfg = self.config
        sampling.check_generate_args(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     vocab_size=cfg.vocab_size, max_len=cfg.max_position_embeddings, seed=seed)
        return self._run(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_set(eos_token_id),
                         chunk=chunk, **kwargs)

    def warmup(self, shapes) -> float:
        """Compile (build) ahead of time what each shape in `shapes` needs (`warmup_shapes`: (batch,
        prompt tokens, new tokens), greedy unless a dict names the sampling); returns seconds."""
        t0 = time.perf_counter()
        specs = warmup_shapes(shapes)
        for s in self._warmup_order(specs):
            for _ in self._checked_run([[0] * s["prompt_tokens"]] * s["batch"], s["new_tokens"], s["temperature"],
                                       s["top_k"], s["top_p"], 0, None, chunk=self.generate_chunk, warm=True):
                pass
        seconds = time.perf_counter() - t0
        twin = type(self).__module__.partition(".")[0]  # its logger: "jax_impl"
        logging.getLogger(twin).debug(f"{twin}: warm-up of {len(specs)} shape(s) in {seconds:.1f} s")  # the CLI says it
        return seconds

    def _warmup_order(self, specs: list[dict]) -> list[dict]:
        return specs

    @abc.abstractmethod
    def _run(self, prompts, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
             eos: frozenset[int], *, chunk: int | None) -> Iterator[list[list[int]]]:
        """Generate for checked arguments: yield every prompt's new tokens so far (`trim_at_eos`), as
        often as the runner can (at most every `chunk` decode steps, or None: when it likes); the last
        yield holds the whole answer. `warmup` passes warm=True."""


SAMPLING_DEFAULTS = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_token_id=None)


def trim_at_eos(rows, eos) -> list[list[int]]:
    """Each row of tokens cut after its first eos (kept)."""
    return [list(row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]) for row in rows]


def warmup_shapes(shapes) -> list[dict]:
    """load(..., warmup=...)'s shapes as dicts: each (batch, prompt tokens, new tokens), or a dict of
    those (batch, prompt_tokens, new_tokens) with the sampling to compile for (temperature, top_k,
    top_p; greedy when absent)."""
    out = []
    for spec in shapes:
        d = dict(spec) if isinstance(spec, dict) else dict(zip(("batch", "prompt_tokens", "new_tokens"), spec))
        try:
            b, l, n = int(d["batch"]), int(d["prompt_tokens"]), int(d["new_tokens"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"warmup: {spec!r}: expected (batch, prompt tokens, new tokens)") from None
        if min(b, l, n) < 1:
            raise ValueError(f"warmup: {spec!r}: batch, prompt tokens and new tokens must be >= 1")
        out.append(dict(batch=b, prompt_tokens=l, new_tokens=n, temperature=float(d.get("temperature", 0.0)),
                        top_k=int(d.get("top_k", 0)), top_p=float(d.get("top_p", 1.0))))
    return out


def eos_set(eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, (int, np.integer)):
        return frozenset([int(eos_token_id)])
    return frozenset(int(e) for e in eos_token_id)


class ReferenceRunner(Runner):
    """The numpy reference (float64 by default): slow, exact, the baseline of every comparison."""

    name = "reference"

    def __init__(self, model_dir: str | Path, *, dtype=np.float64, quantization=None):
        ckpt = Checkpoint(model_dir)
        self.config = ckpt.config
        self.dtype = dtype
        self.weight_format = ckpt.weight_format(quantization)
        weights = ckpt.read_all("numpy")
        if ckpt.stored_format is None and self.weight_format != "bf16":  # what the twins compute with: q * scale
            weights = round_trip_projections(weights, self.weight_format)
        self.weights = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}

    def logits(self, token_ids) -> np.ndarray:
        ids = check_token_ids(token_ids, self.config.vocab_size)
        return reference.forward(self.weights, self.config, ids, dtype=self.dtype).astype(np.float32)

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, *, chunk):
        rng = np.random.default_rng(seed)
        out = []
        for prompt in prompts:
            seq, new = list(prompt), []
            for _ in range(max_new_tokens):
                last = reference.forward(self.weights, self.config, [seq], dtype=self.dtype)[0, -1]
                tok = sampling.sample_numpy(last, temperature, top_k, top_p, rng)
                new.append(tok)
                seq.append(tok)
                if tok in eos:
                    break
            out.append(new)
        yield out


def load_reference(model_dir: str | Path, *, dtype: str = "float64", fused="auto", quantization=None) -> ReferenceRunner:
    return ReferenceRunner(model_dir, dtype=np.float32 if dtype == "float32" else np.float64, quantization=quantization)


# name -> "module:function" with the load() signature; imported lazily. The twins are runners too:
# every backend of common.backend, by its name.
RUNNERS: dict[str, str] = {
    "reference": "common.harness:load_reference",
    "hf": "common.hf_runner:load",
}


# What each runner needs, checked by `check_runner` before any model loads: the dtypes it computes in
# (the reference: float64 or float32 only; transformers also float64; a twin: DTYPES) and the
# packages it imports (a twin: its backend's `packages`).
RUNNER_DTYPES: dict[str, tuple[str, ...]] = {
    "reference": ("float64", "float32"),
    "hf": ("float64", *DTYPES),
}
RUNNER_PACKAGES: dict[str, tuple[str, ...]] = {
    "reference": (),
    "hf": ("torch", "transformers"),
}


def runner_names() -> tuple[str, ...]:
    return (*RUNNERS, *backend.names())


def runner_dtypes(name: str) -> tuple[str, ...]:
    return RUNNER_DTYPES.get(name, DTYPES)


def check_runner(name: str, *, dtype: str | None = None, fused="auto", weight_format: str = "bf16",
                 label: str | None = None) -> None:
    """Whether runner `name` can run here, without loading a model: a known name, its packages
    installed, `dtype` one it computes in, and with fused=True the twin's own check that its kernels
    run on this machine (the GPU, or the interpreter) for `weight_format`. ValueError naming the
    runner (as `label`, e.g. "torch:on", when given)."""
    get_loader(name)
    label = label or name
    packages = RUNNER_PACKAGES[name] if name in RUNNERS else backend.get(name).packages
    missing = [m for m in packages if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"runner {label!r} is not available: {', '.join(missing)} not installed")
    if dtype is not None and dtype not in runner_dtypes(name):
        raise ValueError(f"runner {label!r}: dtype={dtype!r}: expected one of {', '.join(runner_dtypes(name))}")
    if resolve_fused(fused) is not True or name in RUNNERS:
        return  # "auto" falls back to the plain path where the kernels cannot run; False runs it
    ops = backend.get(name).ops
    try:
        ops.choose_ops(True)  # the device the runner takes by default
        ops.check_weight_format(True, weight_format)
    except RuntimeError as e:  # common.fused.FusedUnavailable
        raise ValueError(f"runner {label!r}: {e}") from None


def get_loader(name: str) -> Callable[..., Runner]:
    if name not in runner_names():
        raise ValueError(f"unknown runner {name!r}: expected one of {', '.join(runner_names())}")
    try:
        if name not in RUNNERS:
            return backend.get(name).load
        module, func = RUNNERS[name].split(":")
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"runner {name!r} is not available: {e}") from None
    if not hasattr(mod, func):
        raise ValueError(f"runner {name!r} is not available: {module} has no {func}()")
    return getattr(mod, func)
