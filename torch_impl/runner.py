"""`torch_impl.load(model_dir, *, dtype, fused) -> Runner`: the model on its own, without nano-vllm.

Loading streams the checkpoint through common.weights' one name map (`Checkpoint.iter_params`).
Generation: all prompts are prefilled together (variable-length attention), then one decode step per
token for the whole batch over a KV cache in nano-vllm's paged layout. By default (`block_size=None`)
each sequence owns one block, sized per call to its prompt plus new tokens (rounded up to 256 rows):
decode attention then reads each sequence's block id once and streams its keys at affine addresses
(faster than 256-row blocks: docs/MEASUREMENTS.md); `block_size=N` gives nano-vllm's N-row blocks
instead. On CUDA each decode step is one CUDA-graph replay per batch bucket (1, 2, 4, ... sequences,
padded): the graph embeds, runs every layer, the head, greedy argmax and advances
positions/slots/lengths on the device, so the host only replays and checks for eos every `chunk` steps.
Sampling with temperature draws inside the step too (torch_impl.sampling, common/sampling.py's rules, a
seeded torch.Generator registered with the graph); under tensor parallelism rank 0 samples eagerly.

`tensor_parallel_size=N` (torch_impl/workers.py): the caller is rank 0 and starts ranks 1..N-1 as
processes (or, under torchrun, every rank is one); each builds and loads only its shard
(torch_impl/parallel.py, common.sharding) on cuda:rank with NCCL, or on the CPU with gloo. Every call is a
command rank 0 broadcasts; all ranks run the same prefill and decode steps (the collectives inside
the captured graphs), greedy tokens come out equal on every rank and sampled ones are rank 0's,
broadcast. `lm_head_shard="replicated"` keeps the embedding and lm_head whole on every rank (default "vocab":
each rank holds ceil(V / N) rows). `close()`
ends the workers (also done when the runner is collected or the process exits).
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from common import buckets, harness
from common.config import Qwen3Config
from common.formats import QWeight
from common.load_options import LoadOptions
from common.weights import Checkpoint
from torch_impl import context as ctx_mod
from torch_impl import commands, workers
from torch_impl.building import build_model, fill_random, use_cpu_threads
from torch_impl.decode_loop import Decoder, bucket_for
from torch_impl import prefill_loop
from torch_impl.model import Qwen3ForCausalLM
from torch_impl.ops import check_weight_format
from torch_impl.quant_loading import to_torch
from torch_impl.sampling import sample
from torch_impl.parallel import SINGLE


log = logging.getLogger("torch_impl")

MIN_BLOCK_ROWS = 256  # block_size=None: a sequence's one block has a power of two rows, at least this


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _rank_options(opts: LoadOptions) -> dict:
    """What each tensor-parallel rank builds with (workers.Spec): the options but the warm-up, which
    this process runs, and the compile cache, which the ranks inherit through the environment."""
    return dict(options=opts.replace(warmup=(), compile_cache=True))


class CacheCapacityError(ValueError):
    """A generate() call needs more KV-cache rows than the runner may allocate."""



def _all_finite(t) -> torch.Tensor:
    """Whether every value of `t` is finite, as a tensor on its device (no sync). A tensor-parallel load
    hands whole host tensors to the ranks, a QWeight's scale among them as numpy."""
    return torch.isfinite(t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t))).all()

