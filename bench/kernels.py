"""Kernel benchmarks: each fused op of both twins against the plain op of the same framework.

One setup function (measure.op_chains: both twins take the same op API, and the tuners time the
same chains) builds the inputs of a case once and returns, per provider ("fused" = jax_impl.kernels / torch_impl.kernels, "plain" =
jax_impl/plain.py / torch_impl/plain.py, never re-written here), the chain that
measure/timing.py times. Shapes come from the chosen presets: decode batches (one token per
sequence) and prefill token counts for the three projections, decode batches at a context of
`ctx` tokens for decode_attention, one causal prompt of each prefill token count for
prefill_attention.

prefill_attention has a peer in the torch job: torch's own fused attention,
torch.nn.functional.scaled_dot_product_attention (is_causal, enable_gqa: transformers' SDPA call),
on the same prompt and the same per-layer K and V (provider "sdpa", rows of impl "sdpa"); the
fused rows carry `speedup_vs_sdpa` (the report joins jax's rows to the same case's SDPA row).

Bytes and FLOPs are the op's minimum traffic and arithmetic (every input read once, every output
written once; for decode_attention the K and V of `ctx` positions per sequence), so GB/s and
TFLOP/s compare implementations doing the same work; the percentages are of the copy and matmul
ceilings measured in the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import time

from common import backend
from common.config import Qwen3Config
from measure.op_chains import E, Case, chain_layers, setup, time_chain
from common.ops import TILED_OPS
from measure.timing import TimingPlan

OPS = TILED_OPS  # common.ops' ops but the final norm, in its order
FRAMEWORKS = ("jax", "torch")
PROVIDERS = ("fused", "plain")
PEERS = {("torch", "prefill_attention"): ("sdpa",)}  # other libraries' kernels for an op, timed in a framework's job


def providers(fw: str, op: str) -> tuple[str, ...]:
    """The rows of one case in framework `fw`: fused, plain, and the op's peers there."""
    return PROVIDERS + PEERS.get((fw, op), ())


class SdpaOps:
    """prefill_attention as torch's scaled_dot_product_attention computes it (is_causal, GQA through
    enable_gqa, torch's choice of backend): the benchmark's case only - one prompt, no cached prefix,
    its keys in the first rows of cache block 0."""

    @staticmethod
    def prefill_attention(q, k_cache, v_cache, meta):
        import torch.nn.functional as F

        t = q.shape[0]
        if meta.cu_seqlens_q.shape[0] != 2 or meta.max_seqlen_q != t or k_cache.shape[1] < t:
            raise ValueError("the SDPA peer takes one prompt with no cached prefix, keys in cache block 0")
        k, v = (c[0, :t].transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, Hkv, T, D] views
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)  # [T, Hq, D]


@dataclasses.dataclass(frozen=True)
class Settings:
    plan: TimingPlan
    min_bytes: int = 256 << 20  # distinct per-layer buffers per chain: far past the 50 MB L2
    max_bytes: int = 6 << 30
    max_layers: int = 32
    min_layers: int = 2
    deadline: float | None = None  # time.monotonic() after which the rest is skipped


def make_cases(models: dict[str, Qwen3Config], ops, decode_batches, prefill_tokens, ctx: int) -> list[Case]:
    out = []
    for name, cfg in models.items():
        for op in ops:
            if op != "prefill_attention":
                out.extend(Case(name, cfg, op, "decode", int(b), ctx) for b in decode_batches)
            if op != "decode_attention":
                out.extend(Case(name, cfg, op, "prefill", int(t), ctx) for t in prefill_tokens)
    return out


def traffic(c: Case) -> tuple[int, int]:
    """(minimum bytes moved, FLOPs) of one call."""
    cfg, t = c.cfg, c.tokens
    h, i, hq, hkv, d = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim)
    if c.op == "rmsnorm_qkv":
        n = (hq + 2 * hkv) * d
        byt = E * (t * h + h + n * h + 2 * d + t * hq * d + 2 * t * hkv * d) + 4 * t * d + 8 * t
        return byt, 2 * t * h * n
    if c.op == "mlp":
        return E * (2 * t * h + h + 3 * i * h), 6 * t * h * i
    if c.op == "linear_residual":
        return E * (t * hq * d + h * hq * d + 2 * t * h), 2 * t * hq * d * h
    if c.op == "decode_attention":
        return E * (2 * t * hq * d + 2 * t * c.ctx * hkv * d) + 4 * t, 4 * t * hq * c.ctx * d
    if c.op == "prefill_attention":  # causal: query i sees i + 1 keys
        return E * (2 * t * hq * d + 2 * t * hkv * d), 2 * hq * d * t * (t + 1)
    raise ValueError(f"unknown op {c.op!r}: expected one of {', '.join(OPS)}")


def num_layers(c: Case, s: Settings) -> int:
    return chain_layers(c, s.min_bytes, s.max_bytes, s.min_layers, s.max_layers)


