"""Kernel benchmarks: each fused op of both twins against the plain op of the same framework.

One setup function per framework (`_jax_setup`, `_torch_setup`) builds the inputs of a case once
and returns, per provider ("fused" = jax_impl.kernels / torch_impl.kernels, "plain" =
jax_impl/ops_plain.py / torch_impl/ops_plain.py, never re-written here), the chain that
bench/timing.py times. Shapes come from the chosen presets: decode batches (one token per
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
from typing import Callable

from common.config import Qwen3Config
from bench.timing import TimingPlan, time_jax_chain, time_torch_chain

OPS = ("rmsnorm_qkv", "mlp", "attn_out", "decode_attention", "prefill_attention")
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
    if c.op == "attn_out":
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
            "attn_out": E * h * hq * d, "decode_attention": E * 2 * c.tokens * c.ctx * hkv * d,
            "prefill_attention": E * 2 * c.tokens * hkv * d}[c.op]


def num_layers(c: Case, s: Settings) -> int:
    per = max(1, layer_bytes(c))
    n = max(s.min_layers, -(-s.min_bytes // per))
    return int(max(s.min_layers, min(n, s.max_layers, s.max_bytes // per)))


def paged(ctx: int) -> tuple[int, int]:
    """(block_size, blocks per sequence) of the paged layout: 256-row blocks as nano-vllm."""
    bs = min(256, ctx)
    return bs, -(-ctx // bs)


# ----- jax ---------------------------------------------------------------------------------------

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


def _jax_setup(c: Case, n: int, layout: str):
    """(carry, layers, shared, body_for(ops)) of a jax chain; layout: "contiguous" | "paged"."""
    import jax
    import jax.numpy as jnp

    from jax_impl import ops_plain

    cfg, t = c.cfg, c.tokens
    h, hq, hkv, d, eps = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.rms_norm_eps)
    base = jax.random.key(zlib.crc32(c.label.encode()))
    count = iter(range(1 << 30))

    def rnd(shape, scale=1.0):
        return _jax_normal(jax.random.fold_in(base, next(count)), tuple(shape), float(scale), 0.0)

    def norm_w(size):
        return _jax_normal(jax.random.fold_in(base, next(count)), (size,), 0.1, 1.0)

    if c.op == "mlp":
        i = cfg.intermediate_size
        layers = [dict(nw=norm_w(h), gu=rnd((2 * i, h), h ** -0.5), dn=rnd((h, i), i ** -0.5)) for _ in range(n)]
        return rnd((t, h)), layers, {}, lambda ops: (
            lambda x, _, L, S: ops.mlp(x, L["nw"], L["gu"], L["dn"], eps=eps))
    if c.op == "attn_out":
        layers = [dict(wo=rnd((h, hq * d), (hq * d) ** -0.5)) for _ in range(n)]
        return rnd((t, h)), layers, dict(attn=rnd((t, hq * d))), lambda ops: (
            lambda r, _, L, S: ops.attn_out(S["attn"], L["wo"], r))
    if c.op == "rmsnorm_qkv":
        pos = jnp.full((t,), c.ctx - 1, jnp.int32) if c.phase == "decode" else jnp.arange(t, dtype=jnp.int32)
        shared = dict(cos_sin=ops_plain.rope_table(max(c.ctx, t) + 1, d, cfg.rope_theta), pos=pos,
                      slots=jnp.arange(t, dtype=jnp.int32))
        layers = [dict(nw=norm_w(h), w=rnd(((hq + 2 * hkv) * d, h), h ** -0.5), qn=norm_w(d), kn=norm_w(d))
                  for _ in range(n)]
        caches = tuple((rnd((t, 1, hkv, d)), rnd((t, 1, hkv, d))) for _ in range(n))

        def body_for(ops):
            def body(carry, i, L, S):
                x, cs = carry
                q, kc, vc = ops.rmsnorm_qkv(x, L["nw"], L["w"], L["qn"], L["kn"], S["cos_sin"], S["pos"],
                                            S["slots"], cs[i][0], cs[i][1], num_heads=hq, num_kv_heads=hkv, eps=eps)
                # the next layer's input: q's first `hidden` features (a free reshape when Hq*D == hidden)
                return q.reshape(t, hq * d)[:, :h], cs[:i] + ((kc, vc),) + cs[i + 1:]
            return body

        return (rnd((t, h)), caches), layers, shared, body_for
    if c.op == "decode_attention":
        bs, nb = paged(c.ctx)
        if layout == "contiguous":  # the jax model's layout: block b is sequence b, no table
            shape, table = (t, c.ctx, hkv, d), None
        else:
            shape = (t * nb, bs, hkv, d)
            table = jnp.arange(t * nb, dtype=jnp.int32).reshape(t, nb)
        layers = [dict(k=rnd(shape), v=rnd(shape)) for _ in range(n)]
        shared = dict(lens=jnp.full((t,), c.ctx, jnp.int32), table=table)
        return rnd((t, hq, d)), layers, shared, lambda ops: (
            lambda q, _, L, S: ops.decode_attention(q, L["k"], L["v"], S["table"], S["lens"]))
    if c.op == "prefill_attention":  # one prompt of t tokens, jax_impl.model's [B, L, H, D] layout
        layers = [dict(k=rnd((1, t, hkv, d)), v=rnd((1, t, hkv, d))) for _ in range(n)]
        return rnd((1, t, hq, d)), layers, dict(lens=jnp.full((1,), t, jnp.int32)), lambda ops: (
            lambda q, _, L, S: ops.prefill_attention(q, L["k"], L["v"], S["lens"]))
    raise ValueError(f"unknown op {c.op!r}")


def _jax_rows(c: Case, s: Settings) -> dict[str, dict]:
    from jax_impl import ops_plain

    try:
        from jax_impl import kernels as fused_ops
        fused_err = None
    except Exception as e:  # noqa: BLE001
        fused_ops, fused_err = None, f"unavailable: jax_impl.kernels: {type(e).__name__}: {e}"
    n = num_layers(c, s)
    layout = "contiguous" if c.op == "decode_attention" else "-"
    out, note, inputs = {}, None, None
    try:
        for provider, ops in (("fused", fused_ops), ("plain", ops_plain)):
            if ops is None:
                out[provider] = dict(error=fused_err)
                continue
            try:
                inputs = inputs or _jax_setup(c, n, layout)
                carry, layers, shared, body_for = inputs
                try:
                    r = time_jax_chain(body_for(ops), carry, layers, shared, s.plan)
                except Exception as e:  # noqa: BLE001 - the kernel may not take block_tables=None yet
                    if layout != "contiguous" or provider != "fused":
                        raise
                    note = f"block_tables=None refused ({type(e).__name__}: {str(e)[:120]}); paged layout"
                    layout, inputs = "paged", None
                    carry = layers = shared = None
                    inputs = _jax_setup(c, n, layout)
                    carry, layers, shared, body_for = inputs
                    r = time_jax_chain(body_for(ops), carry, layers, shared, s.plan)
                out[provider] = dict(r, n_layers=n, layout=layout, note=note)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
                out[provider] = dict(error=f"{type(e).__name__}: {str(e)[:500]}", n_layers=n, layout=layout)
            finally:
                carry = layers = shared = None
    finally:
        inputs = None
        gc.collect()
    return out


# ----- torch -------------------------------------------------------------------------------------

def _torch_setup(c: Case, n: int, device) -> tuple[dict, Callable]:
    """(state, call_for(ops)) where call_for(ops)(i) runs layer i and chains through `state`."""
    import torch

    from torch_impl import ops_plain

    cfg, t = c.cfg, c.tokens
    h, hq, hkv, d, eps = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.rms_norm_eps)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(c.label.encode()))

    def rnd(shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(torch.bfloat16)

    def norm_w(size):
        return (1.0 + 0.1 * torch.randn(size, generator=g, device=device)).to(torch.bfloat16)

    st: dict = {}
    if c.op == "mlp":
        i = cfg.intermediate_size
        L = [dict(nw=norm_w(h), gu=rnd((2 * i, h), h ** -0.5), dn=rnd((h, i), i ** -0.5)) for _ in range(n)]
        st["x"] = rnd((t, h))

        def call_for(ops):
            def call(k):
                st["x"] = ops.mlp(st["x"], L[k]["nw"], L[k]["gu"], L[k]["dn"], eps=eps)
            return call
    elif c.op == "attn_out":
        L = [dict(wo=rnd((h, hq * d), (hq * d) ** -0.5)) for _ in range(n)]
        st.update(x=rnd((t, h)), attn=rnd((t, hq * d)))

        def call_for(ops):
            def call(k):
                st["x"] = ops.attn_out(st["attn"], L[k]["wo"], st["x"])
            return call
    elif c.op == "rmsnorm_qkv":
        pos = (torch.full((t,), c.ctx - 1, dtype=torch.int32, device=device) if c.phase == "decode"
               else torch.arange(t, dtype=torch.int32, device=device))
        cos_sin = ops_plain.rope_table(max(c.ctx, t) + 1, d, cfg.rope_theta, device=device)
        slots = torch.arange(t, dtype=torch.int32, device=device)
        L = [dict(nw=norm_w(h), w=rnd(((hq + 2 * hkv) * d, h), h ** -0.5), qn=norm_w(d), kn=norm_w(d),
                  kc=rnd((t, 1, hkv, d)), vc=rnd((t, 1, hkv, d))) for _ in range(n)]
        st["x"] = rnd((t, h))

        def call_for(ops):
            def call(k):
                lk = L[k]
                q, _, _ = ops.rmsnorm_qkv(st["x"], lk["nw"], lk["w"], lk["qn"], lk["kn"], cos_sin, pos, slots,
                                          lk["kc"], lk["vc"], num_heads=hq, num_kv_heads=hkv, eps=eps)
                st["x"] = q.view(t, hq * d)[:, :h]  # as the jax chain: q's first `hidden` features
            return call
    elif c.op == "decode_attention":
        bs, nb = paged(c.ctx)
        L = [dict(k=rnd((t * nb, bs, hkv, d)), v=rnd((t * nb, bs, hkv, d))) for _ in range(n)]
        table = torch.arange(t * nb, dtype=torch.int32, device=device).view(t, nb)
        lens = torch.full((t,), c.ctx, dtype=torch.int32, device=device)
        st["q"] = rnd((t, hq, d))

        def call_for(ops):
            def call(k):
                st["q"] = ops.decode_attention(st["q"], L[k]["k"], L[k]["v"], table, lens)
            return call
    elif c.op == "prefill_attention":  # one prompt of t tokens, contiguous keys (no cached prefix)
        L = [dict(k=rnd((t, hkv, d)), v=rnd((t, hkv, d))) for _ in range(n)]
        cu = torch.tensor([0, t], dtype=torch.int32, device=device)
        st["q"] = rnd((t, hq, d))

        def call_for(ops):
            def call(k):
                st["q"] = ops.prefill_attention(st["q"], L[k]["k"], L[k]["v"], cu, cu, max_seqlen_q=t)
            return call
    else:
        raise ValueError(f"unknown op {c.op!r}")
    return st, call_for


def _torch_rows(c: Case, s: Settings, device) -> dict[str, dict]:
    import torch

    from torch_impl import ops_plain

    try:
        from torch_impl import kernels as fused_ops
        fused_err = None
    except Exception as e:  # noqa: BLE001
        fused_ops, fused_err = None, f"unavailable: torch_impl.kernels: {type(e).__name__}: {e}"
    n = num_layers(c, s)
    layout = "paged" if c.op == "decode_attention" else "-"
    out = {}
    st = call_for = None
    try:
        st, call_for = _torch_setup(c, n, device)
        for provider, ops in (("fused", fused_ops), ("plain", ops_plain)):
            if ops is None:
                out[provider] = dict(error=fused_err)
                continue
            try:
                with torch.inference_mode():
                    r = time_torch_chain(call_for(ops), n, torch.device(device), s.plan, state=st)
                out[provider] = dict(r, n_layers=n, layout=layout)
            except Exception as e:  # noqa: BLE001
                out[provider] = dict(error=f"{type(e).__name__}: {str(e)[:500]}", n_layers=n, layout=layout)
    except Exception as e:  # noqa: BLE001 - inputs could not be built: both rows carry it
        for p in PROVIDERS:
            out.setdefault(p, dict(error=f"setup: {type(e).__name__}: {str(e)[:500]}", n_layers=n))
    finally:
        st = call_for = None
        gc.collect()
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
                res = _jax_rows(c, s) if fw == "jax" else _torch_rows(c, s, torch_device)
            except Exception as e:  # noqa: BLE001 - e.g. the framework itself cannot be imported
                res = {p: dict(error=f"unavailable: {type(e).__name__}: {e}") for p in PROVIDERS}
            progress(f"    {time.perf_counter() - t0:.1f} s: " + ", ".join(
                f"{p} {r['median_s'] * 1e6:.1f} us" if r.get("median_s") else f"{p} {r.get('error', '?')[:100]}"
                for p, r in res.items()))
        for row in case_rows(fw, c, res, ceilings):
            emit(row)
