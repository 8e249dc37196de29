"""Both twins' models on quantized weights: loaded with quantization="int8" / "fp8" from a bf16
checkpoint, or from an FP8 checkpoint as stored, against the reference on the same weights
(common.harness.load_reference(quantization=)), through nano-vllm's loader protocol, at random
weights, and their errors."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from common.checkpoint import write_checkpoint
from common.config import Qwen3Config
from common.fused import log_once
from common.harness import get_loader, load_reference
from common.formats import QuantError
from common.tolerances import assert_close
from common.weights import WeightsError

# every packed part a whole number of 128-row blocks (as in all Qwen3 sizes); hidden 192: a half block
CFG = Qwen3Config(vocab_size=256, hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, dtype="bfloat16", max_position_embeddings=512,
                  tie_word_embeddings=False)
IDS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
TWINS = ("jax", "torch")
# (checkpoint kind, quantization argument, expected format)
LOADS = [("bf16", "int8", "int8"), ("bf16", "fp8", "fp8"), ("fp8", None, "fp8")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-models")
    return {"bf16": write_checkpoint(root / "bf16", CFG, seed=5, norm_scale="realistic"),
            "fp8": write_checkpoint(root / "fp8", CFG, seed=5, norm_scale="realistic", stored_format="fp8"),
            "tied": write_checkpoint(root / "tied", dataclasses.replace(CFG, tie_word_embeddings=True), seed=6,
                                     norm_scale="realistic")}


def _load(twin: str, path, **kw):
    if twin == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("triton")
    else:
        pytest.importorskip("jax")
    return get_loader(twin)(str(path), **kw)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("kind,quantization,fmt", LOADS, ids=[f"{k}-{q}" for k, q, _ in LOADS])
@pytest.mark.parametrize("twin", TWINS)
def test_logits_and_greedy_match_the_reference(dirs, twin, kind, quantization, fmt, fused):
    ref = load_reference(dirs[kind], quantization=quantization)
    runner = _load(twin, dirs[kind], dtype="float32", fused=fused, quantization=quantization)
    assert runner.weight_format == fmt == ref.weight_format
    assert_close(runner.logits(IDS), ref.logits(IDS), "float32", what=f"{twin} {kind} {quantization} logits")
    assert runner.generate([IDS[0][:4]], 5) == ref.generate([IDS[0][:4]], 5)


def test_quantized_weights_are_what_the_reference_uses(dirs):
    """int8 of a bf16 checkpoint moves the logits (the test above would catch a model that ignored
    quantization=), by less than the weights' rounding."""
    plain, q8 = load_reference(dirs["bf16"]).logits(IDS), load_reference(dirs["bf16"], quantization="int8").logits(IDS)
    diff = np.abs(plain - q8).max()
    assert 1e-4 < diff < 0.05 * np.abs(plain).max()


def _head(runner):
    """The head's format: a QWeight's fmt (jax) or the LMHead's (torch), else "bf16"."""
    head = runner.model.lm_head
    if head is None:
        return "bf16"
    return getattr(head, "fmt", None) or getattr(head.get_value(), "fmt", "bf16")


@pytest.mark.parametrize("kind,quantization,head", [("bf16", "int8", "int8"), ("tied", "int8", "int8"),
                                                    ("bf16", "fp8", "bf16"), ("fp8", None, "bf16")])
@pytest.mark.parametrize("twin", TWINS)
def test_lm_head_format(dirs, twin, kind, quantization, head):
    """int8 quantizes the head too (a tied model's as a copy: the lookup keeps the float table), fp8
    keeps it in the model dtype as Qwen's FP8 checkpoints do; the reference multiplies by the same."""
    runner = _load(twin, dirs[kind], dtype="float32", fused=True, quantization=quantization)
    assert _head(runner) == head
    ref = load_reference(dirs[kind], quantization=quantization)
    assert_close(runner.logits(IDS), ref.logits(IDS), "float32", what=f"{twin} {kind} {quantization} logits")