class TorchRunner(harness.Runner):
    name = "torch"
    generate_chunk = 32  # a plain generate tests for eos every this many decode steps

    def __init__(self, model_dir: str | Path, options: LoadOptions | None = None, **kwargs):
        """options: common.load_options.LoadOptions (or its fields as keywords), validated there."""
        opts = LoadOptions.of("torch", options, **kwargs)
        self.compile_cache = use_compile_cache(opts.compile_cache)
        ckpt = Checkpoint(model_dir)

        def load_weights(model, device, session) -> None:
            if device.type == "cpu":
                use_cpu_threads()
            tdtype = getattr(torch, opts.dtype)
            convert_quant = lambda w: QWeight(to_torch(w.q, device), torch.from_numpy(w.scale).to(device), w.fmt)  # noqa: E731
            convert = lambda t: t.to(device, tdtype)  # noqa: E731
            if session is not None:  # whole tensors stay on the host, one at a time; each loader keeps this rank's part
                convert = convert_quant = lambda t: t  # noqa: E731
            with torch.inference_mode():
                model.load_params(ckpt.iter_params("pt", concat=lambda parts: torch.cat(parts, dim=0), convert=convert,
                                                   quantization=opts.quantization, convert_quant=convert_quant,
                                                   all_finite=_all_finite))  # NaN/inf: WeightsError

        self._build(ckpt.config, opts, ckpt.weight_format(opts.quantization),
                    workers.Spec("load", str(model_dir), _rank_options(opts), TorchRunner), load_weights)

    @classmethod
    def random(cls, config, options: LoadOptions | None = None, *, seed: int = 0, **kwargs) -> "TorchRunner":
        """A runner over random weights of `config` (a Qwen3Config or a preset name), made on the device:
        N(0, 0.02) matrices, norms in [0.5, 1.5], q/k-norm weights of tens (as real Qwen3's); with
        `quantization`, the projections' QWeight of N(0, 0.02) values at one scale. Every
        tensor_parallel_size draws the same values (each rank keeps its shard of the whole draws)."""
        opts = LoadOptions.of("torch", options, **kwargs)
        cfg = Qwen3Config.preset(config) if isinstance(config, str) else config
        runner = cls.__new__(cls)
        runner.compile_cache = use_compile_cache(opts.compile_cache)

        def draw(model, device, session) -> None:
            whole = model if session is None else build_model(cfg, getattr(torch, opts.dtype), torch.device("meta"),
                                                              False, opts.quantization)
            with torch.no_grad():
                fill_random(model, torch.Generator(device=device).manual_seed(seed), whole)

        runner._build(cfg, opts, opts.quantization or "bf16",
                      workers.Spec("random", cfg, dict(_rank_options(opts), seed=seed), TorchRunner), draw)
        return runner

    def _build(self, cfg, opts: LoadOptions, fmt: str, spec: workers.Spec, fill) -> None:
        """Start the tensor-parallel ranks (each builds as `spec` says), build this rank's model in `fmt`,
        `fill(model, device, session)` its weights, set up and warm up; a failure ends the ranks."""
        check_weight_format(opts.fused, fmt, opts.device)  # before a weight is read, or a rank is started
        session = workers.start(cfg, opts.tensor_parallel_size, opts.device, fmt, spec)
        device = session.device if session else _default_device(opts.device)
        try:
            model = build_model(cfg, getattr(torch, opts.dtype), device, opts.fused, None if fmt == "bf16" else fmt,
                                tp_group=session.tp if session else SINGLE, lm_head_shard=opts.lm_head_shard)
            fill(model, device, session)
            self._setup(model, opts, session=session)
        except BaseException as e:
            if session is not None:
                session.close(abort=True, why=f"{type(e).__name__} while loading")
            raise
        self.warmup_s = self.warmup(opts.warmup) if opts.warmup else 0.0

    def _setup(self, model: Qwen3ForCausalLM, opts: LoadOptions, *, session: workers.Session | None = None) -> None:
        self.options = opts
        self.model, self.config, self.ops = model, model.config, model.model.ops
        self.device = model.model.embed_tokens.weight.device
        self.dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        self.weight_format = model.weight_format
        if self.weight_format != "bf16":
            log.info(f"torch_impl: projections in {self.weight_format} (weight-only; activations {self.dtype})")
        model.context_source = ctx_mod.own_context
        self.block_size = opts.block_size
        self.max_cache_tokens = opts.max_cache_tokens
        self.use_graphs = opts.cuda_graphs and self.device.type == "cuda"
        self.warmup_s = 0.0
        self.kv: torch.Tensor | None = None
        self._decoders: dict[tuple, Decoder] = {}
        self._prefillers: dict[tuple, prefill_loop.Prefiller] = {}
        self._graph_pool = None  # the prefill graphs' shared memory pool
        self.last_stats: dict = {}
        self._session, self._stream = session, None
        self.tensor_parallel_size = session.size if session else 1
        if session is not None:
            weakref.finalize(self, session.close)
            session.ready()

    def close(self) -> None:
        """End a tensor-parallel runner's workers and process group (nothing to do at size 1)."""
        if self._session is not None:
            self._end_stream()
            self._session.close()

    def _warmup_order(self, specs: list[dict]) -> list[dict]:
        """The warm-up shapes (each builds its Triton kernels, KV cache and its batch bucket's decode
        step, a CUDA graph), after sizing the KV cache once for all of them (the largest batch at
        the longest sequence, within max_cache_tokens): shape by shape, one needing a larger cache
        than those before it would replace the cache, and with it the decode steps (CUDA graphs)
        built for them. Under tensor parallelism each rank sizes its own cache per call: there the
        shapes run largest batch first, then longest, which serves whenever one shape is both."""
        order = sorted(specs, key=lambda s: (s["batch"], s["prompt_tokens"] + s["new_tokens"]), reverse=True)
        if self._session is not None:
            return order
        longest = max(s["prompt_tokens"] + s["new_tokens"] for s in specs)
        batch = order[0]["batch"]
        try:
            bs, blocks_per_seq = self._cache_plan([[0] * (longest - 1)] * batch, 1)
        except CacheCapacityError:
            return order
        self._ensure_cache(batch * blocks_per_seq, bs)
        return specs

    # ----- KV cache -----------------------------------------------------------------------------
    def _block_rows(self, rows_per_seq: int, batch: int) -> int:
        """Rows per cache block for a call of `batch` sequences needing `rows_per_seq` rows each: the
        fixed block_size, else one block per sequence (the current cache's when it fits: no new
        cache, no new CUDA graphs)."""
        if self.block_size is not None:
            return self.block_size
        if self.kv is not None and self.kv.shape[3] >= rows_per_seq and self.kv.shape[2] >= batch:
            return self.kv.shape[3]
        return buckets.cache_bucket(rows_per_seq, self.config.max_position_embeddings, floor=MIN_BLOCK_ROWS)

    def _cache_plan(self, prompts, max_new_tokens: int) -> tuple[int, int]:
        """(rows per block, blocks per sequence) of a call; CacheCapacityError past max_cache_tokens
        (checked before a tensor-parallel command is sent: every rank would fail alike)."""
        b, longest = len(prompts), max(len(p) for p in prompts) + max_new_tokens
        bs = self._block_rows(longest, b)
        blocks_per_seq = -(-longest // bs)
        num_blocks = b * blocks_per_seq
        if self.max_cache_tokens is not None and num_blocks * bs > self.max_cache_tokens:
            raise CacheCapacityError(f"KV cache: this call needs {num_blocks} blocks of {bs} rows "
                                     f"({num_blocks * bs} tokens), more than max_cache_tokens={self.max_cache_tokens}")
        return bs, blocks_per_seq

    def _ensure_cache(self, num_blocks: int, bs: int) -> None:
        cfg = self.model.shard_config  # this rank's kv heads under tensor parallelism
        if self.kv is not None and self.kv.shape[3] == bs and self.kv.shape[2] >= num_blocks:
            return
        self._decoders.clear()  # captured graphs point at the old cache
        self._prefillers.clear()
        self.kv = None
        blocks = 1 << max(0, (num_blocks - 1).bit_length())  # grow by powers of two
        if self.max_cache_tokens is not None:
            blocks = max(num_blocks, min(blocks, self.max_cache_tokens // bs))
        self.kv = torch.zeros(2, cfg.num_hidden_layers, blocks, bs, cfg.num_key_value_heads, cfg.head_dim,
                              dtype=self.model.model.embed_tokens.weight.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.kv[0, i]
            layer.self_attn.attn.v_cache = self.kv[1, i]

    def weights_bytes(self) -> int:
        """Bytes of the model's tensors on the device (every weight, quantized ones as stored, a tied
        embedding once, and the RoPE table)."""
        tensors = {t.data_ptr(): t.numel() * t.element_size()
                   for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(tensors.values())

    @property
    def decode_path(self) -> str:
        return self.model.model.decode_path

    # ----- Runner -------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        ids = harness.check_token_ids(token_ids, self.config.vocab_size, self.config.max_position_embeddings)
        if self._session is None:
            return self._logits(ids)
        self._end_stream()
        with self._session.command(commands.LOGITS, commands.encode_logits(ids)):
            return self._logits(ids)

    @torch.inference_mode()
    def _logits(self, ids: np.ndarray) -> np.ndarray:
        b, l = ids.shape
        dev = self.device
        flat = torch.as_tensor(ids.reshape(-1), dtype=torch.int64, device=dev)
        positions = torch.arange(l, device=dev).repeat(b)
        cu = torch.arange(0, b * l + 1, l, dtype=torch.int32, device=dev)
        ctx_mod.set_context(True, cu, cu, l, l, slot_mapping=None)  # cache-free forward
        try:
            out = self.model.lm_head(self.model(flat, positions)).float()
        finally:
            ctx_mod.reset_context()
        out = out.view(b, l, -1).cpu().numpy()
        if self._session is not None:
            self._session.check()  # an NCCL collective aborted for a dead rank leaves garbage behind
        return out

    def serve(self) -> None:
        """A worker rank: run rank 0's commands until it closes the runner."""
        while True:
            op, payload = self._session.receive()
            if op == commands.EXIT:
                return
            if op == commands.LOGITS:
                self._logits(commands.decode_logits(payload))
            elif op == commands.GENERATE:
                for _ in self._decode(**commands.decode_generate(payload)):
                    pass
            else:
                raise workers.RankFailed(f"unknown command {op} from rank 0")

    # ----- internals ----------------------------------------------------------------------------
    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, *, chunk: int, warm=False):
        if self._session is None:
            yield from self._decode(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, chunk)
            return
        self._cache_plan(prompts, max_new_tokens)  # a call past max_cache_tokens fails here, before the command
        self._end_stream()
        payload = commands.encode_generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, chunk)
        with self._session.command(commands.GENERATE, payload):
            self._stream = self._decode(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, chunk)
            yield from self._stream
        self._stream = None

    def _end_stream(self) -> None:
        """Close a stream rank 0's caller left unfinished (its last flag tells the workers to stop)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @torch.inference_mode()
    def _decode(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, chunk: int):
        dev = self.device
        b = len(prompts)
        lens = [len(p) for p in prompts]
        bs, blocks_per_seq = self._cache_plan(prompts, max_new_tokens)
        self._ensure_cache(b * blocks_per_seq, bs)
        greedy = temperature == 0
        # sampled decode steps draw inside the step (inside its CUDA graph) with the decoder's own
        # generator, which the prefill's draw shares; tensor parallel: rank 0 samples outside
        sampling = None if greedy or self._session is not None else (temperature, top_k, top_p)
        bp = bucket_for(b) if self.use_graphs else b
        t0 = time.perf_counter()
        key = (bp, blocks_per_seq, greedy, sampling)
        dec = self._decoders.get(key)
        if dec is None:
            dec = self._decoders[key] = Decoder(self.model, bp, blocks_per_seq, bs, greedy, dev,
                                                graph=self.use_graphs, sampling=sampling)
        prefiller = self._prefiller(b, sum(lens))
        _sync(dev)
        t_built = time.perf_counter()
        gen = dec.gen if dec.sampling is not None else torch.Generator(device=dev)
        gen.manual_seed(int(seed))
        first = self._prefill(prompts, lens, blocks_per_seq, bs, temperature, top_k, top_p, gen, prefiller)
        _sync(dev)
        t_first = time.perf_counter()
        dec.start(first, lens, blocks_per_seq)
        _sync(dev)
        t1 = time.perf_counter()
        steps = 1
        while True:
            stop = min(steps + chunk, max_new_tokens)
            while steps < stop:
                logits = dec.step()
                if logits is not None:
                    dec.advance(self._sample(logits[:b].float(), temperature, top_k, top_p, gen))
                steps += 1
            outs = harness.trim_at_eos(dec.out[:b, :steps].cpu().tolist(), eos)
            done = steps >= max_new_tokens or all(o and o[-1] in eos for o in outs)
            if self._session is not None:
                self._session.check()
            self.model.model.check_layer_state()  # the one-launch layers' bounded waits (none gave up)
            try:
                yield outs
            except GeneratorExit:  # the caller stopped a stream early: the other ranks stop with it
                if self._session is not None and not done:
                    self._session.flag(0)
                raise
            if done or (self._session is not None and not self._session.flag(1)):
                break
        t2 = time.perf_counter()
        new = sum(len(o) for o in outs)
        # compile_s: building (CUDA graphs: capturing) the decode step for this batch bucket and a short
        # prefill's graph for its buckets, before the prefill; else Triton's first builds of the prefill
        # kernels fall in prefill_s.
        self.last_stats = dict(prompt_tokens=sum(lens), new_tokens=new, decode_tokens=new - b,
                               decode_steps=steps - 1,
                               first_token_s=t_first - t_built, compile_s=t_built - t0, compile_first_s=0.0,
                               prefill_s=t_first - t_built, decode_s=t2 - t1)

    def _prefiller(self, batch: int, tokens: int) -> prefill_loop.Prefiller | None:
        """The captured prefill of a call of `batch` prompts totalling `tokens` tokens: short prefills
        (torch_impl.prefill_loop.fits) on CUDA graphs at tensor-parallel size 1, built at the first
        call in their buckets; None runs the prefill eagerly (also where capturing failed, logged once)."""
        if not (self.use_graphs and self._session is None and prefill_loop.fits(batch, tokens)):
            return None
        key = (bucket_for(batch), prefill_loop.token_bucket(tokens))
        if key not in self._prefillers:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._prefillers[key] = prefill_loop.Prefiller(self.model, *key, self.device, graph=True,
                                                           pool=self._graph_pool)
        found = self._prefillers[key]
        return found if found.graph is not None else None

    def _prefill(self, prompts, lens, blocks_per_seq, bs, temperature, top_k, top_p, gen,
                 prefiller: prefill_loop.Prefiller | None = None) -> torch.Tensor:
        """Run every prompt (varlen), write its cache rows, sample and return the first new tokens [B];
        through `prefiller`'s graph when given."""
        dev = self.device
        pos = np.concatenate([np.arange(n) for n in lens])
        seq = np.repeat(np.arange(len(lens)), lens)
        slots = seq * blocks_per_seq * bs + pos  # sequence b owns blocks b * blocks_per_seq ...
        if prefiller is not None:
            logits = prefiller.run(prompts, slots)
            return self._sample(logits.float(), temperature, top_k, top_p, gen)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)
        slots_t = torch.from_numpy(slots).to(dev, torch.int32)
        ctx_mod.set_context(True, cu, cu, max(lens), max(lens), slot_mapping=slots_t)  # tables: from the slots
        try:
            logits = self.model.compute_logits(self.model(ids, torch.from_numpy(pos).to(dev)))
        finally:
            ctx_mod.reset_context()
        return self._sample(logits.float(), temperature, top_k, top_p, gen)

    def _sample(self, logits: torch.Tensor, temperature, top_k, top_p, gen) -> torch.Tensor:
        """The next tokens [B]: greedy ones alike on every rank (their logits are); sampled ones rank 0's."""
        fused = logits.is_cuda and self.model.lm_head.fused
        if self._session is None or temperature == 0:
            return sample(logits, temperature, top_k, top_p, gen, fused=fused)
        if self._session.rank == 0:
            tokens = sample(logits, temperature, top_k, top_p, gen, fused=fused)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return self._session.tp.broadcast(tokens)


def use_compile_cache(enabled: bool = True) -> str | None:
    """Triton's kernel cache on disk (its own, ~/.triton/cache or TRITON_CACHE_DIR), or, with
    enabled=False or QWEN3_FUSED_COMPILE_CACHE=0 (common.environment), a temporary directory of this
    process removed at exit: kernels compile afresh and nothing is kept. Returns the directory in
    use; for the rest of the process once turned off (as jax_impl's cache stays on once on)."""
    import os
    import shutil
    import tempfile

    from common import interrupt
    from common.environment import check_environment, env_enabled

    check_environment()
    if not _cache_state.get("temporary") and (not enabled or not env_enabled()):
        path = tempfile.mkdtemp(prefix="qwen3-fused-triton-")
        interrupt.at_exit(lambda: shutil.rmtree(path, ignore_errors=True))
        os.environ["TRITON_CACHE_DIR"] = path  # Triton reads it at each compile; tensor-parallel ranks inherit it
        _cache_state["temporary"] = path
    try:
        import triton
    except ImportError:  # no Triton: nothing is compiled
        return None
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and _cache_state.get("temporary"):
        knobs.cache.dir = _cache_state["temporary"]
    return knobs.cache.dir if knobs is not None else os.environ.get("TRITON_CACHE_DIR")


_cache_state: dict = {}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
