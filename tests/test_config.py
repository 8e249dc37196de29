"""common.config: published presets, config.json parsing (old and new transformers spellings),
validation errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.config import PRESETS, ConfigError, Qwen3Config, shrink

# QWEN3.md's table: hidden, intermediate, layers, q heads, kv heads, tied, bf16 GB read per decode token.
PUBLISHED = {
    "Qwen3-0.6B": (1024, 3072, 28, 16, 8, True, 1.19),
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8, True, 3.44),
    "Qwen3-4B": (2560, 9728, 36, 32, 8, True, 8.05),
    "Qwen3-8B": (4096, 12288, 36, 32, 8, False, 15.1),
    "Qwen3-14B": (5120, 17408, 40, 40, 8, False, 28.0),
    "Qwen3-32B": (5120, 25600, 64, 64, 8, False, 64.0),
}
SHARED = dict(head_dim=128, vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960, dtype="bfloat16")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_equals_published_values(name):
    cfg = Qwen3Config.preset(name)
    hidden, inter, layers, heads, kv, tied, gb = PUBLISHED[name]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.tie_word_embeddings) == (hidden, inter, layers, heads, kv, tied)
    for key, value in SHARED.items():
        assert getattr(cfg, key) == value, key
    assert cfg.decode_bytes_per_token() / 1e9 == pytest.approx(gb, rel=5e-3)


def test_presets_are_exactly_the_six_dense_models():
    assert set(PRESETS) == set(PUBLISHED)
    with pytest.raises(ConfigError, match="unknown preset 'Qwen3-7B'"):
        Qwen3Config.preset("Qwen3-7B")


def test_head_dim_is_not_derived_from_hidden_size():
    cfg = Qwen3Config.preset("Qwen3-0.6B")
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.q_size, cfg.kv_size, cfg.qkv_size, cfg.group_size) == (2048, 1024, 4096, 2)


def test_config_is_frozen_and_replace_revalidates():
    cfg = Qwen3Config.preset("Qwen3-8B")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="num_key_value_heads=5"):
        dataclasses.replace(cfg, num_key_value_heads=5)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shrink_keeps_head_dim_gqa_ratio_and_tie_flag(name):
    cfg = Qwen3Config.preset(name)
    small = shrink(cfg, layers=2, width=8, vocab=1000)
    assert (small.head_dim, small.group_size, small.tie_word_embeddings) == (
        cfg.head_dim, cfg.group_size, cfg.tie_word_embeddings)
    assert small.num_hidden_layers == 2 and small.vocab_size == 1000
    assert small.hidden_size < cfg.hidden_size


# ----- config.json ------------------------------------------------------------------------------

def _write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def _hf_dict(**over):
    d = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
         "tie_word_embeddings": True, "torch_dtype": "float32"}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def test_round_trip_through_config_json(tmp_path):
    cfg = shrink(Qwen3Config.preset("Qwen3-14B"), vocab=1000)
    _write(tmp_path, cfg.to_hf_dict())
    assert Qwen3Config.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("spelling", [{"torch_dtype": "float16"}, {"dtype": "float16", "torch_dtype": None},
                                      {"dtype": "float16", "torch_dtype": "float16"}])
def test_accepts_torch_dtype_and_dtype(tmp_path, spelling):
    assert Qwen3Config.from_pretrained(_write(tmp_path, _hf_dict(**spelling))).dtype == "float16"


def test_transformers5_rope_parameters(tmp_path):
    d = _hf_dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert Qwen3Config.from_pretrained(_write(tmp_path, d)).rope_theta == 5e5
    d = _hf_dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        Qwen3Config.from_pretrained(_write(tmp_path, d))


def test_reads_transformers_own_config(tmp_path):
    from transformers import Qwen3Config as HFConfig

    hf = HFConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                  rope_theta=12345.0, max_position_embeddings=256, rms_norm_eps=1e-5)
    hf.save_pretrained(tmp_path)
    cfg = Qwen3Config.from_pretrained(tmp_path)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (1000, 64, 96, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.rms_norm_eps) == (12345.0, 256, 1e-5)
    assert cfg.tie_word_embeddings is False


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_non_positive_or_non_integer_sizes_name_the_field(field, value):
    base = Qwen3Config.preset("Qwen3-0.6B")
    with pytest.raises(ConfigError, match=rf"^{field}="):
        dataclasses.replace(base, **{field: value})


@pytest.mark.parametrize("over, needle", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6 must be divisible by num_key_value_heads=4"),
    (dict(head_dim=33), "head_dim=33: expected an even number"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings='yes'"),
])
def test_validation_names_the_field(over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        dataclasses.replace(Qwen3Config.preset("Qwen3-8B"), **over)


@pytest.mark.parametrize("over, needle", [
    (dict(model_type="llama"), "model_type='llama', expected 'qwen3'"),
    (dict(architectures=["LlamaForCausalLM"]), "architectures=['LlamaForCausalLM']"),
    (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]), "model_type='qwen3_moe'"),
    (dict(model_type=None, architectures=None), "neither model_type nor architectures"),
    (dict(hidden_size=None), "missing field(s) hidden_size"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6 must be divisible"),
    (dict(head_dim=31), "head_dim=31"),
    (dict(hidden_size=-64), "hidden_size=-64"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_config_json_errors_name_file_and_field(tmp_path, over, needle):
    _write(tmp_path, _hf_dict(**over))
    with pytest.raises(ConfigError) as e:
        Qwen3Config.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert needle in str(e.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="missing config.json"):
        Qwen3Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        Qwen3Config.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("text, needle", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                          (b"\xff\xfe{", "not valid JSON")])
def test_invalid_json(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=needle) as e:
        Qwen3Config.from_pretrained(tmp_path)
    assert str(path) in str(e.value)
