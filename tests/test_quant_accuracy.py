"""tools/quant_accuracy.py: its held-out token ids, its loss, and issue 21's accuracy limits on the
shipped model (project-sources loss of int8 weights at most 1% above bf16's, fp8 at most 1.5%).

The tool's figures use all 76,032 held-out tokens (minutes per format on two CPU cores); the limits
are checked here on a slice, the first SLICE_WINDOWS windows (512 tokens, about 2 s per format).
On that slice int8 measured +0.01% and fp8 -0.23% (the full set: +0.005% and +0.014%)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import common
from common.config import Qwen3Config
from common.harness import load_reference
from tools import quant_accuracy as qa

SLICE_WINDOWS = 2
LIMIT_PCT = {"int8": 1.0, "fp8": 1.5}  # the project-sources loss increase each format may cost
MODEL = Path(common.default_model())


@pytest.fixture(scope="module")
def ids():
    return qa.read_heldout()


@pytest.fixture(scope="module")
def losses(ids):
    part = ids[:SLICE_WINDOWS * qa.WINDOW + 1]
    return {q or "bf16": qa.sources_loss(MODEL, part, q) for q in qa.FORMATS}


def test_heldout_ids_are_token_ids_of_the_shipped_model(ids):
    from safetensors import safe_open

    vocab = Qwen3Config.from_pretrained(MODEL).vocab_size
    assert ids.ndim == 1 and ids.dtype == np.int64, (ids.shape, ids.dtype)
    assert 0 <= ids.min() and ids.max() < vocab, f"ids in [{ids.min()}, {ids.max()}], vocab {vocab}"
    assert (ids.size - 1) // qa.WINDOW * qa.WINDOW == 76_032  # the token count the user guide quotes
    with safe_open(str(qa.HELDOUT), "numpy") as f:
        assert f.get_slice("ids").get_dtype() == "U16"  # stored as uint16 (vocab < 65,536)
        assert f.metadata()["sources"].startswith("common/")  # this project's sources, not the training corpus


def test_missing_heldout_file_is_one_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--build-heldout"):
        qa.read_heldout(tmp_path / "none.safetensors")


def test_sources_loss_is_the_next_token_cross_entropy(ids):
    """One window against the float64 reference's logits, the log-softmax taken here: the loss
    predicts token t+1 from tokens up to t (an off-by-one would score the wrong targets)."""
    w = ids[:qa.WINDOW + 1]
    logits = load_reference(MODEL).logits([w[:-1]])[0].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    want = -logp[np.arange(qa.WINDOW), w[1:]].mean()
    got = qa.sources_loss(MODEL, w, None)
    assert abs(got - want) <= 1e-4 * want, (got, want)


def test_quantized_loss_stays_within_the_issue_limits(losses):
    vocab = Qwen3Config.from_pretrained(MODEL).vocab_size
    base = losses["bf16"]
    assert math.isfinite(base) and base < math.log(vocab) - 1, f"bf16 loss {base}: not a trained model's"
    for fmt, limit in LIMIT_PCT.items():
        assert losses[fmt] != base, f"{fmt}: the same loss as bf16, so the weights were not quantized"
        pct = 100 * (losses[fmt] / base - 1)
        assert pct <= limit, f"{fmt}: project-sources loss {losses[fmt]:.4f} is {pct:+.3f}% from bf16's {base:.4f} " \
                             f"(limit +{limit}%) on {SLICE_WINDOWS * qa.WINDOW} project-sources tokens"
