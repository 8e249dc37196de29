"""The stages of a batch-1 decode step, each timed as it runs in decode, beside a plain read of its bytes.

    python -m bench stages [--models ...] [--frameworks jax,torch] [--quantization none,int8,fp8] [--ctx 1024,8192]

A stage is what one launch (or one fused op) of a decode step does at one token:
- qkv: RMSNorm + the packed QKV projection + q/k RMSNorm + RoPE + the KV-cache write (rmsnorm_qkv);
- o_proj: the attention output projection + the residual (linear_residual, K = Hq * D);
- gate_up: RMSNorm + the packed gate/up projection + SiLU(gate) * up (the kernels' norm_gate_up);
- down: the down projection + the residual (linear_residual, K = intermediate);
- lm_head: the head's logits and their argmax, as the twin's decode step runs them (jax: XLA's product
  and argmax; torch: torch's product for a bf16 head, the fused linear kernel for a quantized one,
  then torch_impl.kernels.argmax on a GPU);
- attention: decode attention over `ctx` cached positions (one sequence; the twin's cache layout).
Each stage is timed as a chain over distinct per-layer buffers (measure/op_chains.py: far past the L2,
the output of one call feeding the next; a CUDA graph in torch, one jit in jax), in every weight
format the projections take (attention reads the bf16 cache in all of them), and beside it the same
chain of a plain streaming read of the same bytes (the framework's sum over a buffer of that size):
rows carry GB/s, % of the copy bandwidth measured in the run, and % of the plain read's rate. A stage
of at most 16 MB (every 0.6B stage but the head) is also timed over one layer's buffers, which the L2
then holds (`l2_us`, the table's "from L2"): what is left is its launches and dependent loads - where
that is close to the stage's time, the stage is bound by latency, not by streaming.

Bytes are the stage's minimum traffic: its weights in their format (values and float32 scales), the
KV cache it reads (attention), its activations (a few KB).
"""

from __future__ import annotations

import dataclasses
import gc
import time

from common import backend, formats
from common.config import Qwen3Config
from measure.op_chains import E, Case, _Arrays, layers_for_bytes, setup, time_chain

STAGES = ("qkv", "o_proj", "gate_up", "down", "lm_head", "attention")
PROJECTION_STAGES = ("qkv", "o_proj", "gate_up", "down")
DEFAULT_CTX = (1024, 8192)
L2_RESIDENT_BYTES = 16 << 20  # stages up to this size are also timed over one layer's buffers (the L2's)


@dataclasses.dataclass(frozen=True)
class Stage:
    model: str
    cfg: Qwen3Config
    stage: str
    fmt: str | None = None  # the projections' weight format (None: bf16); attention: None
    ctx: int = 1024  # cached positions: attention's context, qkv's position

    @property
    def label(self) -> str:
        extra = f" ctx={self.ctx}" if self.stage == "attention" else ""
        return f"{self.stage} {self.model} {self.fmt or 'bf16'}{extra}"

    @property
    def head_format(self) -> formats.WeightFormat:
        return formats.get(formats.head_format(self.fmt))


def make_stages(models: dict[str, Qwen3Config], names, weight_formats, ctxs) -> list[Stage]:
    """Every stage of `names` for every model: the projections and the head in each format, attention
    at each context."""
    out = []
    for model, cfg in models.items():
        for name in names:
            if name == "attention":
                out.extend(Stage(model, cfg, name, None, int(c)) for c in ctxs)
            else:
                out.extend(Stage(model, cfg, name, fmt) for fmt in weight_formats)
    return out


def weight_bytes(shape: tuple[int, int], fmt) -> int:
    """Bytes of an [out, in] weight in format `fmt`: values and float32 scales."""
    f = formats.get(fmt)
    values = shape[0] * shape[1] * (f.storage_bytes or E)
    scales = 1
    for d in f.scale_shape(shape):
        scales *= d
    return values + (4 * scales if f.quantized else 0)


