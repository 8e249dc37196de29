"""The two-device side of tests/test_tensor_parallel_jax.py: run as its own process, since jax
reads --xla_force_host_platform_device_count (two CPU devices) only before it is imported.

    python tests/tp_jax_worker.py CASE OUT   (writes OUT.npz: the logits, OUT.json: the rest)

loads one model at tensor_parallel_size 1 and 2 (and the vocab-parallel head where CASE asks),
runs the same logits, greedy and sampled generations on each, and writes what it got for the
test to compare (no pickles).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tiny on purpose: the fused cases run the Pallas kernels in interpreter mode on a 2-core CPU.
ODD = dict(vocab_size=1001, hidden_size=96, intermediate_size=98, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, dtype="float32",
           max_position_embeddings=512)  # hidden 96 (not a power of two), GQA 4:1, head_dim 128 != 96 / 8, V odd
QUANT = dict(vocab_size=256, hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, dtype="bfloat16",
             max_position_embeddings=512)  # per rank: q 256, kv 128, intermediate 128 rows (whole fp8 blocks)
PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [250, 1, 2, 3, 4, 5, 6, 7, 8]]
# The head is XLA's product in both paths, so its vocab split runs plain only: a tied head (shipped),
# a vocabulary that does not split evenly (odd), an int8 head with its per-row scales (int8).
CASES = {  # name: (model, fused, load kwargs, vocab-parallel head too, sampled generation too)
    "shipped-plain": ("shipped", False, {}, True, True),
    "shipped-fused": ("shipped", True, {}, False, False),
    "odd-plain": ("odd", False, {}, True, False),
    "odd-fused": ("odd", True, {}, False, False),
    "int8-plain": ("quant", False, {"quantization": "int8"}, True, False),
    "int8-fused": ("quant", True, {"quantization": "int8"}, False, False),
    "fp8-plain": ("quant", False, {"quantization": "fp8"}, False, False),
}


def model_dir(name: str, root: Path) -> Path:
    from common import default_model
    from common.checkpoint import write_checkpoint
    from common.config import Qwen3Config

    if name == "shipped":
        return Path(default_model())
    cfg = Qwen3Config(**(ODD if name == "odd" else QUANT))
    return write_checkpoint(root / name, cfg, seed=3, norm_scale="realistic")


def run(case: str, out: Path) -> None:
    import jax
    import numpy as np

    import jax_impl

    name, fused, kw, vocab_head, sampled = CASES[case]
    path = model_dir(name, out.parent)
    ids = np.random.default_rng(0).integers(0, 250, size=(2, 9))
    res: dict = {"devices": len(jax.devices())}
    variants = [("tp1", 1, "replicated"), ("tp2", 2, "replicated")] + ([("tp2v", 2, "vocab")] if vocab_head else [])
    for tag, tp, head in variants:
        runner = jax_impl.load(path, dtype="float32", fused=fused, tensor_parallel_size=tp, lm_head_shard=head, **kw)
        res[f"{tag}_logits"] = runner.logits(ids)
        res[f"{tag}_greedy"] = runner.generate(PROMPTS, 6)
        if sampled and head == "replicated":  # the same key on every rank: the same draw
            res[f"{tag}_sampled"] = runner.generate(PROMPTS, 6, temperature=0.8, top_k=20, top_p=0.9, seed=7)
        if tp > 1:  # what each device holds: the proof that it is split, not replicated
            layer = runner.state["layers"][0]
            w_qkv = layer["w_qkv"].get_value()
            w_qkv = w_qkv.q if hasattr(w_qkv, "q") else w_qkv
            res[f"{tag}_w_qkv_shards"] = [tuple(s.data.shape) for s in w_qkv.addressable_shards]
            res[f"{tag}_w_qkv_differ"] = not np.array_equal(*(np.asarray(s.data) for s in w_qkv.addressable_shards))
            kc = runner.init_caches(1, 4)[0][0]
            res[f"{tag}_cache_shards"] = [tuple(s.data.shape) for s in kc.addressable_shards]
            if head == "vocab":
                w_head = runner.state["lm_head"].get_value()
                w_head = w_head.q if hasattr(w_head, "q") else w_head
                res[f"{tag}_head_shards"] = [tuple(s.data.shape) for s in w_head.addressable_shards]
            res["config"], res["rank_config"] = runner.config, runner.parallel.rank_config
        del runner
    # arrays to .npz, the rest to JSON (no pickles, not even our own)
    arrays = {k: np.asarray(v) for k, v in res.items() if k.endswith("_logits")}
    np.savez(out.with_suffix(".npz"), **arrays)
    rest = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in res.items() if k not in arrays}
    out.with_suffix(".json").write_text(json.dumps(rest))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("tp_jax_worker: run with XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                         "(tests/test_tensor_parallel_jax.py does)")
    run(sys.argv[1], Path(sys.argv[2]))
