"""Weight formats (common.formats) and quantized checkpoints (common.weights, common.checkpoint):
int8 per channel and fp8 128x128 blocks, Qwen's FP8 layout validated and read, the reference on it
against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import formats
from common.checkpoint import write_checkpoint
from common.config import Qwen3Config
from common.harness import load_reference
from common.weights import SCALE_SUFFIX, Checkpoint, WeightsError, layer_prefix

# every size a multiple of 128, as real Qwen3's (transformers infers the fp8 block from shapes)
CFG = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, dtype="bfloat16", max_position_embeddings=512)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("fp8") / "ck", CFG, seed=1, stored_format="fp8")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bf16") / "ck", CFG, seed=1)


def test_int8_round_trip_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 300)) * rng.uniform(0.01, 10, size=(37, 1))  # rows of very different scales
    q, s = formats.get("int8").quantize(w)
    assert q.dtype == np.int8 and s.shape == (37,) and q.min() >= -127
    err = np.abs(formats.dequantize(q, s, "int8") - w)
    assert np.all(err <= s[:, None] / 2 + 1e-6 * np.abs(w))  # half a step of its own row at most
    assert np.all(np.abs(q).max(axis=1) == 127)  # each row's largest value uses the whole range


def test_fp8_round_trip_in_blocks():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((200, 300)).astype(np.float32)
    w[:128, :128] *= 1000  # one block far larger: the others keep their own scale
    q, s = formats.get("fp8").quantize(w)
    assert q.dtype == formats.get("fp8").storage and s.shape == (2, 3)
    back = formats.dequantize(q, s, "fp8")
    rel = np.abs(back - w) / np.maximum(np.abs(w), 1e-3)
    assert np.median(rel) < 0.05 and np.isfinite(back).all()
    big = np.float32(3000.0)
    q, s = formats.get("fp8").quantize(np.full((4, 4), big))  # clamped before the cast: no NaN past 464
    assert np.isfinite(formats.dequantize(q, s, "fp8")).all()


@pytest.mark.parametrize("cfg, needle", [
    ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt='e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size=[64, 64]"),
    ("fp8", "expected an object"),
])
def test_bad_quantization_config_is_one_error(fp8_dir, tmp_path, cfg, needle):
    import shutil

    d = shutil.copytree(fp8_dir, tmp_path / "c")
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = cfg
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightsError, match="quantization_config") as e:
        Checkpoint(d)
    assert needle in str(e.value) and str(d / "config.json") in str(e.value)


def test_fp8_checkpoint_validates_and_reads(fp8_dir):
    ck = Checkpoint(fp8_dir)
    assert ck.stored_format.name == "fp8" and ck.weight_format() == "fp8" and ck.weight_format("fp8") == "fp8"
    name = layer_prefix(1) + "mlp.down_proj.weight"
    assert ck.tensors[name].dtype == "F8_E4M3" and ck.tensors[name + SCALE_SUFFIX].shape == (2, 3)
    assert ck.read(name).dtype == formats.get("fp8").storage
    with pytest.raises(WeightsError, match="quantized already"):
        ck.weight_format("int8")
    with pytest.raises(WeightsError, match="quantization='int4'"):
        ck.weight_format("int4")


SCALE_DTYPES = {"float32": ("F32", 0.0), "float16": ("F16", 2.0 ** -11), "bfloat16": ("BF16", 2.0 ** -8)}  # stored
# dtype, and a scale's relative rounding in it (round to nearest: half of 2^-10 and 2^-7)


@pytest.fixture(scope="module")
def fp8_scale_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-scales")
    return {dt: write_checkpoint(root / dt, CFG, seed=1, stored_format="fp8", scale_dtype=dt) for dt in SCALE_DTYPES}


def test_fp8_block_scales_in_any_float_dtype_load_alike(fp8_scale_dirs):
    """FP8 checkpoints whose weight_scale_inv is float32 (Qwen's), float16 or bfloat16 (other exports):
    each loads its scales as float32 equal to the stored values, the packed projections dequantize to
    the reference's weights (read_dense), and those are the float32-scale checkpoint's within the
    scale dtype's rounding (the e4m3 values are the same bytes)."""
    names = [layer_prefix(i) + f"{m}.{p}_proj.weight" for i in range(CFG.num_hidden_layers)
             for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps]
    dense, values = {}, {}
    for dt, d in fp8_scale_dirs.items():
        ck = Checkpoint(d)
        stored, _ = SCALE_DTYPES[dt]
        assert all(ck.tensors[n + SCALE_SUFFIX].dtype == stored for n in names), dt
        got = {(layer, key): v for layer, key, v in ck.iter_params("numpy", np.concatenate)}
        w = got[(0, "w_qkv")]
        assert w.fmt == "fp8" and w.scale.dtype == np.float32, (dt, w.scale.dtype)
        sources = [layer_prefix(0) + f"self_attn.{p}_proj.weight" for p in "qkv"]
        want_scale = np.concatenate([np.asarray(ck.read(n + SCALE_SUFFIX), np.float32) for n in sources])
        np.testing.assert_array_equal(w.scale, want_scale, err_msg=f"{dt}: scales as loaded")
        np.testing.assert_array_equal(formats.dequantize(w.q, w.scale, "fp8"),
                                      np.concatenate([ck.read_dense(n) for n in sources]), err_msg=dt)
        ref = load_reference(d).weights
        dense[dt] = {n: np.asarray(ref[n], np.float64) for n in names}
        values[dt] = {n: ck.read(n).view(np.uint8) for n in names}
    for dt, (_, rounding) in SCALE_DTYPES.items():
        for n in names:
            np.testing.assert_array_equal(values[dt][n], values["float32"][n], err_msg=f"{dt}: {n} e4m3 bytes")
            a, b = dense[dt][n], dense["float32"][n]
            bad = np.abs(a - b) > rounding * np.abs(b) * (1 + 1e-6)
            assert not bad.any(), (f"{dt}: {n}: {bad.sum()} weights beyond the scale's rounding {rounding:g}, "
                                   f"first at {np.argwhere(bad)[0].tolist()}")
        if dt != "float32":  # the scales were rounded: the test would not see a loader that ignored them
            assert any(not np.array_equal(dense[dt][n], dense["float32"][n]) for n in names), dt


def _rewrite(src, dst, mutate):
    import shutil

    from safetensors.numpy import save_file

    d = shutil.copytree(src, dst)
    ck = Checkpoint(src)
    store = {n: ck.read(n) for n in ck.tensors}
    mutate(store)
    save_file(store, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.pop(layer_prefix(0) + "self_attn.k_proj.weight" + SCALE_SUFFIX), "block scales"),
    (lambda s: s.__setitem__(layer_prefix(0) + "self_attn.k_proj.weight" + SCALE_SUFFIX, np.ones((3, 2), np.float32)),
     "has shape [3, 2], expected [1, 2]"),
    (lambda s: s.__setitem__(layer_prefix(1) + "mlp.up_proj.weight", np.ones((384, 256), np.float32)),
     "expected F8_E4M3"),
])
def test_bad_fp8_tensors_are_named(fp8_dir, tmp_path, mutate, needle):
    d = _rewrite(fp8_dir, tmp_path / "bad", mutate)
    with pytest.raises(WeightsError) as e:
        Checkpoint(d)
    assert needle in str(e.value)


