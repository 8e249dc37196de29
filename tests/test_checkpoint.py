"""common.checkpoint: random Hugging Face layout checkpoints (plain, sharded, low precision,
realistic norm scales, with a tokenizer) that common.weights and transformers both read."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from common import checkpoint
from common.checkpoint import iter_random_weights, random_weights, write_checkpoint, write_tokenizer
from common.config import Qwen3Config, shrink
from common.weights import INDEX_FILE, SINGLE_FILE, Checkpoint, expected_shapes

CFG = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-1.7B"), layers=2, width=16, vocab=512), dtype="float32")


def test_writes_a_complete_directory(tmp_path):
    w = random_weights(CFG, seed=4)
    d = write_checkpoint(tmp_path / "m", CFG, w)
    assert {p.name for p in d.iterdir()} == {"config.json", "generation_config.json", SINGLE_FILE}
    ck = Checkpoint(d)
    assert ck.config == CFG
    for name, arr in ck.read_all().items():
        np.testing.assert_array_equal(arr, w[name], err_msg=name)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen == {"eos_token_id": None, "do_sample": False}


def test_random_weights_are_seeded_and_stream():
    gen = iter_random_weights(CFG, seed=1)
    assert inspect.isgenerator(gen)
    names = [n for n, _ in gen]
    assert names == list(expected_shapes(CFG))
    a, b, c = random_weights(CFG, seed=1), random_weights(CFG, seed=1), random_weights(CFG, seed=2)
    name = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])
    assert all(v.dtype == np.float32 and v.shape == expected_shapes(CFG)[k] for k, v in a.items())


def test_norm_scales_and_embed_std():
    unit = random_weights(CFG, seed=0)
    real = random_weights(CFG, seed=0, norm_scale="realistic", embed_std=1.0)
    k_norm, q_norm = "model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.q_norm.weight"
    assert np.abs(unit[k_norm] - 1).max() < 0.6
    assert real[k_norm].max() == 96.0 and real[q_norm].max() == 60.0  # tens, as real Qwen3
    assert real[k_norm].min() >= 1.0
    ln = real["model.layers.0.input_layernorm.weight"]
    assert 0.3 <= ln.min() and ln.max() <= 3.0
    assert real["model.embed_tokens.weight"].std() == pytest.approx(1.0, rel=0.05)
    assert real["model.layers.0.mlp.up_proj.weight"].std() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="norm_scale='huge'"):
        random_weights(CFG, norm_scale="huge")


@pytest.mark.parametrize("shards", [2, 5])
def test_sharded_layout(tmp_path, shards):
    d = write_checkpoint(tmp_path / "m", CFG, seed=3, shards=shards)
    index = json.loads((d / INDEX_FILE).read_text())
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert not (d / SINGLE_FILE).exists()
    assert set(index["weight_map"]) == set(expected_shapes(CFG))
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == 4 * sum(int(np.prod(s)) for s in expected_shapes(CFG).values())
    single = Checkpoint(write_checkpoint(tmp_path / "one", CFG, seed=3)).read_all()
    for name, arr in Checkpoint(d).read_all().items():
        np.testing.assert_array_equal(arr, single[name])


@pytest.mark.parametrize("dtype, st", [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_storage_dtype(tmp_path, dtype, st):
    import ml_dtypes

    w = random_weights(CFG, seed=5)
    d = write_checkpoint(tmp_path / "m", CFG, w, dtype=dtype)
    ck = Checkpoint(d)
    assert {i.dtype for i in ck.tensors.values()} == {st}
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype
    assert ck.config.dtype == dtype
    name = "model.layers.0.mlp.down_proj.weight"
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    got = np.asarray(ck.read(name), dtype=np.float32)
    np.testing.assert_array_equal(got, w[name].astype(np_dtype).astype(np.float32))


def test_tokenizer(tmp_path):
    d = write_checkpoint(tmp_path / "m", CFG, seed=0, tokenizer=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == eos
    assert tok.get_vocab_size() <= CFG.vocab_size
    text = "Qwen3 décode: 12 tokens/s €"
    ids = tok.encode(text).ids
    assert max(ids) < CFG.vocab_size and tok.decode(ids) == text
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and "add_generation_prompt" in tcfg["chat_template"]
    with pytest.raises(ValueError, match="vocab_size=200"):
        write_tokenizer(tmp_path / "small", 200)


def test_transformers_reads_the_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_checkpoint(tmp_path / "m", CFG, seed=0, tokenizer=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert hf_tok("The quick brown fox")["input_ids"] == tok.encode("The quick brown fox").ids
    assert hf_tok.eos_token == "<|im_end|>"


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Qwen3Config, "preset", classmethod(lambda cls, name: dataclasses.replace(CFG, dtype="bfloat16")))
    checkpoint.main([str(tmp_path / "m"), "--preset", "Qwen3-1.7B", "--layers", "1", "--shards", "2",
                     "--realistic-norms", "--tokenizer", "--seed", "3"])
    assert "wrote" in capsys.readouterr().out
    ck = Checkpoint(tmp_path / "m")
    assert ck.config.num_hidden_layers == 1 and ck.config.dtype == "bfloat16" and len(ck.files) == 2
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert np.asarray(ck.read("model.layers.0.self_attn.k_norm.weight"), np.float32).max() == 96.0


def _tiny_presets(monkeypatch):
    """Every preset name gives CFG (2 layers), so the command line writes a small checkpoint."""
    monkeypatch.setattr(Qwen3Config, "preset", classmethod(lambda cls, name: CFG))


@pytest.mark.parametrize("argv, needles", [
    (["--preset", "Qwen3-7B"], ["argument --preset", "'Qwen3-7B'", "Qwen3-0.6B", "Qwen3-32B"]),
    (["--layers", "-2"], ["argument --layers: -2:", "expected 1 to 2"]),
    (["--layers", "0"], ["argument --layers: 0:", "expected 1 to 2"]),  # not "all layers": N means N
    (["--layers", "3"], ["argument --layers: 3:", "expected 1 to 2"]),
    (["--shards", "0"], ["argument --shards", "got 0"]),
    (["--shards", "99"], ["argument --shards: 99:", "expected 1 to 24"]),
])
def test_command_line_refuses_bad_values(tmp_path, monkeypatch, capsys, argv, needles):
    _tiny_presets(monkeypatch)
    with pytest.raises(SystemExit) as e:
        checkpoint.main([str(tmp_path / "m"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "m").exists()


def test_command_line_never_overwrites(tmp_path, monkeypatch, capsys):
    _tiny_presets(monkeypatch)
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out, needle in [(full, "not empty"), (a_file, "a file of that name exists"),
                        (a_file / "sub", "cannot write")]:
        assert checkpoint.main([str(out), "--layers", "1"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {out}: ") and needle in err, err
    assert (full / "config.json").read_text() == "mine" and [p.name for p in full.iterdir()] == ["config.json"]
    assert a_file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint.main([str(empty), "--layers", "1"]) == 0  # an empty directory is fine
    assert Checkpoint(empty).config.num_hidden_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "full"]  # no partial directory left


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    import safetensors.numpy

    _tiny_presets(monkeypatch)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.main([str(tmp_path / "m"), "--layers", "1"])
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint (config.json, no weights) nor a partial one
