"""Both twins' fused decode on shapes unlike the presets' (a held-out model could have them): GQA
8:1 and 4:1, head_dim 128 and 64, odd hidden and intermediate sizes, tied and untied heads. In
float32 the greedy tokens equal the numpy reference's and the logits are within the tolerance
table's bound; the kernels run in their interpreters on CPU (conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from common.checkpoint import write_checkpoint
from common.config import Qwen3Config
from common.harness import get_loader, load_reference
from common.tolerances import assert_close

SHAPES = {
    "gqa8-d128-untied": Qwen3Config(vocab_size=384, hidden_size=176, intermediate_size=300, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                                    tie_word_embeddings=False, dtype="float32", max_position_embeddings=256),
    "gqa4-d64-tied": Qwen3Config(vocab_size=320, hidden_size=111, intermediate_size=97, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                 tie_word_embeddings=True, dtype="float32", max_position_embeddings=256),
}
PROMPTS = [[5, 17, 3], [9, 1, 200, 44, 7, 60, 2]]
NEW = 6


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Per shape: weights as the other model tests draw them (for the logits), and a peaked variant
    (a large embedding: greedy choices clear of float32 rounding) for the tokens."""
    root = tmp_path_factory.mktemp("holdout")
    return {(name, peaked): write_checkpoint(root / f"{name}-{peaked}", cfg, seed=3, norm_scale="realistic",
                                             **(dict(embed_std=1.0) if peaked else {}))
            for name, cfg in SHAPES.items() for peaked in (False, True)}


@pytest.mark.parametrize("twin", ["jax", "torch"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_decode_on_held_out_shapes(ckpts, name, twin):
    pytest.importorskip(f"{twin}_impl")
    load = get_loader(twin)
    ids = np.asarray([PROMPTS[1]])
    got = load(str(ckpts[name, False]), dtype="float32", fused=True).logits(ids)
    assert_close(got, load_reference(ckpts[name, False]).logits(ids), "float32", what=f"{twin} fused logits, {name}")
    runner, reference = load(str(ckpts[name, True]), dtype="float32", fused=True), load_reference(ckpts[name, True])
    assert runner.generate(PROMPTS, NEW) == reference.generate(PROMPTS, NEW), f"{twin} fused greedy, {name}"
