"""Every Pallas kernel lowers through Triton for CUDA, on CPU, at the real shapes of all six presets.

`jax.jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=("cuda",))` runs the real
Pallas -> Triton IR lowering without a GPU (jaxlib's CPU wheel suffices): it rejects
non-power-of-two blocks, unsupported primitives and bad dot shapes, which interpreter mode
accepts. Shared-memory limits and Triton's own compilation happen only on a GPU.
Sizes: decode batches of 1 and 16 tokens and a prefill-sized batch of 512 tokens.
"""

from __future__ import annotations

import functools

import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from common.config import PRESETS  # noqa: E402
from common.ops import AttentionMeta  # noqa: E402
from jax_impl import kernels as K  # noqa: E402

S = jax.ShapeDtypeStruct
BF16, I32 = jnp.bfloat16, jnp.int32
TOKENS = (1, 16, 512)
TRITON_CALL = "__gpu$xla.gpu.triton"
CACHE_ROWS = 1152  # one cache block per sequence, as jax_impl.model lays the cache out


def _lower(fn, *avals, **static):
    lowered = jax.jit(functools.partial(fn, interpret=False, **static)).trace(*avals).lower(
        lowering_platforms=("cuda",))
    return lowered.as_text()


def _ops(cfg, t):
    h, d, hq, hkv, i = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.intermediate_size)
    cache = S((max(t, 2), CACHE_ROWS, hkv, d), BF16)
    tok = AttentionMeta(positions=S((t,), I32), slots=S((t,), I32))
    cu = S((3,), I32)  # two prompts
    prefill = AttentionMeta(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=t, max_seqlen_k=t, is_prefill=True)
    return {
        "rmsnorm_qkv": (K.rmsnorm_qkv, (S((t, h), BF16), S((h,), BF16), S((cfg.qkv_size, h), BF16), S((d,), BF16),
                                        S((d,), BF16), S((cfg.max_position_embeddings, d), jnp.float32),
                                        cache, cache, tok),
                        dict(num_heads=hq, num_kv_heads=hkv, eps=cfg.rms_norm_eps)),
        "mlp": (K.mlp, (S((t, h), BF16), S((h,), BF16), S((2 * i, h), BF16), S((h, i), BF16), S((t, h), BF16)),
                dict(eps=cfg.rms_norm_eps)),
        "mlp (no residual)": (functools.partial(K.mlp, residual=None),
                              (S((t, h), BF16), S((h,), BF16), S((2 * i, h), BF16), S((h, i), BF16)),
                              dict(eps=cfg.rms_norm_eps)),
        "linear_residual": (K.linear_residual, (S((t, cfg.q_size), BF16), S((h, cfg.q_size), BF16),
                                                S((t, h), BF16)), {}),
        # decode attention has one query per sequence: t sequences (512 = a large decode batch)
        "decode_attention": (K.decode_attention, (S((t, hq, d), BF16), cache, cache,
                                                  AttentionMeta(context_lens=S((t,), I32),
                                                                block_tables=S((t, 1), I32))), {}),
        # the model's layout: sequence b owns cache block b, no block table
        "decode_attention (unpaged)": (K.decode_attention, (S((t, hq, d), BF16), cache, cache,
                                                            AttentionMeta(context_lens=S((t,), I32))), {}),
        # prefill: t new tokens of two prompts, keys in block b (the model's layout) or through tables
        "prefill_attention": (K.prefill_attention, (S((t, hq, d), BF16), cache, cache, prefill), {}),
        "prefill_attention (paged)": (K.prefill_attention, (S((t, hq, d), BF16), cache, cache,
                                                            prefill.replace(block_tables=S((2, 4), I32))), {}),
        "rms_norm": (K.rms_norm, (S((t, h), BF16), S((h,), BF16)), dict(eps=cfg.rms_norm_eps)),
    }


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_kernels_lower_for_cuda(preset, tokens):
    cfg = PRESETS[preset]
    # kernels per op: decode QKV is the split variant (projection + epilogue), prefill QKV fused
    launches = {"rmsnorm_qkv": 2 if tokens <= 16 else 1, "mlp": 2, "mlp (no residual)": 2}
    for name, (fn, avals, static) in _ops(cfg, tokens).items():
        text = _lower(fn, *avals, **static)
        assert text.count(TRITON_CALL) == launches.get(name, 1), \
            f"{name} ({preset}, T={tokens}): {text.count(TRITON_CALL)} Triton custom calls in the lowered module"