def test_quantized_params_follow_the_plan(bf16_dir, fp8_dir):
    for d, q in ((bf16_dir, "int8"), (bf16_dir, "fp8"), (fp8_dir, None)):
        ck = Checkpoint(d)
        got = {(layer, key): v for layer, key, v in ck.iter_params("numpy", np.concatenate, quantization=q)}
        w = got[(0, "w_qkv")]
        assert isinstance(w, formats.QWeight) and w.fmt == (q or "fp8") and w.q.shape == (CFG.qkv_size, 256)
        assert isinstance(got[(0, "q_norm")], np.ndarray) and isinstance(got[(None, "embed")], np.ndarray)
        dense = np.concatenate([ck.read_dense(layer_prefix(0) + f"self_attn.{p}_proj.weight") for p in "qkv"])
        back = formats.dequantize(w.q, w.scale, w.fmt)
        assert np.abs(back - dense).max() <= 0.07 * np.abs(dense).max()


def test_reference_on_fp8_equals_transformers(fp8_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers loads FP8 checkpoints on CPU only with it
    ref = load_reference(fp8_dir)
    model = transformers.Qwen3ForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.float32)
    ids = [[1, 2, 3, 4, 5]]
    want = model(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(ref.logits(ids), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("m", [2, 32])
def test_jax_plain_fp8_product_scales_the_activations_per_block(m):
    """jax_impl's plain product on fp8 weights of several tokens (the block path: each output block's
    K-blocks of x scaled by that block row's scales, then one batched product with the e4m3 values)
    is the product with the dequantized weight: float32 to the float64 reference's tolerance, bfloat16
    no further from it than the dequantize-first product."""
    jnp = pytest.importorskip("jax.numpy")
    from jax_impl import plain
    from jax_impl.arrays import dense

    rng = np.random.default_rng(m)
    n, k = 384, 256
    q, s = formats.quantize(rng.standard_normal((n, k)).astype(np.float32), "fp8")
    w = formats.QWeight(jnp.asarray(q), jnp.asarray(s), "fp8")
    x = rng.standard_normal((m, k))
    want = x @ formats.dequantize(q, s, "fp8", np.float64).T
    got = np.asarray(plain.matmul_f32(jnp.asarray(x, jnp.float32), w))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    xb = jnp.asarray(x, jnp.bfloat16)
    bf = np.abs(np.asarray(plain.matmul_f32(xb, w)) - want).max()
    first = np.abs(np.asarray(jnp.dot(xb, dense(w, jnp.bfloat16).T, preferred_element_type=jnp.float32)) - want).max()
    assert bf <= 2 * first, f"block path error {bf} against the dequantize-first product's {first}"
