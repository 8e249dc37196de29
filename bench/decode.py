"""End-to-end decode: the twins fused and plain, and the transformers peers.

Every implementation runs the same random-weight checkpoint (timing does not depend on the
weight values), the same prompts (`prompt_len` tokens per sequence) and `new_tokens` tokens with
no eos, greedy or (`sampling`: temperature, top_k, top_p, seed 0) sampled, `runs` times after
`warmup` runs; the best run is reported.
- decode tok/s = batch * (new_tokens - 1) / decode time (the first new token comes from prefill);
- prefill tok/s = batch * prompt_len / prefill time (prompt through the first sampled token);
- end-to-end tok/s = batch * new_tokens / wall time of the implementation's public generate() call
  (the twins' `runner.generate()`, transformers' `model.generate()`, nano-vllm's `LLM.generate()`):
  prefill, sampling and host overhead included, what a caller of generate() gets.
The twins report these times themselves (Runner.last_stats); for transformers a logits
processor marks the end of prefill (one device sync, on its first call only). transformers runs
attn_implementation="sdpa" (torch's scaled_dot_product_attention) and its prefill computes the
last token's logits only (`logits_to_keep=1`, which generate() passes where the model takes it):
the work the twins' prefill does. Rows carry `prefill_s` (the best run's prefill, as
`prefill_tok_s`) and, for transformers, `attention` and `logits_to_keep`. A twin's row also
keeps its first call at that batch (the first warm-up run), whose shapes are new: compile time
apart as `first_call_compile_s` and the time to its first tokens, compile included, as
`first_call_first_token_s` (last_stats' compile_s and first_token_s, common.cli.STATS_KEYS).

Bandwidth floor of decode: every step reads all weights once (Qwen3Config.decode_bytes_per_token;
quantized rows count the projections, and a quantized lm_head, in their format's bytes) plus each
sequence's K and V of its whole context; over the copy bandwidth measured in the
same run that gives the fastest possible tok/s. Prefill is held against its roofline
(max of the weight bytes over the copy bandwidth and the FLOPs over the matmul ceiling).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import time
from pathlib import Path

from common import formats
from common.config import Qwen3Config
from common.load_options import LoadOptions
from common.tiles import TABLES_ENV

TWINS = ("jax", "torch")
IMPLS = {
    "jax-fused": "jax_impl, fused Pallas kernels",
    "jax-plain": "jax_impl, plain XLA ops",
    "torch-fused": "torch_impl, fused Triton kernels",
    "torch-plain": "torch_impl, plain torch ops",
    **{f"{fw}-{q}": f"{fw}_impl, fused, {q} weights" for fw in TWINS for q in formats.QUANTIZED},
    "hf-eager": "transformers eager, dynamic cache, SDPA attention",
    "hf-compile": "transformers static cache + torch.compile, SDPA attention",
    "nanovllm": "nano-vllm's engine running torch_impl's model",
}


class Unavailable(RuntimeError):
    """An implementation that cannot run here (missing module or device)."""


def prompts_for(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % (vocab - 1) + 1 for j in range(prompt_len)] for i in range(batch)]


# ----- floors ----------------------------------------------------------------------------------

def kv_bytes_per_position(cfg: Qwen3Config, e: int = 2) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * e


def with_quantization(impls: list[str], names: list[str]) -> list[str]:
    """--quantization: each twin's fused row in every format of `names` ("none" keeps it bf16),
    its other quantized rows dropped; rows of other kinds as they are."""
    out: list[str] = []
    for impl in impls:
        framework, _, kind = impl.partition("-")  # "nanovllm": no kind
        if kind == "fused":
            out += [impl if q == "none" else f"{framework}-{q}" for q in names]
        elif quantization_of(impl) is None:
            out.append(impl)
    return list(dict.fromkeys(out))


def quantization_of(impl: str) -> str | None:
    """The weight format of a quantized twin's row ("<twin>-<format>", common.formats), else None."""
    kind = impl.split("-")[-1]
    return kind if kind in formats.QUANTIZED else None