def test_split_variants_lower_for_cuda():
    """The non-default tile choices lower too: split QKV, GEMV with several rows, flash-decoding."""
    from common.tiles import AttentionTiles, MatmulTiles, PrefillTiles

    cfg = PRESETS["Qwen3-8B"]
    ops = _ops(cfg, 4)
    fn, avals, static = ops["rmsnorm_qkv"]
    text = _lower(fn, *avals, **static, tiles=MatmulTiles(4, 16, 256))
    assert text.count(TRITON_CALL) == 2, "split rmsnorm_qkv: expected two Triton kernels"
    fn, avals, static = ops["mlp"]
    assert _lower(fn, *avals, **static, tiles=MatmulTiles(4, 8, 128)).count(TRITON_CALL) == 2
    fn, avals, static = ops["decode_attention"]
    assert TRITON_CALL in _lower(fn, *avals, tiles=AttentionTiles(block_kv=128, num_splits=16))
    fn, avals, _ = ops["prefill_attention (paged)"]  # a long prompt's candidate tiles
    assert TRITON_CALL in _lower(fn, *avals, tiles=PrefillTiles(128, 128, num_warps=8, num_stages=2))


def _qweight(shape, fmt):
    from common import formats
    from common.formats import QWeight

    f = formats.get(fmt)
    return QWeight(S(shape, jnp.dtype(f.storage)), S(f.scale_shape(shape), jnp.float32), fmt)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("preset", ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B"])
def test_quantized_projections_lower_for_cuda(preset, tokens, fmt):
    """The projections on int8 and fp8 weights (common.formats) lower at the default tiles and at
    chunks shorter and longer than a 128-column block."""
    from common.tiles import MatmulTiles

    cfg = PRESETS[preset]
    h, i = cfg.hidden_size, cfg.intermediate_size
    ops = _ops(cfg, tokens)
    quantized = {"rmsnorm_qkv": {2: (cfg.qkv_size, h)}, "mlp": {2: (2 * i, h), 3: (h, i)},
                 "linear_residual": {1: (h, cfg.q_size)}}
    m = 1 if tokens == 1 else 16
    for name, weights in quantized.items():
        fn, avals, static = ops[name]
        avals = tuple(_qweight(weights[j], fmt) if j in weights else a for j, a in enumerate(avals))
        for tiles in (None, MatmulTiles(m, 16, 64), MatmulTiles(m, 16 if m == 1 else 64, 256)):
            text = _lower(fn, *avals, **static, tiles=tiles)
            assert TRITON_CALL in text, f"{name} ({preset}, T={tokens}, {fmt}, tiles={tiles}): no Triton kernel"


def test_a_launch_is_lowered_once_per_program():
    """The same kernel launch in every layer: one Triton call in the module, called from each layer
    (jax_impl.kernels._lib.pallas_call jits each launch: a program is traced and lowered in a
    fraction of the time it took with a pallas_call per layer)."""
    cfg = PRESETS["Qwen3-0.6B"]

    def layers(x, w, r):
        for _ in range(4):
            r = K.linear_residual(x, w, r, interpret=False)
        return r

    text = jax.jit(layers).trace(S((1, cfg.q_size), BF16), S((cfg.hidden_size, cfg.q_size), BF16),
                                 S((1, cfg.hidden_size), BF16)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1
    assert text.count("call @linear_residual(") == 4
