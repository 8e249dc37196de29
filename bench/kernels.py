"""Kernel benchmarks: each fused op of both twins against the plain op of the same framework.

One setup function (`_setup`: both twins take the same op API) builds the inputs of a case once
and returns, per provider ("fused" = jax_impl.kernels / torch_impl.kernels, "plain" =
jax_impl/plain.py / torch_impl/plain.py, never re-written here), the chain that
common/timing.py times. Shapes come from the chosen presets: decode batches (one token per
sequence) and prefill token counts for the three projections, decode batches at a context of
`ctx` tokens for decode_attention, one causal prompt of each prefill token count for
prefill_attention.

Bytes and FLOPs are the op's minimum traffic and arithmetic (every input read once, every output
written once; for decode_attention the K and V of `ctx` positions per sequence), so GB/s and
TFLOP/s compare implementations doing the same work; the percentages are of the copy and matmul
ceilings measured in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
import zlib

from common.config import Qwen3Config
from common.ops import AttentionMeta
from common.timing import TimingPlan, time_jax_chain, time_torch_chain

OPS = ("rmsnorm_qkv", "mlp", "linear_residual", "decode_attention", "prefill_attention")
FRAMEWORKS = ("jax", "torch")
PROVIDERS = ("fused", "plain")
E = 2  # bytes per bf16 element


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    cfg: Qwen3Config
    op: str
    phase: str  # "decode" | "prefill"
    tokens: int  # T: decode batch or prefill tokens
    ctx: int  # decode_attention: cached positions per sequence

    @property
    def label(self) -> str:
        extra = f" ctx={self.ctx}" if self.op == "decode_attention" else ""
        return f"{self.op} {self.model} {self.phase} T={self.tokens}{extra}"


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


def layer_bytes(c: Case) -> int:
    """Bytes of the buffers each layer of the chain owns (weights; the KV cache for attention)."""
    cfg = c.cfg
    h, hq, hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {"rmsnorm_qkv": E * (hq + 2 * hkv) * d * h, "mlp": E * 3 * cfg.intermediate_size * h,
            "linear_residual": E * h * hq * d, "decode_attention": E * 2 * c.tokens * c.ctx * hkv * d,
            "prefill_attention": E * 2 * c.tokens * hkv * d}[c.op]


def num_layers(c: Case, s: Settings) -> int:
    per = max(1, layer_bytes(c))
    n = max(s.min_layers, -(-s.min_bytes // per))
    return int(max(s.min_layers, min(n, s.max_layers, s.max_bytes // per)))


def paged(ctx: int) -> tuple[int, int]:
    """(block_size, blocks per sequence) of the paged layout: 256-row blocks as nano-vllm."""
    bs = min(256, ctx)
    return bs, -(-ctx // bs)


# ----- inputs and chains, the same for both twins (one op API: common.ops) -----------------------

class _Arrays:
    """Random bf16 inputs and int32 index arrays on the framework's device."""

    def __init__(self, fw: str, label: str, device):
        self.fw, self.device, self.count = fw, device, 0
        self.seed = zlib.crc32(label.encode())
        if fw == "jax":
            import jax
            import jax.numpy as jnp

            self.jax, self.jnp, self.base = jax, jnp, jax.random.key(self.seed)
        else:
            import torch

            self.torch = torch
            self.gen = torch.Generator(device=device).manual_seed(self.seed)

    def normal(self, shape, scale=1.0, offset=0.0):
        self.count += 1
        if self.fw == "jax":
            return _jax_normal(self.jax.random.fold_in(self.base, self.count), tuple(shape), float(scale), float(offset))
        t = self.torch.randn(tuple(shape), generator=self.gen, device=self.device, dtype=self.torch.float32)
        return (offset + t * scale).to(self.torch.bfloat16)

    def ints(self, values):
        if self.fw == "jax":
            return self.jnp.asarray(values, self.jnp.int32)
        return self.torch.as_tensor(values, dtype=self.torch.int32, device=self.device)

    def rope_table(self, positions: int, d: int, theta: float):
        if self.fw == "jax":
            from jax_impl import plain

            return plain.rope_table(positions, d, theta)
        from torch_impl import plain

        return plain.rope_table(positions, d, theta, device=self.device)