def decode_floor_tok_s(cfg: Qwen3Config, batch: int, prompt_len: int, new_tokens: int, copy_GBps: float,
                       quantization: str | None = None) -> float:
    """tok/s if every decode step moved only its weight and KV-cache bytes at the copy bandwidth
    (quantized projections, and the lm_head where its format is quantized too: their storage's bytes
    per weight)."""
    steps = max(1, new_tokens - 1)
    ctx_sum = sum(prompt_len + s for s in range(1, steps + 1))  # step s attends prompt_len + s positions
    fmt = formats.get(quantization)
    weights = cfg.decode_bytes_per_token(projection_bytes=fmt.storage_bytes,
                                         head_bytes=formats.get(fmt.head).storage_bytes)
    byt = steps * weights + batch * kv_bytes_per_position(cfg) * ctx_sum
    return batch * steps / (byt / (copy_GBps * 1e9))


def prefill_floor_tok_s(cfg: Qwen3Config, batch: int, prompt_len: int, copy_GBps: float, mm_TFLOPs: float) -> float:
    tokens = batch * prompt_len
    layer_params = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2))
    flops = 2 * tokens * layer_params + 2 * batch * cfg.vocab_size * cfg.hidden_size
    byt = cfg.decode_bytes_per_token() + tokens * kv_bytes_per_position(cfg)
    return tokens / max(byt / (copy_GBps * 1e9), flops / (mm_TFLOPs * 1e12))


# ----- the twins through the Runner interface -------------------------------------------------

def load_twin(impl: str, path: Path | None, cfg: Qwen3Config, tensor_parallel_size: int = 1):
    """The twin as a user gets it: "fused" = fused="auto" on a GPU (common.tiles' choice per op and
    shape), fused=True in interpreter mode. path None: random weights made in device memory."""
    framework, kind = impl.split("-")
    fused = False if kind == "plain" else ("auto" if _on_gpu() else True)
    twin = importlib.import_module(f"{framework}_impl")
    opts = LoadOptions(dtype="bfloat16", fused=fused, quantization=quantization_of(impl),
                       tensor_parallel_size=tensor_parallel_size)
    return twin.load_random(cfg, opts) if path is None else twin.load(path, opts)


def _on_gpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("JAX_PLATFORMS") != "cpu"


def parse_sampling(text: str | None) -> dict | None:
    """--sampling T,K,P (bench decode, bench.profile) -> generate()'s temperature, top_k, top_p (checked
    as generate checks them)."""
    from common.sampling import GenerationArgsError, check_generate_args

    if text is None:
        return None
    why = f"python -m bench: --sampling={text!r}: expected TEMPERATURE,TOP_K,TOP_P (e.g. 0.7,40,0.95)"
    parts = text.split(",")
    if len(parts) != 3:
        raise SystemExit(why)
    try:
        out = dict(temperature=float(parts[0]), top_k=int(parts[1]), top_p=float(parts[2]))
        check_generate_args([[0]], 1, **out, vocab_size=1)
    except ValueError as e:  # GenerationArgsError included
        raise SystemExit(why + (f": {e}" if isinstance(e, GenerationArgsError) else "")) from None
    if out["temperature"] == 0:
        raise SystemExit(why + ": temperature 0 is greedy decoding (leave --sampling out)")
    return out


def run_twin(runner, prompts, new_tokens: int, sampling: dict | None = None) -> dict:
    t0 = time.perf_counter()
    outs = runner.generate(prompts, new_tokens, **(sampling or {}))
    wall = time.perf_counter() - t0
    st = runner.last_stats  # decode_s and prefill_s without compile time (compile_s apart)
    return dict(generated=sum(len(o) for o in outs), wall_s=wall, prefill_s=st["prefill_s"], decode_s=st["decode_s"],
                compile_s=st.get("compile_s"), first_token_s=st.get("first_token_s"),
                decode_path=getattr(runner, "decode_path", None))


# ----- transformers ---------------------------------------------------------------------------

def load_hf(path: Path | None, device: str, cfg: Qwen3Config):
    """transformers' model from the checkpoint, or (path None) from the config with random weights
    made on the device in bfloat16."""
    import torch
    from transformers import Qwen3ForCausalLM

    if path is None:
        from transformers import Qwen3Config as HFQwen3Config

        with torch.device(device):
            model = Qwen3ForCausalLM._from_config(HFQwen3Config(**cfg.to_hf_dict()), torch_dtype=torch.bfloat16,
                                                  attn_implementation=HF_ATTENTION)
        return model.eval()

    try:
        model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map=device,
                                                 attn_implementation=HF_ATTENTION)
    except Exception:  # noqa: BLE001 - older/newer loaders without device_map support: move after
        model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                 attn_implementation=HF_ATTENTION).to(device)
    return model.eval()


