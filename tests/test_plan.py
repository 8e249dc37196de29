"""common.weights' plan is the one tensor-name map: every view of it (the loaders' keys, nano-vllm's
packed mapping, torch_impl's parameter names and shard offsets, the reference's packing) derives
from it, and every row carries a weight format and a tensor-parallel axis."""

from __future__ import annotations

import numpy as np
import pytest

from common import reference
from common.config import PRESETS, shrink
from common.weights import (GLOBAL_PLAN, LAYER_PLAN, NANOVLLM_PACKED, PLAN, ROWS, SHARD_AXES, WEIGHT_FORMATS,
                            expected_shapes, layer_prefix, module_name, source_rows)


def test_every_row_has_a_format_and_a_shard_axis():
    for row in PLAN:
        assert row.format in WEIGHT_FORMATS and row.shard in SHARD_AXES, row
    # the axes tensor parallelism needs: projections into the heads / the MLP split their outputs,
    # the projections back to the residual stream their inputs
    assert {k: ROWS[k].shard for k in ("w_qkv", "w_gate_up", "w_o", "w_down")} == {
        "w_qkv": "column", "w_gate_up": "column", "w_o": "row", "w_down": "row"}
    assert all(ROWS[k].shard == "replicated" for k in ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm"))


def test_rows_cover_exactly_the_checkpoint():
    cfg = shrink(PRESETS["Qwen3-8B"], layers=2)
    named = {src for row in PLAN if not row.layer for src in row.sources}
    named |= {layer_prefix(i) + src for row in PLAN if row.layer for src in row.sources for i in range(2)}
    assert named == set(expected_shapes(cfg))  # 8B's lm_head is untied: every tensor, nothing more


def test_views_derive_from_the_plan():
    assert NANOVLLM_PACKED == {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    assert LAYER_PLAN["w_qkv"] == ROWS["w_qkv"].sources and GLOBAL_PLAN["embed"] == "model.embed_tokens.weight"
    cfg = PRESETS["Qwen3-0.6B"]
    assert source_rows("w_qkv", cfg) == [("q", 0, cfg.q_size), ("k", cfg.q_size, cfg.kv_size),
                                         ("v", cfg.q_size + cfg.kv_size, cfg.kv_size)]
    assert source_rows("w_gate_up", cfg) == [(0, 0, cfg.intermediate_size),
                                             (1, cfg.intermediate_size, cfg.intermediate_size)]


def test_torch_model_parameters_are_the_plans_modules():
    torch = pytest.importorskip("torch")
    from torch_impl.model import Qwen3ForCausalLM

    cfg = shrink(PRESETS["Qwen3-8B"], layers=2, width=8, vocab=256)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg, use_fused_kernels=False)
    names = {n for n, _ in model.named_parameters()}
    want = {module_name(r.key, None) for r in PLAN if not r.layer}
    want |= {module_name(r.key, i) for r in PLAN if r.layer for i in range(2)}
    assert names == want
    assert model.packed_modules_mapping == NANOVLLM_PACKED


def test_reference_packs_by_the_plan():
    cfg = shrink(PRESETS["Qwen3-0.6B"], layers=1, width=16, vocab=64)
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape) for name, shape in expected_shapes(cfg).items()}
    lw = reference.layer_weights(weights, 0)
    assert set(lw) == set(LAYER_PLAN)
    p = layer_prefix(0)
    np.testing.assert_array_equal(lw["w_gate_up"][cfg.intermediate_size:], weights[p + "mlp.up_proj.weight"])
    np.testing.assert_array_equal(lw["w_qkv"][:cfg.q_size], weights[p + "self_attn.q_proj.weight"])