@functools.lru_cache(maxsize=None)
def _jax_normal_fn():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key, shape, scale, offset):  # bf16 offset + scale * N(0, 1), compiled once per shape
        return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)

    return normal


def _jax_normal(key, shape, scale, offset):
    return _jax_normal_fn()(key, shape, scale, offset)


def _setup(c: Case, n: int, fw: str, device):
    """(carry, layers, shared, body_for(ops)) of a chain of n layers, each on its own buffers:
    body(carry, i, layer, shared) -> carry. Decode attention reads jax_impl's layout in jax (block b
    holds sequence b) and nano-vllm's paged one in torch."""
    a = _Arrays(fw, c.label, device)
    cfg, t = c.cfg, c.tokens
    h, hq, hkv, d, eps = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.rms_norm_eps)
    norm_w = lambda size: a.normal((size,), 0.1, 1.0)  # noqa: E731
    if c.op == "mlp":
        i = cfg.intermediate_size
        layers = [dict(nw=norm_w(h), gu=a.normal((2 * i, h), h ** -0.5), dn=a.normal((h, i), i ** -0.5))
                  for _ in range(n)]
        return a.normal((t, h)), layers, {}, lambda ops: (
            lambda x, _, L, S: ops.mlp(x, L["nw"], L["gu"], L["dn"], x, eps=eps))
    if c.op == "linear_residual":
        layers = [dict(wo=a.normal((h, hq * d), (hq * d) ** -0.5)) for _ in range(n)]
        return a.normal((t, h)), layers, dict(attn=a.normal((t, hq * d))), lambda ops: (
            lambda r, _, L, S: ops.linear_residual(S["attn"], L["wo"], r))
    if c.op == "rmsnorm_qkv":
        pos = [c.ctx - 1] * t if c.phase == "decode" else list(range(t))
        shared = dict(cos_sin=a.rope_table(max(c.ctx, t) + 1, d, cfg.rope_theta),
                      meta=AttentionMeta(positions=a.ints(pos), slots=a.ints(list(range(t)))))
        layers = [dict(nw=norm_w(h), w=a.normal(((hq + 2 * hkv) * d, h), h ** -0.5), qn=norm_w(d), kn=norm_w(d))
                  for _ in range(n)]
        caches = tuple((a.normal((t, 1, hkv, d)), a.normal((t, 1, hkv, d))) for _ in range(n))

        def body_for(ops):
            def body(carry, i, L, S):
                x, cs = carry
                q, kc, vc = ops.rmsnorm_qkv(x, L["nw"], L["w"], L["qn"], L["kn"], S["cos_sin"], cs[i][0], cs[i][1],
                                            S["meta"], num_heads=hq, num_kv_heads=hkv, eps=eps)
                # the next layer's input: q's first `hidden` features (a free reshape when Hq*D == hidden)
                return q.reshape(t, hq * d)[:, :h], cs[:i] + ((kc, vc),) + cs[i + 1:]
            return body

        return (a.normal((t, h)), caches), layers, shared, body_for
    if c.op == "decode_attention":
        bs, nb = paged(c.ctx)
        if fw == "jax":  # block b is sequence b, no table
            shape, table = (t, c.ctx, hkv, d), None
        else:
            shape, table = (t * nb, bs, hkv, d), a.ints([[b * nb + j for j in range(nb)] for b in range(t)])
        layers = [dict(k=a.normal(shape), v=a.normal(shape)) for _ in range(n)]
        meta = AttentionMeta(context_lens=a.ints([c.ctx] * t), block_tables=table)
        return a.normal((t, hq, d)), layers, dict(meta=meta), lambda ops: (
            lambda q, _, L, S: ops.decode_attention(q, L["k"], L["v"], S["meta"]))
    if c.op == "prefill_attention":  # one prompt of t tokens in cache block 0 (no cached prefix)
        layers = [dict(k=a.normal((1, t, hkv, d)), v=a.normal((1, t, hkv, d))) for _ in range(n)]
        cu = a.ints([0, t])
        meta = AttentionMeta(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=t, max_seqlen_k=t, is_prefill=True)
        return a.normal((t, hq, d)), layers, dict(meta=meta), lambda ops: (
            lambda q, _, L, S: ops.prefill_attention(q, L["k"], L["v"], S["meta"]))
    raise ValueError(f"unknown op {c.op!r}")