def _rows(fw: str, c: Case, s: Settings, device) -> dict[str, dict]:
    """The fused and plain figures (or errors) of case `c` in framework `fw`."""
    b = backend.get(fw)
    plain = b.plain
    try:
        fused_ops, fused_err = b.kernels, None
    except Exception as e:  # noqa: BLE001
        fused_ops, fused_err = None, f"unavailable: {fw}_impl.kernels: {type(e).__name__}: {e}"
    n = num_layers(c, s)
    layout = "-" if c.op != "decode_attention" else b.default_layout
    out, inputs = {}, None
    by_provider = dict(fused=fused_ops, plain=plain, sdpa=SdpaOps)
    try:
        inputs = setup(c, n, fw, device)
        carry, layers, shared, body_for = inputs
        for provider in providers(fw, c.op):
            ops = by_provider[provider]
            if ops is None:
                out[provider] = dict(error=fused_err)
                continue
            try:
                r = time_chain(fw, body_for(ops), carry, layers, shared, s.plan, device)
                out[provider] = dict(r, n_layers=n, layout=layout)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
                out[provider] = dict(error=f"{type(e).__name__}: {str(e)[:500]}", n_layers=n, layout=layout)
    except Exception as e:  # noqa: BLE001 - inputs could not be built: every row carries it
        for p in providers(fw, c.op):
            out.setdefault(p, dict(error=f"setup: {type(e).__name__}: {str(e)[:500]}", n_layers=n))
    finally:
        inputs = carry = layers = shared = None
        gc.collect()
        if fw == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    return out


# ----- the runner --------------------------------------------------------------------------------

def _finish(row: dict, c: Case, ceilings: dict) -> dict:
    byt, flops = traffic(c)
    bw, mm = ceilings.get("copy_GBps"), ceilings.get("matmul_TFLOPs")
    row.update(bytes=byt, flops=flops, ceiling_copy_GBps=bw, ceiling_matmul_TFLOPs=mm)
    med = row.get("median_s")
    if not med:
        return row
    row.update(us=med * 1e6, GBps=byt / med / 1e9, TFLOPs=flops / med / 1e12)
    if bw:
        row["pct_copy_bw"] = 100 * row["GBps"] / bw
    if mm:
        row["pct_matmul"] = 100 * row["TFLOPs"] / mm
    if bw and mm:
        floor = max(byt / (bw * 1e9), flops / (mm * 1e12))
        row.update(floor_us=floor * 1e6, pct_roofline=100 * floor / med,
                   bound="memory" if byt / (bw * 1e9) >= flops / (mm * 1e12) else "compute")
    return row


def case_rows(fw: str, c: Case, res: dict[str, dict], ceilings: dict) -> list[dict]:
    """The fused, plain (and peer) rows of case `c` in framework `fw` from their figures (or errors)."""
    base = dict(kind="kernel", framework=fw, op=c.op, model=c.model, phase=c.phase, tokens=c.tokens,
                ctx=c.ctx if c.op == "decode_attention" else None, dtype="bfloat16")
    from bench.decode import _on_gpu

    # the fused rows' kernels run compiled on a GPU and in their interpreters on CPU (--smoke); the
    # plain rows are the framework's own ops (XLA, torch) either way, the peers their library's
    mode = "compiled" if _on_gpu() else "interpreter"
    names = providers(fw, c.op)
    rows = {p: _finish(dict(base, impl=p, kernels=mode if p == "fused" else None, **res.get(p, {})), c, ceilings)
            for p in names}
    for p in names[1:]:
        if rows["fused"].get("median_s") and rows[p].get("median_s"):
            rows["fused"][f"speedup_vs_{p}"] = rows[p]["median_s"] / rows["fused"]["median_s"]
    return [rows[p] for p in names]


def run(cases: list[Case], frameworks, s: Settings, ceilings: dict, *, torch_device, emit, progress) -> None:
    """Time every case in every framework; `emit(row)` gets each row as soon as it is done."""
    jobs = [(fw, c) for c in cases for fw in frameworks]
    for k, (fw, c) in enumerate(jobs, start=1):
        progress(f"[{k}/{len(jobs)}] kernels {fw} {c.label}")
        if s.deadline is not None and time.monotonic() > s.deadline:
            res = {p: dict(error="skipped: time budget (--budget-s) spent") for p in providers(fw, c.op)}
        else:
            t0 = time.perf_counter()
            try:
                res = _rows(fw, c, s, torch_device)
            except Exception as e:  # noqa: BLE001 - e.g. the framework itself cannot be imported
                res = {p: dict(error=f"unavailable: {type(e).__name__}: {e}") for p in providers(fw, c.op)}
            progress(f"    {time.perf_counter() - t0:.1f} s: " + ", ".join(
                f"{p} {r['median_s'] * 1e6:.1f} us" if r.get("median_s") else f"{p} {r.get('error', '?')[:100]}"
                for p, r in res.items()))
        for row in case_rows(fw, c, res, ceilings):
            emit(row)
