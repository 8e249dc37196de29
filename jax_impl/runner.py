"""`jax_impl.load(model_dir, *, dtype, fused) -> Runner`: common's Runner interface over the NNX model."""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import buckets, harness
from common import formats
from common.config import Qwen3Config
from common.formats import QWeight, head_format
from common.load_options import LoadOptions
from common.weights import Checkpoint
from jax_impl import decode_loop
from jax_impl.arrays import random_qweight
from jax_impl.compilation import compile_seconds, enable_persistent_cache
from jax_impl.model import Qwen3, init_caches
from jax_impl.ops import check_weight_format, choose_ops
from jax_impl.parallel import TensorParallel
from jax_impl.sampling import k_cap_for

log = logging.getLogger("jax_impl")

EOS_SLOTS = 8  # eos ids are padded to a multiple of this (a new eos list compiles nothing)

def load_params(ckpt: Checkpoint, dtype, quantization=None, *, host: bool = False) -> dict:
    """Stream the checkpoint into device arrays following common.weights' packing plan; the
    projections as QWeight (values and float32 scales, common.formats) when they load quantized.
    host=True: numpy arrays in host memory instead (tensor parallel: each rank's shard then goes
    to its own device, and no device holds the whole model).

    Packing and casts run on the host (numpy), each result placed on the device as it is: no
    program is compiled per tensor shape. The NaN/inf check runs once over all parameters, one
    compiled program for the model (`_FiniteCheck`)."""
    params: dict = {"layers": [{} for _ in range(ckpt.config.num_hidden_layers)]}
    dtype = np.dtype(dtype)
    place = (lambda a: a) if host else jax.device_put  # noqa: E731
    convert = lambda a: place(np.asarray(a).astype(dtype, copy=False))  # noqa: E731
    convert_quant = lambda w: QWeight(place(np.asarray(w.q)), place(np.asarray(w.scale, np.float32)), w.fmt)  # noqa: E731
    check = _FiniteCheck(host)
    for layer, key, arr in ckpt.iter_params("numpy", concat=lambda parts: np.concatenate(parts, axis=0),
                                            convert=convert, quantization=quantization,
                                            convert_quant=convert_quant,
                                            all_finite=check.flag):  # NaN/inf: WeightsError
        (params if layer is None else params["layers"][layer])[key] = arr
    return params


class _FiniteCheck:
    """all_finite for common.weights' iter_params: each call keeps its array and returns a flag whose
    truth is read after the last parameter; the first read checks every kept array at once (one
    jitted program over the list on the device, numpy on the host)."""

    def __init__(self, host: bool):
        self.host, self.arrays, self.result = host, [], None

    def flag(self, a) -> "_FiniteFlag":
        self.arrays.append(a)
        return _FiniteFlag(self, len(self.arrays) - 1)

    def ok(self, i: int) -> bool:
        if self.result is None:
            if self.host:
                self.result = [bool(np.isfinite(a).all()) for a in self.arrays]
            else:
                self.result = np.asarray(_all_finite(self.arrays)).tolist()
            self.arrays = []
        return self.result[i]


class _FiniteFlag:
    def __init__(self, check: _FiniteCheck, i: int):
        self.check, self.i = check, i

    def __bool__(self) -> bool:
        return self.check.ok(self.i)


@jax.jit
def _all_finite(arrays):
    return jnp.stack([jnp.isfinite(a).all() for a in arrays])