def _time(fw: str, body, carry, layers, shared, plan: TimingPlan, device) -> dict:
    if fw == "jax":
        return time_jax_chain(body, carry, layers, shared, plan)
    import torch

    state = dict(carry=carry)

    def call(k):
        state["carry"] = body(state["carry"], k, layers[k], shared)

    with torch.inference_mode():
        return time_torch_chain(call, len(layers), torch.device(device), plan, state=state)


def _rows(fw: str, c: Case, s: Settings, device) -> dict[str, dict]:
    """The fused and plain figures (or errors) of case `c` in framework `fw`."""
    import importlib

    plain = importlib.import_module(f"{fw}_impl.plain")
    try:
        fused_ops, fused_err = importlib.import_module(f"{fw}_impl.kernels"), None
    except Exception as e:  # noqa: BLE001
        fused_ops, fused_err = None, f"unavailable: {fw}_impl.kernels: {type(e).__name__}: {e}"
    n = num_layers(c, s)
    layout = "-" if c.op != "decode_attention" else "one-block" if fw == "jax" else "paged"
    out, inputs = {}, None
    try:
        inputs = _setup(c, n, fw, device)
        carry, layers, shared, body_for = inputs
        for provider, ops in (("fused", fused_ops), ("plain", plain)):
            if ops is None:
                out[provider] = dict(error=fused_err)
                continue
            try:
                r = _time(fw, body_for(ops), carry, layers, shared, s.plan, device)
                out[provider] = dict(r, n_layers=n, layout=layout)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
                out[provider] = dict(error=f"{type(e).__name__}: {str(e)[:500]}", n_layers=n, layout=layout)
    except Exception as e:  # noqa: BLE001 - inputs could not be built: both rows carry it
        for p in PROVIDERS:
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
    """The fused and plain rows of case `c` in framework `fw` from their figures (or errors)."""
    base = dict(kind="kernel", framework=fw, op=c.op, model=c.model, phase=c.phase, tokens=c.tokens,
                ctx=c.ctx if c.op == "decode_attention" else None, dtype="bfloat16")
    rows = {p: _finish(dict(base, impl=p, **res[p]), c, ceilings) for p in PROVIDERS}
    if rows["fused"].get("median_s") and rows["plain"].get("median_s"):
        rows["fused"]["speedup_vs_plain"] = rows["plain"]["median_s"] / rows["fused"]["median_s"]
    return [rows[p] for p in PROVIDERS]


def run(cases: list[Case], frameworks, s: Settings, ceilings: dict, *, torch_device, emit, progress) -> None:
    """Time every case in every framework; `emit(row)` gets each row as soon as it is done."""
    jobs = [(fw, c) for c in cases for fw in frameworks]
    for k, (fw, c) in enumerate(jobs, start=1):
        progress(f"[{k}/{len(jobs)}] kernels {fw} {c.label}")
        if s.deadline is not None and time.monotonic() > s.deadline:
            res = {p: dict(error="skipped: time budget (--budget-s) spent") for p in PROVIDERS}
        else:
            t0 = time.perf_counter()
            try:
                res = _rows(fw, c, s, torch_device)
            except Exception as e:  # noqa: BLE001 - e.g. the framework itself cannot be imported
                res = {p: dict(error=f"unavailable: {type(e).__name__}: {e}") for p in PROVIDERS}
            progress(f"    {time.perf_counter() - t0:.1f} s: " + ", ".join(
                f"{p} {r['median_s'] * 1e6:.1f} us" if r.get("median_s") else f"{p} {r.get('error', '?')[:100]}"
                for p, r in res.items()))
        for row in case_rows(fw, c, res, ceilings):
            emit(row)