HF_ATTENTION = "sdpa"  # transformers' attention: torch's scaled_dot_product_attention (is_causal at prefill)


def hf_fields(model) -> dict:
    """What a transformers row says of its model: the attention implementation it runs and how many
    logits generate()'s prefill computes (1: the last token's; None: every position's)."""
    keep = getattr(model, "_supports_logits_to_keep", None)
    return dict(attention=getattr(model.config, "_attn_implementation", None),
                logits_to_keep=1 if keep is not None and keep() else None)


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class HFGenerate:
    """model.generate with a fixed GenerationConfig, timing prefill through a logits processor."""

    def __init__(self, model, device: str, new_tokens: int, static: bool, compile_mode: str | None,
                 sampling: dict | None = None):
        from transformers import GenerationConfig

        self.model, self.device = model, device
        kw = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
        if sampling:
            kw.update(do_sample=True, **sampling)
        if static:
            kw["cache_implementation"] = "static"
        if compile_mode in ("auto", "auto-partial"):
            from transformers import CompileConfig

            kw["compile_config"] = CompileConfig(fullgraph=compile_mode == "auto", mode="reduce-overhead")
        elif compile_mode == "manual":
            kw["disable_compile"] = True
        self.gen = GenerationConfig(**kw)

    def __call__(self, prompts) -> dict:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        device = self.device
        marks: list[float] = []

        class FirstToken(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if not marks:
                    _sync(device)
                    marks.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=self.gen,
                                      logits_processor=LogitsProcessorList([FirstToken()]))
        _sync(device)
        t2 = time.perf_counter()
        t1 = marks[0] if marks else t0
        return dict(generated=int((out.shape[1] - ids.shape[1]) * out.shape[0]), wall_s=t2 - t0,
                    prefill_s=t1 - t0, decode_s=t2 - t1)


def hf_compiled(model, device: str, new_tokens: int, prompts, warmup: int, log, sampling: dict | None = None):
    """A warmed-up HFGenerate with static cache + torch.compile: transformers' own auto-compile
    (generation_config.compile_config, fullgraph), else model.forward = torch.compile(...), else
    auto-compile without fullgraph. Returns (generate, how)."""
    import torch

    orig_forward = model.forward
    errors = []
    for mode in ("auto", "manual", "auto-partial"):
        try:
            torch._dynamo.reset()
            model.forward = orig_forward
            if hasattr(model, "_compiled_call"):
                del model._compiled_call
            if mode == "manual":
                model.forward = torch.compile(orig_forward, mode="reduce-overhead", fullgraph=True)
            gen = HFGenerate(model, device, new_tokens, static=True, compile_mode=mode, sampling=sampling)
            for _ in range(warmup):
                gen(prompts)
            if mode.startswith("auto") and not hasattr(model, "_compiled_call"):
                raise RuntimeError("transformers did not auto-compile the decode step (no _compiled_call)")
            how = {"auto": "generation_config.compile_config=CompileConfig(fullgraph=True, mode='reduce-overhead')",
                   "manual": "model.forward = torch.compile(model.forward, mode='reduce-overhead', fullgraph=True)",
                   "auto-partial": "CompileConfig(fullgraph=False, mode='reduce-overhead')"}[mode]
            if errors:
                how += " (earlier tries: " + "; ".join(errors) + ")"
            return gen, how
        except Exception as e:  # noqa: BLE001 - try the next way, keep the reason
            errors.append(f"{mode}: {type(e).__name__}: {str(e)[:200]}")
            log(f"    hf-compile {mode} failed: {errors[-1]}")
    model.forward = orig_forward
    raise RuntimeError("torch.compile failed every way: " + " | ".join(errors))


# ----- nano-vllm's engine -------------------------------------------------------------------------

NANOVLLM_GREEDY_TEMPERATURE = 1e-5  # nano-vllm refuses temperature 0; its sampler does the same work at any value


