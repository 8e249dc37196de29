"""common.weights: sharded and unsharded loading, the packing plan, and one clear error for each
bad checkpoint (raised by Checkpoint, before any model is built)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from common.config import ConfigError, Qwen3Config, shrink
from common.checkpoint import random_weights, write_checkpoint
from common.harness import load_reference
from common.weights import (GLOBAL_PLAN, INDEX_FILE, LAYER_PLAN, SINGLE_FILE, Checkpoint, WeightsError,
                            expected_shapes)

UNTIED = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-8B"), layers=2, width=16, vocab=300),
                             dtype="float32")
TIED = dataclasses.replace(UNTIED, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    w = random_weights(UNTIED, seed=1, norm_scale="realistic")
    return {
        "single": write_checkpoint(root / "single", UNTIED, w),
        "sharded": write_checkpoint(root / "sharded", UNTIED, w, shards=3),
        "tied": write_checkpoint(root / "tied", TIED, seed=2),
        "weights": w,
    }


def test_sharded_and_unsharded_give_identical_tensors(ckpts):
    single, sharded = Checkpoint(ckpts["single"]), Checkpoint(ckpts["sharded"])
    assert len(sharded.files) == 3 and len(single.files) == 1
    a, b = single.read_all(), sharded.read_all()
    assert set(a) == set(b) == set(expected_shapes(UNTIED))
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_equal(a[name], ckpts["weights"][name], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_loads(tmp_path, dtype):
    d = write_checkpoint(tmp_path, UNTIED, seed=3, dtype=dtype)
    ck = Checkpoint(d)
    assert {i.dtype for i in ck.tensors.values()} == {"BF16" if dtype == "bfloat16" else "F16"}
    assert ck.config.dtype == dtype


# ----- the packing plan --------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["single", "tied"])
def test_iter_params_packs_in_plan_order(ckpts, which):
    ck = Checkpoint(ckpts[which])
    cfg, raw = ck.config, ck.read_all()
    got = list(ck.iter_params("numpy", concat=lambda parts: np.concatenate(parts, axis=0)))
    want_keys = [(None, k) for k in GLOBAL_PLAN if not (k == "lm_head" and cfg.tie_word_embeddings)]
    want_keys += [(i, k) for i in range(cfg.num_hidden_layers) for k in LAYER_PLAN]
    assert [(i, k) for i, k, _ in got] == want_keys
    assert ("lm_head" in [k for _, k, _ in got]) == (not cfg.tie_word_embeddings)
    params = {(i, k): v for i, k, v in got}
    h, inter = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv, gu = params[i, "w_qkv"], params[i, "w_gate_up"]
        assert qkv.shape == (cfg.qkv_size, h) and gu.shape == (2 * inter, h)
        np.testing.assert_array_equal(qkv[:cfg.q_size], raw[p + "self_attn.q_proj.weight"])
        np.testing.assert_array_equal(qkv[cfg.q_size:cfg.q_size + cfg.kv_size], raw[p + "self_attn.k_proj.weight"])
        np.testing.assert_array_equal(qkv[cfg.q_size + cfg.kv_size:], raw[p + "self_attn.v_proj.weight"])
        np.testing.assert_array_equal(gu[:inter], raw[p + "mlp.gate_proj.weight"])
        np.testing.assert_array_equal(gu[inter:], raw[p + "mlp.up_proj.weight"])
        np.testing.assert_array_equal(params[i, "w_down"], raw[p + "mlp.down_proj.weight"])
        np.testing.assert_array_equal(params[i, "w_o"], raw[p + "self_attn.o_proj.weight"])


def test_iter_params_through_torch_reader(ckpts):
    torch = pytest.importorskip("torch")
    ck = Checkpoint(ckpts["single"])
    seen = 0
    for i, key, arr in ck.iter_params("pt", concat=lambda parts: torch.cat(parts, 0),
                                      convert=lambda t: t.to(torch.float64)):
        assert isinstance(arr, torch.Tensor) and arr.dtype == torch.float64
        if key == "w_qkv":
            ref = np.concatenate([ck.read(f"model.layers.{i}.self_attn.{n}_proj.weight") for n in "qkv"])
            np.testing.assert_array_equal(arr.numpy(), ref)
            seen += 1
    assert seen == UNTIED.num_hidden_layers


# ----- bad input ---------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, edit):
    """Apply edit(dict of tensors) to model.safetensors in place."""
    tensors = load_file(str(d / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(d / SINGLE_FILE), metadata={"format": "pt"})


def _set_config(d, **over):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d):
    path = d / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _corrupt_header(d):
    path = d / SINGLE_FILE
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # header JSON starts at byte 8
    path.write_bytes(bytes(data))


def _huge_header_length(d):
    path = d / SINGLE_FILE
    data = bytearray(path.read_bytes())
    data[:8] = (10 ** 12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _pickle_only(d):
    (d / SINGLE_FILE).unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")


LAYER1_UP = "model.layers.1.mlp.up_proj.weight"
BAD = {
    "missing config.json": ("single", lambda d: (d / "config.json").unlink(), ConfigError, ["config.json", "missing"]),
    "config fails validation": ("single", lambda d: _set_config(d, num_key_value_heads=3), ConfigError,
                                ["config.json", "num_key_value_heads=3"]),
    "not qwen3": ("single", lambda d: _set_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
                  ConfigError, ["config.json", "model_type='llama'"]),
    "missing tensor": ("single", lambda d: _rewrite(d, lambda t: t.pop(LAYER1_UP)), WeightsError,
                       [f"missing tensor '{LAYER1_UP}'", "expected shape"]),
    "missing lm_head (untied)": ("single", lambda d: _rewrite(d, lambda t: t.pop("lm_head.weight")), WeightsError,
                                 ["missing tensor 'lm_head.weight'"]),
    "wrong shape": ("single", lambda d: _rewrite(d, lambda t: t.update({LAYER1_UP: t[LAYER1_UP][:, :-1].copy()})),
                    WeightsError, [SINGLE_FILE, f"tensor '{LAYER1_UP}' has shape", "expected ["]),
    "config disagrees with tensors": ("single", lambda d: _set_config(d, intermediate_size=UNTIED.intermediate_size + 2),
                                      WeightsError, ["has shape", "config.json"]),
    "unexpected extra tensor": ("single", lambda d: _rewrite(d, lambda t: t.update({"model.extra.bias": np.zeros(3, np.float32)})),
                                WeightsError, ["unexpected tensor", "model.extra.bias"]),
    "truncated file": ("single", _truncate, WeightsError, [SINGLE_FILE, "truncated"]),
    "corrupt header": ("single", _corrupt_header, WeightsError, [SINGLE_FILE, "corrupt"]),
    "header length beyond the file": ("single", _huge_header_length, WeightsError, [SINGLE_FILE, "corrupt or truncated"]),
    "empty file": ("single", lambda d: (d / SINGLE_FILE).write_bytes(b""), WeightsError, [SINGLE_FILE, "truncated"]),
    "index names a missing shard": ("sharded", lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
                                    WeightsError, [INDEX_FILE, "model-00002-of-00003.safetensors", "does not exist"]),
    "index without weight_map": ("sharded", lambda d: (d / INDEX_FILE).write_text("{}"), WeightsError,
                                 [INDEX_FILE, "not a valid shard index", "weight_map"]),
    "index not JSON": ("sharded", lambda d: (d / INDEX_FILE).write_text("{oops"), WeightsError,
                       [INDEX_FILE, "invalid JSON"]),
    "non-float dtype": ("single", lambda d: _rewrite(d, lambda t: t.update({LAYER1_UP: t[LAYER1_UP].astype(np.int32)})),
                        WeightsError, [f"tensor '{LAYER1_UP}' has dtype I32", "floating"]),
    "pickle-only directory": ("single", _pickle_only, WeightsError, ["pickle", "never loaded"]),
    "no weights at all": ("single", lambda d: (d / SINGLE_FILE).unlink(), WeightsError, ["no model.safetensors"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_gives_one_clear_error(ckpts, tmp_path, case):
    src, mutate, exc, needles = BAD[case]
    d = _copy(ckpts[src], tmp_path / "ckpt")
    mutate(d)
    with pytest.raises(exc) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert type(e.value) in (ConfigError, WeightsError), type(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert str(d) in msg, msg  # names the file or directory
    # The runners validate through the same path, so they fail the same way before building anything.
    with pytest.raises(exc, match="."):
        load_reference(d)


def _wrong_shape_cases():
    """(tensor name, axis): every tensor of the untied config, per-layer ones in both layers, one
    short along each of its axes."""
    return [(name, axis) for name, shape in expected_shapes(UNTIED).items() for axis in range(len(shape))]


@pytest.mark.parametrize("name, axis", _wrong_shape_cases(), ids=lambda v: str(v).removeprefix("model."))
def test_every_tensor_of_a_wrong_shape_is_refused(ckpts, tmp_path, name, axis):
    """Validation covers every tensor: any one of them with a shape off by one along any axis is
    refused by Checkpoint with a WeightsError naming the tensor, its file and both shapes."""
    d = _copy(ckpts["single"], tmp_path / "ckpt")
    want = expected_shapes(UNTIED)[name]

    def shrink_one(t):
        t[name] = np.ascontiguousarray(np.delete(t[name], -1, axis=axis))

    _rewrite(d, shrink_one)
    bad = list(want)
    bad[axis] -= 1
    with pytest.raises(WeightsError) as e:
        Checkpoint(d)
    msg = str(e.value)
    for needle in (str(d / SINGLE_FILE), f"tensor '{name}' has shape {bad}", f"expected {list(want)}"):
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_extra_tensor_is_a_warning_when_not_strict(ckpts, tmp_path, caplog):
    d = _copy(ckpts["single"], tmp_path / "ckpt")
    _rewrite(d, lambda t: t.update({"model.extra.bias": np.zeros(3, np.float32)}))
    with caplog.at_level(logging.WARNING, logger="common.weights"):
        Checkpoint(d, strict=False)
    assert "model.extra.bias" in caplog.text


def test_tied_checkpoint_may_still_store_lm_head(ckpts, tmp_path):
    d = _copy(ckpts["tied"], tmp_path / "ckpt")
    _rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    ck = Checkpoint(d)
    assert "lm_head" not in [k for _, k, _ in ck.iter_params("numpy", concat=np.concatenate)]


def test_tensor_in_two_shards(ckpts, tmp_path):
    d = _copy(ckpts["sharded"], tmp_path / "ckpt")
    shard1 = d / "model-00001-of-00003.safetensors"
    first = load_file(str(shard1))
    name = next(iter(first))
    shard3 = d / "model-00003-of-00003.safetensors"
    third = load_file(str(shard3))
    third[name] = first[name]
    save_file(third, str(shard3))
    with pytest.raises(WeightsError, match=f"tensor '{name}' is also in"):
        Checkpoint(d)


# ----- checkpoints written by transformers itself -----------------------------------------------

@pytest.mark.parametrize("tied, shard", [(False, None), (False, "100KB"), (True, "100KB"), (True, None)])
def test_transformers_save_pretrained_loads_and_matches(tmp_path, tied, shard):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen3Config(vocab_size=333, hidden_size=64, intermediate_size=97, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=tied, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # realistic scales: q/k-norm weights of tens, layer norms near 1
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(1.0, 30.0)
            elif "norm" in name:
                p.uniform_(0.5, 2.0)
            else:
                p.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    ck = Checkpoint(tmp_path)
    assert (len(ck.files) > 1) == bool(shard)
    assert ck.config.tie_word_embeddings == tied and ck.config.intermediate_size == 97
    ids = np.random.default_rng(0).integers(0, 333, size=(2, 11))
    with torch.no_grad():
        want = model.double()(torch.as_tensor(ids)).logits.numpy()
    got = load_reference(tmp_path).logits(ids)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


# ----- non-finite values: one error naming the file and the tensor, in both twins -------------------

def _load_twin(twin: str, d, **kw):
    if twin == "jax":
        pytest.importorskip("jax")
        import jax_impl

        return jax_impl.load(d, dtype="float32", fused=False, compile_cache=False, **kw)
    pytest.importorskip("torch")
    import torch_impl

    return torch_impl.load(d, dtype="float32", fused=False, **kw)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, ckpts):
    """{tensor name: checkpoint directory (3 shards) where that tensor holds a NaN or an inf}."""
    out = {}
    for i, (name, value) in enumerate([("model.layers.1.self_attn.k_proj.weight", np.nan),  # packed into qkv
                                       ("model.embed_tokens.weight", np.nan),
                                       ("model.norm.weight", np.inf),
                                       ("model.layers.0.mlp.down_proj.weight", -np.inf)]):
        d = shutil.copytree(ckpts["sharded"], tmp_path_factory.mktemp("nan") / f"c{i}")
        for f in sorted(d.glob("*.safetensors")):
            tensors = load_file(f)
            if name in tensors:
                tensors[name] = tensors[name].copy()
                tensors[name].flat[7] = value
                save_file(tensors, f)
                out[name] = (d, f)
    return out


@pytest.mark.parametrize("twin", ["jax", "torch"])
@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.embed_tokens.weight",
                                  "model.norm.weight", "model.layers.0.mlp.down_proj.weight"])
def test_non_finite_weights_are_named(poisoned, twin, name):
    d, f = poisoned[name]
    with pytest.raises(WeightsError) as e:
        _load_twin(twin, d)
    assert str(e.value).startswith(f"{f}: tensor {name!r} has 1 non-finite value(s) (NaN or inf; the first at ")


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_non_finite_weights_are_named_when_quantized(poisoned, twin):
    name = "model.layers.0.mlp.down_proj.weight"
    d, f = poisoned[name]
    with pytest.raises(WeightsError, match=f"tensor {name!r} has 1 non-finite value"):
        _load_twin(twin, d, quantization="int8")