def random_params(cfg, dtype, seed: int = 0, quantization=None) -> dict:
    """Parameters in the plan's packed layout with random values made on the device (no checkpoint):
    N(0, 0.02) matrices, unit norms, q/k-norm weights of tens (as real Qwen3's); with `quantization`,
    the projections (and the head, common.formats.head_format) as QWeight of N(0, 0.02) values at one
    scale (speed, not accuracy)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    keys = iter(jax.random.split(jax.random.key(seed), 4 * cfg.num_hidden_layers + 2))
    fmt = formats.check_quantization(quantization)
    formats.get(fmt).check_sizes(cfg, "config")

    def randn(shape, quantizable=False):
        w = jax.random.normal(next(keys), shape, jnp.float32) * 0.02
        return random_qweight(w, fmt) if quantizable and fmt else w.astype(dtype)

    layers = [dict(input_norm=jnp.ones((h,), dtype), post_norm=jnp.ones((h,), dtype),
                   q_norm=jnp.full((d,), 20.0, dtype), k_norm=jnp.full((d,), 40.0, dtype),
                   w_qkv=randn((cfg.qkv_size, h), True), w_o=randn((h, cfg.q_size), True),
                   w_gate_up=randn((2 * i, h), True), w_down=randn((h, i), True))
              for _ in range(cfg.num_hidden_layers)]
    params = dict(embed=randn((cfg.vocab_size, h)), final_norm=jnp.ones((h,), dtype), layers=layers)
    quantized_head = bool(fmt) and head_format(fmt) != "bf16"
    if not cfg.tie_word_embeddings or quantized_head:  # tied: a quantized head is a copy (common.formats.head_format)
        params["lm_head"] = randn((cfg.vocab_size, h), quantized_head)
    return jax.block_until_ready(params)


class JaxRunner(harness.Runner):
    name = "jax"
    generate_chunk = None  # a plain generate decodes its whole budget between two tests for eos

    def __init__(self, model_dir: str | Path, options: LoadOptions | None = None, **kwargs):
        """options: common.load_options.LoadOptions (or its fields as keywords), validated there."""
        opts = LoadOptions.of("jax", options, **kwargs)
        ckpt = Checkpoint(model_dir)
        self.weight_format = ckpt.weight_format(opts.quantization)
        host = opts.tensor_parallel_size != 1  # tensor parallel: shards go from host memory to their devices
        self._setup(ckpt.config, lambda dt: load_params(ckpt, dt, opts.quantization, host=host), opts)

    @classmethod
    def random(cls, config, options: LoadOptions | None = None, *, seed: int = 0, **kwargs) -> "JaxRunner":
        """A runner over random weights of `config` (a Qwen3Config or a preset name), made on the device."""
        opts = LoadOptions.of("jax", options, **kwargs)
        cfg = Qwen3Config.preset(config) if isinstance(config, str) else config
        runner = cls.__new__(cls)
        runner.weight_format = opts.quantization or "bf16"
        runner._setup(cfg, lambda dt: random_params(cfg, dt, seed, opts.quantization), opts)
        return runner

    def _setup(self, cfg, params_for, opts: LoadOptions) -> None:
        self.options = opts
        self.dtype = dtype = opts.dtype
        self.config = cfg
        # tensor parallel (jax_impl/parallel.py): checked before any weight is read; None on one device
        self.parallel = TensorParallel.create(cfg, opts.tensor_parallel_size, fmt=self.weight_format,
                                              lm_head=opts.lm_head_shard)
        self.tensor_parallel_size = 1 if self.parallel is None else self.parallel.size
        if self.weight_format != "bf16":
            log.info(f"jax_impl: projections in {self.weight_format} (weight-only; activations {self.dtype})")
        self.compile_cache = enable_persistent_cache(opts.compile_cache)
        check_weight_format(opts.fused, self.weight_format)  # before a weight is read
        self.ops = ops = choose_ops(opts.fused)
        if self.parallel is None:
            self.model = Qwen3(cfg, params_for(jnp.dtype(dtype)), ops)
            graphdef, self.state = nnx.split(self.model)
        else:  # one rank's model over parameters stacked on a leading "tp" axis (jax_impl/parallel.py)
            tp = self.parallel
            self.model = Qwen3(tp.rank_config, tp.shard_params(params_for(jnp.dtype(dtype))), ops, **tp.collectives())
            graphdef, state = nnx.split(self.model)
            self.state = tp.replicate_state(state)
            log.info(f"jax_impl: tensor parallel over {tp.size} devices ({tp.devices[0].device_kind}), lm_head "
                     f"{tp.lm_head}")
        self.programs = decode_loop.Programs(graphdef, self.parallel)
        self._compiled: set[tuple] = set()
        self._decode_ready: set[tuple] = set()
        self._warmed: set[tuple] = set()  # buckets compiled by warm-up: they serve shorter prompts and budgets
        self.last_stats: dict = {}
        self.warmup_s = self.warmup(opts.warmup) if opts.warmup else 0.0

    def init_caches(self, batch: int, rows: int) -> list:
        """Empty per-layer (k, v) caches for the programs: [batch, rows, Hkv, D] in the model dtype,
        split on the kv heads under tensor parallelism."""
        sharding = None if self.parallel is None else self.parallel.cache_sharding
        return init_caches(self.config, batch, rows, self.model.dtype, sharding)

    def weights_bytes(self) -> int:
        """Bytes of the model's arrays on one device (every weight, quantized ones as stored, and the
        RoPE table; under tensor parallelism one rank's shards and copies)."""
        return sum(int(x.addressable_shards[0].data.nbytes) for x in jax.tree.leaves(self.state))

    # ----- Runner ------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        ids = harness.check_token_ids(token_ids, self.config.vocab_size, self.config.max_position_embeddings)
        b, l = ids.shape
        caches = self.init_caches(b, l)
        out = self.programs.forward_logits(self.state, jnp.asarray(ids, jnp.int32),
                                           jnp.full((b,), l, jnp.int32), caches)
        return np.asarray(out, dtype=np.float32)

    # ----- internals ---------------------------------------------------------------------------
    def _note_program(self, kind: str, key: tuple) -> None:
        """Log each program the first time this runner compiles it (or loads it from the cache)."""
        if (kind, key) not in self._compiled:
            self._compiled.add((kind, key))
            log.info(f"jax_impl: {kind} program for batch {key[0]}, prompt <= {key[1]}, cache {key[2]} rows "
                     f"({'greedy' if key[3] else f'sampling, top-k <= {key[4]}, top-p {key[5]}'})"
                     + (f", {key[6]} decode steps per test" if len(key) > 6 else ""))

    def _covering(self, key: tuple) -> tuple:
        """The compiled shape a call of bucket `key` runs in: its own when compiled already, else the
        smallest warmed-up one of its batch bucket and sampling that holds its prompt and cache rows
        (a warm-up at P prompt tokens and N new tokens covers every shorter prompt and budget), else
        its own (compiled now)."""
        if key in self._decode_ready:
            return key
        fits = [w for w in self._warmed if w[0] == key[0] and w[3:] == key[3:] and w[1] >= key[1] and w[2] >= key[2]]
        return min(fits, key=lambda w: (w[2], w[1])) if fits else key

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, *, chunk, warm=False):
        cfg = self.config
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        greedy = temperature == 0
        statics = dict(greedy=greedy, k_cap=0 if greedy else k_cap_for(int(top_k), cfg.vocab_size),
                       use_top_p=bool(not greedy and top_p < 1.0))
        # the compiled shapes: geometric buckets of the batch, the prompt and the cache (common.buckets)
        # half steps: a 16-token prompt and 256 new tokens keep 384 rows (at 512 decode attention
        # splits the context in two at batch 1, slower: docs/MEASUREMENTS.md)
        key = (buckets.batch_bucket(b), buckets.prompt_bucket(int(lengths.max()), cfg.max_position_embeddings),
               buckets.cache_bucket(int(lengths.max()) + max_new_tokens, cfg.max_position_embeddings, half_steps=True),
               greedy, statics["k_cap"], statics["use_top_p"])
        if warm:
            self._warmed.add(key)
        else:
            key = self._covering(key)
        bb, lb, rows = key[:3]
        ids = np.zeros((bb, lb), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        all_lengths = np.ones(bb, np.int32)
        all_lengths[:b] = lengths
        active = np.arange(bb) < b
        eos_list = sorted(eos) or [-1]
        eos_ids = jnp.asarray(eos_list + [-1] * (-len(eos_list) % EOS_SLOTS), jnp.int32)
        sample_args = (jnp.float32(temperature or 1.0), jnp.float32(top_p), jnp.int32(top_k))
        caches = self.init_caches(bb, rows)

        def so_far() -> list[list[int]]:  # each prompt's tokens up to the last step run, cut after eos
            return harness.trim_at_eos(np.asarray(ds.out)[:b, :int(ds.step)].tolist(), eos)

        c0, t0 = compile_seconds(), time.perf_counter()
        prefill_args = (self.state, jnp.asarray(ids), jnp.asarray(all_lengths), jnp.asarray(active), caches,
                        jax.random.key(seed), *sample_args, eos_ids, jnp.int32(max_new_tokens))
        new_bucket = key not in self._decode_ready
        self._note_program("prefill", key)
        if new_bucket:  # the prefill compiles alone first: the first token waits for nothing else
            self.programs.prefill.lower(*prefill_args, **statics).compile()
        decode_compiled = self._compile_decode(key, prefill_args, sample_args, eos_ids, statics) if new_bucket else None
        ds = self.programs.prefill(*prefill_args, **statics)
        ds.out.block_until_ready()
        c1, t1 = compile_seconds(), time.perf_counter()
        first_token_s, setup_s = t1 - t0, 0.0
        streamed = bool(chunk) and not warm
        if streamed:  # a stream shows the prefill's token now, not after the decode programs compiled
            yield so_far()
            t1 = time.perf_counter()  # the caller's time with the first token is not decode time
        if new_bucket:  # the bucket's three decode programs together: later budgets compile nothing
            decode_compiled()
            for sync in decode_loop.SYNC_SIZES:  # stop == step: no step runs
                ds = self.programs.decode(self.state, ds, jnp.int32(1), *sample_args, eos_ids, sync_every=sync,
                                          **statics)
            self._decode_ready.add(key)
            # waiting for their compiles and their first runs (each program loaded onto the device):
            # compile and warm-up, not decode time (compiles in this thread are counted by c2 - c1)
            ds.step.block_until_ready()
            setup_s = max(0.0, (time.perf_counter() - t1) - (compile_seconds() - c1))
        while int(ds.step) < max_new_tokens and not bool(np.all(np.asarray(ds.done))):
            # a plain generate runs to the budget, a stream `chunk` steps per round; each in whole
            # blocks of SYNC steps, then the rest one step per test (two programs for any budget)
            first = int(ds.step)
            target = min(first + chunk, max_new_tokens) if chunk else max_new_tokens
            for stop, sync in decode_loop.plan_calls(first, target):
                ds = self.programs.decode(self.state, ds, jnp.int32(stop), *sample_args, eos_ids, sync_every=sync,
                                          **statics)
            if not warm:
                yield so_far()
        outs = so_far()
        if int(ds.step) <= 1 and not warm and not streamed:
            yield outs  # the first token ended every sequence (or a budget of one)
        c2, t2 = compile_seconds(), time.perf_counter()
        new = sum(len(o) for o in outs)
        self.last_stats = dict(prompt_tokens=int(lengths.sum()), new_tokens=new, decode_tokens=new - b,
                               decode_steps=int(ds.step) - 1,
                               first_token_s=first_token_s, compile_s=c2 - c0 + setup_s, compile_first_s=c1 - c0,
                               prefill_s=max(0.0, first_token_s - (c1 - c0)),
                               decode_s=max(0.0, (t2 - t1) - (c2 - c1) - setup_s))

    def _compile_decode(self, key: tuple, prefill_args: tuple, sample_args: tuple, eos_ids, statics: dict):
        """Start compiling a new bucket's decode programs (one per decode_loop.SYNC_SIZES), each in a
        thread of its own, once the prefill's program is compiled: they compile while the calling
        thread runs the prefill and hands out the first token (XLA compiles outside Python's lock),
        so the first token waits for the prefill alone and the first decode steps for the longest
        decode program, not for the sum of them. Returns the wait: it joins the threads and raises
        the first error one of them met. The threads are daemons: a Ctrl-C need not wait for XLA."""
        ds = jax.eval_shape(functools.partial(self.programs.prefill, **statics), *prefill_args)
        errors: list[BaseException] = []

        def compile_one(sync: int) -> None:
            try:
                self.programs.decode.lower(self.state, ds, jnp.int32(1), *sample_args, eos_ids, sync_every=sync,
                                           **statics).compile()
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                errors.append(e)

        threads = []
        for sync in decode_loop.SYNC_SIZES:
            self._note_program("decode", key + (sync,))
            threads.append(threading.Thread(target=compile_one, args=(sync,), daemon=True,
                                            name=f"jax_impl decode compile ({sync} steps per test)"))
            threads[-1].start()

        def wait() -> None:
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        return wait
