"""jax_impl's plain one-token projections take the form common.tiles.lookup names for the device
(Choice.plain_form): the dot on the CPU, multiply-and-reduce on CUDA GPUs - checked by the traced
program's structure, not by timing - and both forms agree with common.reference."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from common import formats, reference as R  # noqa: E402
from common.ops import OPS, AttentionMeta  # noqa: E402
from common.tiles import Device  # noqa: E402
from common.tolerances import assert_close  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402
from jax_impl import plain  # noqa: E402
from jax_impl.arrays import weight_shape  # noqa: E402

H100 = Device("NVIDIA H100 80GB HBM3", 132, 227 * 1024, (9, 0))  # a device description: nothing runs on it
HQ, HKV, D, HIDDEN, INTER, VOCAB = 4, 2, 32, 128, 256, 384  # K and N whole fp8 blocks of 128
EPS = 1e-6
FORMATS = ("bf16", "int8", "fp8")


pytestmark = pytest.mark.usefixtures("fresh_tiles")  # no user table; the lookup's cache cleared


def _on(monkeypatch, device):
    """The device the plain path's lookup reads (the arrays stay on the CPU)."""
    if device is not None:
        monkeypatch.setattr(plain, "device_info", lambda: device, raising=False)


def _weight(rng, n, k, fmt):
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    if fmt == "bf16":
        return jnp.asarray(w)
    q, s = formats.quantize(w, fmt)
    return formats.QWeight(jnp.asarray(q), jnp.asarray(s, jnp.float32), fmt)


def _problem(fmt, seed=0):
    """One token's arguments of the three projection ops and the head, float32 arrays."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, HIDDEN)).astype(np.float32))
    return dict(
        x=x, norm_w=jnp.asarray(1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32)),
        w_qkv=_weight(rng, (HQ + 2 * HKV) * D, HIDDEN, fmt), w_gate_up=_weight(rng, 2 * INTER, HIDDEN, fmt),
        w_down=_weight(rng, HIDDEN, INTER, fmt), w_o=_weight(rng, HIDDEN, HQ * D, fmt),
        head=_weight(rng, VOCAB, HIDDEN, fmt),
        qn=jnp.asarray(1 + 0.1 * rng.standard_normal(D).astype(np.float32)),
        kn=jnp.asarray(1 + 0.1 * rng.standard_normal(D).astype(np.float32)),
        attn=jnp.asarray(rng.standard_normal((1, HQ * D)).astype(np.float32)),
    )


def _calls(p, dtype):
    """name -> (function of no arguments, what common.reference says it returns)."""
    c = {k: v if isinstance(v, formats.QWeight) else v.astype(dtype) for k, v in p.items()}  # scales stay float32
    cos_sin = plain.rope_table(16, D, 1e6)
    cache = jnp.zeros((1, 8, HKV, D), dtype)
    meta = AttentionMeta(positions=jnp.asarray([5], jnp.int32), slots=jnp.asarray([5], jnp.int32))

    def qkv():
        q, k_cache, v_cache = plain.rmsnorm_qkv(c["x"], c["norm_w"], c["w_qkv"], c["qn"], c["kn"], cos_sin, cache,
                                                cache, meta, num_heads=HQ, num_kv_heads=HKV, eps=EPS)
        return jnp.concatenate([q.reshape(-1), k_cache[0, 5].reshape(-1), v_cache[0, 5].reshape(-1)])

    ref_cache = np.zeros((1, 8, HKV, D))
    q, k_cache, v_cache = OPS["rmsnorm_qkv"].reference(
        p["x"], p["norm_w"], p["w_qkv"], p["qn"], p["kn"], R.rope_table(16, D, 1e6), ref_cache, ref_cache,
        AttentionMeta(positions=np.array([5]), slots=np.array([5])), num_heads=HQ, num_kv_heads=HKV, eps=EPS)
    return {
        "rmsnorm_qkv": (qkv, np.concatenate([np.ravel(q), np.ravel(k_cache[0, 5]), np.ravel(v_cache[0, 5])])),
        "mlp": (lambda: plain.mlp(c["x"], c["norm_w"], c["w_gate_up"], c["w_down"], c["x"], eps=EPS),
                OPS["mlp"].reference(p["x"], p["norm_w"], p["w_gate_up"], p["w_down"], p["x"], eps=EPS)),
        "linear_residual": (lambda: plain.linear_residual(c["attn"], c["w_o"], c["x"]),
                            OPS["linear_residual"].reference(p["attn"], p["w_o"], p["x"])),
        "head": (lambda: plain.matmul_f32(c["x"], c["head"]),
                 OPS["linear_residual"].reference(p["x"], p["head"], None)),
    }


PROJECTIONS = {"rmsnorm_qkv": 1, "mlp": 2, "linear_residual": 1, "head": 1}  # weight products per call


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, custom calls) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from _eqns(getattr(sub, "jaxpr", sub))


def _forms(jaxpr, weight_shapes) -> tuple[int, int]:
    """(dot_general equations, reduce_sum equations over a [1, N, K] product with a weight's [N, K]):
    the dot form and the multiply-and-reduce form of the projections."""
    eqns = list(_eqns(jaxpr))
    dots = sum(e.primitive.name == "dot_general" for e in eqns)
    reductions = sum(e.primitive.name == "reduce_sum" and tuple(e.invars[0].aval.shape[1:]) in weight_shapes
                     for e in eqns)
    return dots, reductions


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device, form", [(None, "dot"), (H100, "reduce")], ids=["this-cpu", "h100-description"])
def test_one_token_projection_form_by_structure(monkeypatch, device, form, fmt):
    """On the CPU backend each one-token projection (qkv, gate/up, down, o_proj, the head) is a
    dot_general with no [1, N, K] reduction; for a CUDA GPU's description the lookup keeps
    multiply-and-reduce, one reduction per weight and no dot."""
    _on(monkeypatch, device)
    p = _problem(fmt)
    weight_shapes = {tuple(weight_shape(p[k])) for k in ("w_qkv", "w_gate_up", "w_down", "w_o", "head")}
    for name, (fn, _) in _calls(p, jnp.bfloat16).items():
        dots, reductions = _forms(jax.make_jaxpr(fn)().jaxpr, weight_shapes)
        want = (PROJECTIONS[name], 0) if form == "dot" else (0, PROJECTIONS[name])
        assert (dots, reductions) == want, \
            f"{name} ({fmt}, {form}): {dots} dot_general, {reductions} [1, N, K] reductions"
    assert plain.one_token_form("linear_residual", p["x"], p["head"]) == form


def test_the_cpu_lowering_holds_the_dot():
    """What XLA receives on this CPU for the head's one-token product: a dot, no reduce."""
    x, w = jnp.zeros((1, HIDDEN), jnp.bfloat16), jnp.zeros((VOCAB, HIDDEN), jnp.bfloat16)
    text = jax.jit(plain.matmul_f32).lower(x, w).as_text()
    assert "dot_general" in text and "stablehlo.reduce" not in text, text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", [None, H100], ids=["dot (this cpu)", "reduce (h100 description)"])
def test_both_forms_match_the_reference(monkeypatch, device, fmt, dtype):
    """Either form's one-token results agree with common.reference within the tolerance table."""
    _on(monkeypatch, device)
    for name, (fn, want) in _calls(_problem(fmt, seed=1), getattr(jnp, dtype)).items():
        got = np.asarray(jnp.asarray(fn()).astype(jnp.float32)).reshape(np.shape(want))
        assert_close(got, want, dtype, what=f"{name} ({fmt}, {'reduce' if device else 'dot'})")