@pytest.mark.parametrize("kind,quantization", [("bf16", "int8"), ("tied", "int8"), ("bf16", "fp8"), ("fp8", None)])
def test_nanovllm_loader_fills_quantized_projections(dirs, kind, quantization):
    """nano-vllm's loader loop (HF names, packed shards, weight_scale_inv) gives the model of load()."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    transformers = pytest.importorskip("transformers")
    from test_torch_nanovllm import nanovllm_load_model
    from torch_impl.model import Qwen3ForCausalLM

    hf_config = transformers.AutoConfig.from_pretrained(dirs[kind])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = Qwen3ForCausalLM(hf_config, use_fused_kernels=False, quantization=quantization)
    finally:
        torch.set_default_dtype(prev)
    nanovllm_load_model(model, str(dirs[kind]))
    runner = _load("torch", dirs[kind], dtype="float32", fused=False, quantization=quantization, device="cpu")
    assert model.weight_format == runner.weight_format
    for name, p in runner.model.named_parameters():
        got = model.get_parameter(name)
        assert got.dtype == p.dtype and torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                                                    p.view(torch.uint8) if p.element_size() == 1 else p), name


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("twin", TWINS)
def test_random_quantized_runners_generate(twin, fmt):
    if twin == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("triton")
        from torch_impl import load_random
    else:
        pytest.importorskip("jax")
        from jax_impl import load_random
    runner = load_random(CFG, dtype="float32", fused=True, quantization=fmt)
    assert runner.weight_format == fmt
    out = runner.generate([IDS[0]], 3)
    assert len(out[0]) == 3 and all(0 <= t < CFG.vocab_size for t in out[0])


@pytest.mark.parametrize("twin", TWINS)
def test_bad_quantization_is_one_error(dirs, twin):
    with pytest.raises(ValueError, match="quantization='int4'"):
        _load(twin, dirs["bf16"], quantization="int4")
    with pytest.raises(WeightsError, match="quantized already"):
        _load(twin, dirs["fp8"], quantization="int8")


def test_fp8_needs_whole_blocks(tmp_path):
    odd = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, dtype="bfloat16", max_position_embeddings=64)
    path = write_checkpoint(tmp_path / "odd", odd, seed=0)
    with pytest.raises(WeightsError, match="num_key_value_heads \\* head_dim=64 is not a multiple of 128"):
        load_reference(path, quantization="fp8")
    pytest.importorskip("jax")
    from jax_impl import load_random

    with pytest.raises(QuantError, match="intermediate_size=96"):
        load_random(dataclasses.replace(odd, num_key_value_heads=2), quantization="fp8")


def test_parity_harness_on_an_fp8_checkpoint(tmp_path):
    """transformers loading an FP8 checkpoint and both twins reading it agree (common.parity). Every
    size a multiple of 128 here: transformers infers the blocks from the shapes (with hidden 192 its
    logits are 0.9 away, relatively)."""
    for module in ("torch", "triton", "jax", "transformers", "accelerate"):
        pytest.importorskip(module)
    from common.parity import run_parity

    path = write_checkpoint(tmp_path / "fp8", dataclasses.replace(CFG, hidden_size=256), seed=2, stored_format="fp8",
                            norm_scale="realistic")
    report = run_parity(str(path), ["hf", "jax", "torch"], dtype="float32", baseline="reference",
                        reference_dtype="float64", prompt_len=12, batch=2, new_tokens=4, seed=0, progress=False)
    for row in report["rows"]:
        assert row["max_rel_err"] < 1e-4 and row["greedy_matched"] == row["greedy_total"], row


def _fake_gpu(monkeypatch, twin: str, cc: tuple[int, int]):
    """A CUDA GPU of compute capability `cc` as the twin sees it: its load-time capability query
    (ops.gpu_capability) and the properties its kernels' lookup and launchers read (_lib.device_info).
    The ops still run on the CPU (Pallas and Triton in their interpreters). Returns the twin's ops module."""
    from common.tiles import Device, smem_for

    fake = Device(f"fake sm{cc[0]}{cc[1]}", 108, smem_for(cc), cc)
    if twin == "jax":
        pytest.importorskip("jax")
        from jax_impl import ops
        from jax_impl.kernels import _lib
        monkeypatch.setattr(ops, "gpu_capability", lambda: cc)
        monkeypatch.setattr(_lib, "device_info", lambda: fake)
    else:
        pytest.importorskip("torch")
        pytest.importorskip("triton")
        from torch_impl import ops
        from torch_impl.kernels import _lib
        monkeypatch.setattr(ops, "gpu_capability", lambda device=None: cc)
        monkeypatch.setattr(_lib, "device_info", lambda device: fake)
    log_once.cache_clear()  # "logs once" counts from here
    return ops


@pytest.mark.parametrize("twin", TWINS)
def test_fp8_below_capability_8_9_refuses_fused_true_at_load(dirs, twin, monkeypatch, caplog):
    """fp8 weights on a GPU of compute capability 8.0 (an A100: no e4m3 conversion in its kernels'
    compiler): fused=True is one error at load naming the flag, the format and the capability, not
    a kernel's error at the first generate; fused='auto' loads, logs the fallback once, and its fp8
    projections run plain (the kernels' own check would raise otherwise) to the reference's logits;
    int8 weights with fused=True still load there."""
    ops = _fake_gpu(monkeypatch, twin, (8, 0))
    with pytest.raises(ops.FusedUnavailable) as e:
        _load(twin, dirs["fp8"], dtype="float32", fused=True)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("fused=True", "--fused on", "fp8", "compute capability >= 8.9", "this GPU has 8.0",
                   "fused='auto'", "int8"):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    with pytest.raises(ops.FusedUnavailable, match="this GPU has 8.0"):
        _load(twin, dirs["bf16"], dtype="float32", fused=True, quantization="fp8")
    assert _load(twin, dirs["bf16"], dtype="float32", fused=True, quantization="int8").weight_format == "int8"
    if twin == "torch":  # nano-vllm builds the model class itself (torch_impl.nanovllm.install)
        from torch_impl.model import Qwen3ForCausalLM
        with pytest.raises(ops.FusedUnavailable, match="this GPU has 8.0"):
            Qwen3ForCausalLM(Qwen3Config.from_pretrained(dirs["bf16"]), use_fused_kernels=True, quantization="fp8")

    caplog.set_level(logging.INFO, logger=f"{twin}_impl")
    runner = _load(twin, dirs["fp8"], dtype="float32", fused="auto")
    _load(twin, dirs["fp8"], dtype="float32", fused="auto")
    lines = [r.getMessage() for r in caplog.records if "fp8 projections dequantize" in r.getMessage()]
    assert len(lines) == 1 and "fused='auto'" in lines[0] and "8.0" in lines[0], lines
    assert runner.weight_format == "fp8"
    assert_close(runner.logits(IDS[:1]), load_reference(dirs["fp8"]).logits(IDS[:1]), "float32",
                 what=f"{twin} fp8 fused='auto' on a capability-8.0 GPU")