def weight_shape(st: Stage) -> tuple[int, int] | None:
    cfg = st.cfg
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.qkv_size, h), "o_proj": (h, cfg.q_size), "gate_up": (2 * i, h), "down": (h, i),
            "lm_head": (cfg.vocab_size, h)}.get(st.stage)


def stage_bytes(st: Stage) -> int:
    """The minimum bytes one call of the stage moves."""
    cfg = st.cfg
    h, hkv, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    if st.stage == "attention":
        return E * 2 * st.ctx * hkv * d + E * 2 * cfg.num_attention_heads * d
    shape = weight_shape(st)
    fmt = st.head_format.name if st.stage == "lm_head" else st.fmt
    act = E * (shape[1] + shape[0]) + (E * h if st.stage in ("o_proj", "down") else 0)
    if st.stage == "qkv":
        act += E * (h + 2 * d) + E * 2 * hkv * d  # the norm weights, the KV written
    if st.stage == "gate_up":
        act = E * (2 * h + shape[0] // 2)
    if st.stage == "lm_head":
        act = E * h + 4 * cfg.vocab_size  # float32 logits
    return weight_bytes(shape, fmt) + act


def _case(st: Stage) -> Case | None:
    """The op_chains Case of a stage that is one op of the op list."""
    cfg = st.cfg
    if st.stage == "qkv":
        return Case(st.model, cfg, "rmsnorm_qkv", "decode", 1, st.ctx, fmt=st.fmt)
    if st.stage == "o_proj":
        return Case(st.model, cfg, "linear_residual", "decode", 1, fmt=st.fmt)
    if st.stage == "down":
        return Case(st.model, cfg, "linear_residual", "decode", 1, k=cfg.intermediate_size, fmt=st.fmt)
    if st.stage == "attention":
        return Case(st.model, cfg, "decode_attention", "decode", 1, st.ctx, layout=None)
    return None


def setup_stage(st: Stage, n: int, fw: str, device):
    """(carry, layers, shared, body_for(kernels)) of a chain of n calls of the stage."""
    case = _case(st)
    if case is not None:
        return setup(case, n, fw, device)
    a = _Arrays(backend.get(fw), st.label, device)
    cfg = st.cfg
    h, eps = cfg.hidden_size, cfg.rms_norm_eps
    if st.stage == "gate_up":
        i = cfg.intermediate_size
        layers = [dict(nw=a.normal((h,), 0.1, 1.0), gu=a.weight((2 * i, h), h ** -0.5, st.fmt)) for _ in range(n)]
        import importlib

        norm_gate_up = importlib.import_module(f"{fw}_impl.kernels.mlp").norm_gate_up  # mlp's first kernel
        return a.normal((1, h)), layers, {}, lambda ops: (
            lambda x, _, L, S: norm_gate_up(x, L["nw"], L["gu"], eps=eps)[:, :h])  # I >= hidden in Qwen3
    if st.stage == "lm_head":
        head = st.head_format
        layers = [dict(w=a.weight((cfg.vocab_size, h), h ** -0.5, head.name if head.quantized else None))
                  for _ in range(n)]
        return a.normal((1, h)), layers, {}, lambda ops: _head_body(fw, ops)
    raise ValueError(f"unknown stage {st.stage!r}: expected one of {', '.join(STAGES)}")


def _head_body(fw: str, ops):
    """The head and the greedy argmax as the twin's decode step runs them; the next call's input
    depends on the token (a zero-weighted row of the logits), so the chain cannot skip a call."""
    if fw == "jax":
        import jax.numpy as jnp

        from jax_impl import plain

        def body(x, _, L, S):
            logits = plain.matmul_f32(x, L["w"])
            tok = jnp.argmax(logits, axis=-1)
            # the chosen logit times zero: XLA folds an integer times zero (and with it the whole head),
            # never a float one
            return x + (jnp.take_along_axis(logits, tok[:, None], axis=-1) * 0).astype(x.dtype)
        return body
    import torch
    import torch.nn.functional as F

    from common.formats import QWeight

    argmax = None
    if torch.cuda.is_available():
        from torch_impl.kernels.argmax import argmax  # noqa: PLC0415 - triton on a GPU only

    def body(x, _, L, S):
        w = L["w"]
        logits = ops.linear_residual(x, w, None) if isinstance(w, QWeight) else F.linear(x, w)
        tok = argmax(logits) if argmax is not None and logits.is_cuda else torch.argmax(logits, dim=-1)
        return x + (tok[:, None] * 0).to(x.dtype)
    return body


def setup_stream(st: Stage, n: int, fw: str, device):
    """A chain of n plain reads of the stage's bytes: the framework's sum over a float32 buffer."""
    words = max(1, stage_bytes(st) // 4)
    if fw == "jax":
        import jax.numpy as jnp

        layers = [dict(b=jnp.zeros((words,), jnp.float32) + k) for k in range(n)]
        return jnp.zeros((), jnp.float32), layers, {}, lambda _: (lambda c, _i, L, S: c + jnp.sum(L["b"]))
    import torch

    layers = [dict(b=torch.full((words,), float(k), device=device)) for k in range(n)]
    return torch.zeros((), device=device), layers, {}, lambda _: (lambda c, _i, L, S: c + L["b"].sum())


@dataclasses.dataclass(frozen=True)
class Settings:
    plan: object  # measure.timing.TimingPlan
    min_bytes: int = 256 << 20
    max_bytes: int = 6 << 30
    max_layers: int = 32
    min_layers: int = 2
    deadline: float | None = None


def _time(fw: str, st: Stage, s: Settings, device, make, ops, resident: bool = False) -> dict:
    """The stage's chain timed (measure.timing); with `resident` also the same chain over the first
    layer's buffers alone (`l2_median_s`): a stage small enough for the L2 then reads it from there,
    which leaves the time its launches and dependent loads take - its latency floor."""
    n = layers_for_bytes(stage_bytes(st), s.min_bytes, s.max_bytes, s.min_layers, s.max_layers)
    inputs = None
    try:
        inputs = make(st, n, fw, device)
        carry, layers, shared, body_for = inputs
        out = dict(time_chain(fw, body_for(ops), carry, layers, shared, s.plan, device), n_layers=n)
        if resident:
            again = time_chain(fw, body_for(ops), carry, [layers[0]] * n, shared, s.plan, device)
            out["l2_median_s"] = again["median_s"]
        return out
    except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
        return dict(error=f"{type(e).__name__}: {str(e)[:500]}", n_layers=n)
    finally:
        inputs = None
        gc.collect()
        if fw == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()


def base_row(fw: str, st: Stage) -> dict:
    weights = (st.head_format.name if st.stage == "lm_head" else (st.fmt or "bf16")) if st.stage != "attention" \
        else "bf16"
    return dict(kind="stage", framework=fw, model=st.model, stage=st.stage, weights=weights,
                ctx=st.ctx if st.stage == "attention" else None,
                layout=backend.get(fw).default_layout if st.stage == "attention" else None, bytes=stage_bytes(st))


def finish(row: dict, stage: dict, stream: dict, ceilings: dict) -> dict:
    """The row's figures: the stage's and the plain read's per-call time, GB/s and percentages."""
    bw = ceilings.get("copy_GBps")
    row.update({k: v for k, v in stage.items() if k in ("median_s", "p25_s", "p75_s", "method", "n_layers",
                                                         "error")})
    if stage.get("l2_median_s"):
        row["l2_us"] = stage["l2_median_s"] * 1e6
    if stream.get("median_s"):
        row.update(stream_us=stream["median_s"] * 1e6, stream_GBps=row["bytes"] / stream["median_s"] / 1e9)
    elif stream.get("error"):
        row["stream_error"] = stream["error"]
    if row.get("median_s"):
        row.update(us=row["median_s"] * 1e6, GBps=row["bytes"] / row["median_s"] / 1e9)
        if bw:
            row["pct_copy_bw"] = 100 * row["GBps"] / bw
        if row.get("stream_GBps"):
            row["pct_of_stream"] = 100 * row["GBps"] / row["stream_GBps"]
    if bw:
        row["ceiling_copy_GBps"] = bw
    return row


def run(stages: list[Stage], frameworks, s: Settings, ceilings: dict, *, torch_device, emit, progress) -> None:
    """Time every stage (and its plain read) in every framework; `emit(row)` gets each row when done."""
    jobs = [(fw, st) for fw in frameworks for st in stages]
    for k, (fw, st) in enumerate(jobs, start=1):
        progress(f"[{k}/{len(jobs)}] stage {fw} {st.label}")
        row = base_row(fw, st)
        if s.deadline is not None and time.monotonic() > s.deadline:
            emit(dict(row, error="skipped: time budget (--budget-s) spent"))
            continue
        try:
            kernels = backend.get(fw).kernels
        except Exception as e:  # noqa: BLE001 - the framework or its kernels cannot be imported
            emit(dict(row, error=f"unavailable: {fw}_impl.kernels: {type(e).__name__}: {e}"))
            continue
        t0 = time.perf_counter()
        stage = _time(fw, st, s, torch_device, setup_stage, kernels, resident=stage_bytes(st) <= L2_RESIDENT_BYTES)
        stream = _time(fw, st, s, torch_device, setup_stream, None)
        row = finish(row, stage, stream, ceilings)
        progress(f"    {time.perf_counter() - t0:.1f} s: " + (
            f"{row['us']:.1f} us, {row['GBps']:.0f} GB/s" + (f" ({row['pct_of_stream']:.0f}% of the plain read)"
                                                            if row.get("pct_of_stream") else "")
            if row.get("us") else row.get("error", "?")[:100]))
        emit(row)


def expected_rows(stages: list[Stage], frameworks) -> list[dict]:
    """The rows a job will report (error rows for those a crashed job did not)."""
    return [base_row(fw, st) for fw in frameworks for st in stages]


def table(rows: list[dict]) -> str:
    """Markdown: one line per stage, per framework the time, GB/s, % of copy and % of the plain read."""
    rows = [r for r in rows if r.get("kind") == "stage"]
    if not rows:
        return ""
    fws = list(dict.fromkeys(r["framework"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["stage"], r["weights"], r.get("ctx")) for r in rows))
    by = {(r["framework"], r["model"], r["stage"], r["weights"], r.get("ctx")): r for r in rows}
    head = "| model | stage | weights | MB | " + " | ".join(f"{fw} us (from L2) | {fw} GB/s (% copy, % read)"
                                                          for fw in fws)
    lines = [head + " |", "|---" * (4 + 2 * len(fws)) + "|"]
    for model, stage, weights, ctx in keys:
        any_row = next(by[(fw, model, stage, weights, ctx)] for fw in fws if (fw, model, stage, weights, ctx) in by)
        cells = [model, stage + (f" ctx={ctx}" if ctx else ""), weights, f"{any_row['bytes'] / 1e6:,.1f}"]
        for fw in fws:
            r = by.get((fw, model, stage, weights, ctx), {})
            if r.get("us"):
                pct = ", ".join(p for p in (f"{r['pct_copy_bw']:.0f}%" if r.get("pct_copy_bw") else "",
                                            f"{r['pct_of_stream']:.0f}%" if r.get("pct_of_stream") else "") if p)
                us = f"{r['us']:,.1f}" + (f" ({r['l2_us']:,.1f})" if r.get("l2_us") else "")
                cells += [us, f"{r['GBps']:,.0f} ({pct})" if r["GBps"] >= 10 else f"{r['GBps']:.2f} ({pct})"]
            else:
                cells += ["-", (r.get("error") or "-")[:60]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["STAGES", "Stage", "Settings", "make_stages", "stage_bytes", "setup_stage", "setup_stream", "run",
           "expected_rows", "table"]