class NanoVllm:
    """nano-vllm's LLM (loader, scheduler, CUDA graphs, sampler) on torch_impl's model
    (torch_impl.nanovllm.install()), sized for the largest batch. A call generates for `prompts`
    twice, `new_tokens` and then one token, each a fresh request set: the decode time is the
    difference (nano-vllm reports no prefill time of its own)."""

    def __init__(self, path: Path | None, batches, prompt_len: int, new_tokens: int, sampling: dict | None):
        if path is None:
            raise Unavailable("nano-vllm reads its weights from a checkpoint directory, not --random-weights")
        if importlib.util.find_spec("nanovllm") is None:
            raise Unavailable("nano-vllm is not installed (pip install it beside torch to get this row)")
        if sampling and (sampling.get("top_k") or sampling.get("top_p") not in (None, 1.0)):
            raise Unavailable(f"nano-vllm samples with a temperature only, not {sampling}")
        import atexit

        import torch_impl.nanovllm as integration

        # install first: without flash_attn, nano-vllm's package imports only after the placeholder
        integration.install(use_fused_kernels="auto")
        self.temperature = (sampling or {}).get("temperature") or NANOVLLM_GREEDY_TEMPERATURE
        self.new_tokens = new_tokens
        block = 256
        model_len = -(-(prompt_len + new_tokens) // block) * block
        try:
            from nanovllm import LLM, SamplingParams

            self._integration, self._params = integration, SamplingParams
            self.llm = LLM(str(path), enforce_eager=False, max_model_len=model_len, max_num_seqs=max(batches),
                           max_num_batched_tokens=max(model_len, max(batches) * prompt_len),
                           gpu_memory_utilization=0.5, kvcache_block_size=block)
        except BaseException:
            integration.uninstall()  # later rows of this process run torch_impl's own context again
            raise
        atexit.unregister(self.llm.exit)

    def _generate(self, prompts, tokens: int) -> tuple[float, int]:
        params = self._params(temperature=self.temperature, max_tokens=tokens, ignore_eos=True)
        _sync("cuda")
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        _sync("cuda")
        return time.perf_counter() - t0, sum(len(o["token_ids"]) for o in outs)

    def __call__(self, prompts) -> dict:
        wall, generated = self._generate(prompts, self.new_tokens)
        first, _ = self._generate(prompts, 1)
        return dict(generated=generated, wall_s=wall, prefill_s=first, decode_s=max(wall - first, 1e-9))

    def close(self) -> None:
        try:
            self.llm.exit()
        finally:
            self._integration.uninstall()


# ----- one implementation on one model ----------------------------------------------------------

def weights_memory(runner) -> dict:
    """weights_GB: the twin's arrays (Runner.weights_bytes); device_GB_after_load: what its framework
    holds on the GPU right after loading (weights, and whatever loading left allocated)."""
    out = dict(weights_GB=runner.weights_bytes() / 1e9)
    try:
        if type(runner).__module__.startswith("jax_impl"):
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            used = stats.get("bytes_in_use")
        else:
            import torch

            used = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        used = None
    if used:
        out["device_GB_after_load"] = used / 1e9
    return out


def free_memory() -> None:
    gc.collect()
    try:
        import jax

        jax.clear_caches()
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def tiled(impl: str) -> bool:
    """Rows whose speed depends on the tile tables: the twins' fused rows, bf16 or quantized."""
    return impl.startswith(("jax-", "torch-")) and not impl.endswith("-plain")


def variant(r: dict) -> tuple[int, str]:
    """Besides impl, model and batch, what tells decode rows apart: the tensor-parallel size and the
    tiles ("tuned": the tile tables as found; "untuned": the default rule alone). Rows written before
    these fields existed ran on one GPU with the tables."""
    return r.get("tensor_parallel_size") or 1, r.get("tiles") or "tuned"


def base_row(impl: str, model: str, *, prompt_len: int, new_tokens: int, ceilings: dict,
             tensor_parallel_size: int = 1, tiles: str = "tuned", sampling: dict | None = None) -> dict:
    """The fields every decode row of `impl` on `model` carries (add batch and figures or error)."""
    label = IMPLS[impl] + (f", tensor parallel over {tensor_parallel_size} GPUs" if tensor_parallel_size > 1 else "")
    label += ", untuned (the default rule, no tile table)" if tiles == "untuned" else ""
    kernels = None
    if tiled(impl):  # the twins' fused rows: compiled on a GPU, in the kernel interpreters on CPU
        kernels = "compiled" if _on_gpu() else "interpreter"
        if kernels == "interpreter":
            label += f", in the {'Pallas' if impl.startswith('jax') else 'Triton'} interpreter on CPU"
    return dict(kind="decode", impl=impl, label=label, model=model, kernels=kernels,
                tensor_parallel_size=tensor_parallel_size,
                tiles=tiles, sampling=sampling, prompt_len=prompt_len,
                new_tokens=new_tokens, dtype="bfloat16", weights=quantization_of(impl) or "bf16",
                quantization=quantization_of(impl),
                ceiling_copy_GBps=ceilings.get("copy_GBps"),
                ceiling_matmul_TFLOPs=ceilings.get("matmul_TFLOPs"))


def measure(impl: str, model: str, cfg: Qwen3Config, path: Path | None, batches, *, prompt_len: int, new_tokens: int,
            runs: int, warmup: int, torch_device: str, ceilings: dict, emit, progress, deadline=None,
            tensor_parallel_size: int = 1, tiles: str = "tuned", sampling: dict | None = None) -> None:
    """Load `impl` once, time every batch size, emit one row per batch, free the memory.
    tiles="untuned": with QWEN3_TILE_TABLES=off (common.tiles: the default rule alone) meanwhile.
    sampling: generate()'s temperature, top_k and top_p (None: greedy)."""
    base = base_row(impl, model, prompt_len=prompt_len, new_tokens=new_tokens, ceilings=ceilings,
                    tensor_parallel_size=tensor_parallel_size, tiles=tiles, sampling=sampling)
    before = os.environ.get(TABLES_ENV)
    if tiles == "untuned":
        os.environ[TABLES_ENV] = "off"
    try:
        _measure(impl, model, cfg, path, batches, base, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs,
                 warmup=warmup, torch_device=torch_device, ceilings=ceilings, emit=emit, progress=progress,
                 deadline=deadline, tensor_parallel_size=tensor_parallel_size, sampling=sampling)
    finally:
        if before is None:
            os.environ.pop(TABLES_ENV, None)
        else:
            os.environ[TABLES_ENV] = before


def _measure(impl: str, model: str, cfg: Qwen3Config, path: Path | None, batches, base: dict, *, prompt_len: int,
             new_tokens: int, runs: int, warmup: int, torch_device: str, ceilings: dict, emit, progress, deadline,
             tensor_parallel_size: int, sampling: dict | None) -> None:
    handle = None
    t0 = time.perf_counter()
    try:
        if impl.startswith("hf"):
            handle = load_hf(path, torch_device, cfg)
        elif impl == "nanovllm":
            handle = NanoVllm(path, batches, prompt_len, new_tokens, sampling)
        else:
            handle = load_twin(impl, path, cfg, tensor_parallel_size)
        load_err = None
    except Exception as e:  # noqa: BLE001
        load_err = f"{'unavailable' if isinstance(e, (Unavailable, ImportError)) else 'load failed'}: " \
                   f"{type(e).__name__}: {str(e)[:400]}"
    load_s = time.perf_counter() - t0
    memory = {} if load_err or impl.startswith("hf") or impl == "nanovllm" else weights_memory(handle)
    if not load_err and impl.startswith("hf"):
        memory = hf_fields(handle)
    progress(f"    {impl} {model}: " + (f"loaded in {load_s:.1f} s" if not load_err else load_err)
             + (f", weights {memory['weights_GB']:.2f} GB" if memory.get("weights_GB") else "")
             + (f", attention {memory['attention']}" if memory.get("attention") else ""))
    for b in batches:
        row = dict(base, batch=b, load_s=load_s, **memory)
        if load_err:
            emit(dict(row, error=load_err))
            continue
        if deadline is not None and time.monotonic() > deadline:
            emit(dict(row, error="skipped: time budget (--budget-s) spent"))
            continue
        t1 = time.perf_counter()
        try:
            prompts = prompts_for(b, prompt_len, cfg.vocab_size)
            first_calls = None  # the twins' warm-up results (Runner.last_stats)
            if impl == "hf-compile":
                fn, how = hf_compiled(handle, torch_device, new_tokens, prompts, max(2, warmup), progress, sampling)
                row["note"] = how
            elif impl == "nanovllm":
                fn = handle
                for _ in range(warmup):
                    fn(prompts)
                if handle.temperature == NANOVLLM_GREEDY_TEMPERATURE:
                    row["note"] = f"temperature {NANOVLLM_GREEDY_TEMPERATURE:g} for greedy (nano-vllm has no greedy path)"
            elif impl == "hf-eager":
                fn = HFGenerate(handle, torch_device, new_tokens, static=False, compile_mode=None, sampling=sampling)
                for _ in range(warmup):
                    fn(prompts)
            else:
                def fn(p, _r=handle):
                    return run_twin(_r, p, new_tokens, sampling)
                first_calls = [fn(prompts) for _ in range(warmup)]
            row["warmup_s"] = time.perf_counter() - t1
            res = [fn(prompts) for _ in range(runs)]
            if first_calls is not None:  # a twin's first call at this batch: its new shapes compile
                first = (first_calls or res)[0]
                row.update(first_call_compile_s=first["compile_s"], first_call_first_token_s=first["first_token_s"])
            _fill(row, res, cfg, b, prompt_len, new_tokens, ceilings)
        except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        emit(row)
        progress(f"    batch {b}: " + (f"{row['decode_tok_s']:.1f} tok/s decode, {row.get('end_to_end_tok_s') or 0:.1f} "
                                      f"end-to-end, {row.get('prefill_tok_s') or 0:.0f} tok/s prefill "
                                      f"({row.get('prefill_s') or 0:.4f} s) ({time.perf_counter() - t1:.1f} s)"
                                      if row.get("decode_tok_s") else row.get("error", "?")))
    if isinstance(handle, NanoVllm):
        handle.close()
    handle = None
    free_memory()


def _fill(row: dict, res: list[dict], cfg: Qwen3Config, b: int, prompt_len: int, new_tokens: int,
          ceilings: dict) -> None:
    steps = max(1, new_tokens - 1)
    tps = [b * steps / r["decode_s"] for r in res]
    best = res[max(range(len(res)), key=tps.__getitem__)]
    row.update(decode_tok_s=max(tps), decode_tok_s_runs=tps, decode_s=best["decode_s"],
               prefill_s=best["prefill_s"], generated=best["generated"])
    pre = [r["prefill_s"] for r in res if r.get("prefill_s")]
    if pre:  # warm prefill: the fastest run's, as prefill_tok_s
        row.update(prefill_s=min(pre), prefill_s_runs=pre)
    if best.get("note"):
        row["note"] = best["note"]
    if best.get("decode_path"):  # a twin's: "per-op", or "one launch per layer" (torch_impl's decode_layer)
        row["decode_path"] = best["decode_path"]
    e2e = [r["generated"] / r["wall_s"] for r in res if r.get("wall_s")]
    if e2e:  # new tokens over the wall time of the whole generate() call, best run
        row.update(end_to_end_tok_s=max(e2e), end_to_end_tok_s_runs=e2e)
    if pre:
        row["prefill_tok_s"] = b * prompt_len / min(pre)
    if best["generated"] != b * new_tokens:
        row["note"] = (row.get("note", "") + f" generated {best['generated']} tokens, expected "
                       f"{b * new_tokens}").strip()
    bw, mm = ceilings.get("copy_GBps"), ceilings.get("matmul_TFLOPs")
    if bw:
        row["bw_floor_tok_s"] = decode_floor_tok_s(cfg, b, prompt_len, new_tokens, bw, quantization_of(row["impl"]))
        row["pct_bw_floor"] = 100 * row["decode_tok_s"] / row["bw_floor_tok_s"]
    if bw and mm and row.get("prefill_tok_s"):
        row["prefill_floor_tok_s"] = prefill_floor_tok_s(cfg, b, prompt_len, bw, mm)
        row["pct_prefill_roofline"] = 100 * row["prefill_tok_s"] / row["prefill_floor_tok_s"]
