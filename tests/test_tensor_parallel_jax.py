"""jax_impl's tensor parallel decode (jax_impl/parallel.py) on two CPU devices: TP=2 equals TP=1.

jax makes two host devices only when --xla_force_host_platform_device_count is set before it is
imported, so each case runs in a process of its own (tests/tp_jax_worker.py) and writes its
logits and tokens for the checks here; the rest of the suite keeps its one device. The bad-input
errors need no second device and run here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common import default_model
from common.config import Qwen3Config
from common.tolerances import assert_close

jax = pytest.importorskip("jax")
import jax_impl  # noqa: E402
from jax_impl.parallel import TensorParallel, TensorParallelError, mesh_devices  # noqa: E402

WORKER = Path(__file__).with_name("tp_jax_worker.py")
sys.path.insert(0, str(WORKER.parent))
import tp_jax_worker  # noqa: E402


def _run_case(case: str, tmp_path: Path) -> dict:
    out = tmp_path / case
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    proc = subprocess.run([sys.executable, str(WORKER), case, str(out)], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=WORKER.parents[1])
    if proc.returncode != 0:
        pytest.fail(f"{case}: the two-device worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    res = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as arrays:
        res.update({k: arrays[k] for k in arrays.files})
    for k in ("config", "rank_config"):
        if k in res:
            res[k] = Qwen3Config(**res[k])
    for k in [k for k in res if k.endswith("_shards")]:
        res[k] = [tuple(s) for s in res[k]]
    return res


@pytest.mark.timeout(1800)  # past the worker's own 1200 s limit, whose message names the case
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if fused else [])
                                  for c, (_, fused, *_) in tp_jax_worker.CASES.items()])
def test_tp2_matches_tp1(case, tmp_path):
    """Logits within the float32 tolerance, the same greedy (and sampled) tokens; interpreted Pallas
    kernels in the fused cases: about a minute each on two CPU cores, most of it compiling."""
    res = _run_case(case, tmp_path)
    assert res["devices"] == 2
    _, _, _, vocab_head, sampled = tp_jax_worker.CASES[case]
    for tag in ["tp2"] + (["tp2v"] if vocab_head else []):
        assert_close(res[f"{tag}_logits"], res["tp1_logits"], "float32", what=f"{case}: {tag} logits vs TP=1")
        assert res[f"{tag}_greedy"] == res["tp1_greedy"], (f"{case}: {tag} greedy tokens differ from TP=1:\n"
                                                           f"{res[f'{tag}_greedy']}\n{res['tp1_greedy']}")
        assert all(len(t) == 6 for t in res[f"{tag}_greedy"])
    if sampled:
        assert res["tp2_sampled"] == res["tp1_sampled"], (f"{case}: tp2 sampled tokens differ from TP=1:\n"
                                                          f"{res['tp2_sampled']}\n{res['tp1_sampled']}")
    # really split: each device holds its half of the kv heads' rows (not the same rows), of the
    # cache's heads, and of the vocabulary (rounded up) under a vocab-parallel head
    cfg, rank = res["config"], res["rank_config"]
    assert (rank.num_key_value_heads * 2, rank.intermediate_size * 2) == (cfg.num_key_value_heads,
                                                                          cfg.intermediate_size)
    assert res["tp2_w_qkv_shards"] == [(1, rank.qkv_size, cfg.hidden_size)] * 2
    assert res["tp2_w_qkv_differ"]
    assert res["tp2_cache_shards"] == [(1, 4, rank.num_key_value_heads, cfg.head_dim)] * 2
    if vocab_head:
        assert res["tp2v_head_shards"] == [(1, -(-cfg.vocab_size // 2), cfg.hidden_size)] * 2


# ----- bad input: one clear error each, before any weight is read ----------------------------------

def _fake(kind: str, platform: str = "gpu"):
    return SimpleNamespace(device_kind=kind, platform=platform)


def test_size_that_does_not_divide_the_kv_heads():
    with pytest.raises(TensorParallelError, match=r"tensor_parallel_size=3: the model's num_key_value_heads \(2\)"):
        jax_impl.load(default_model(), tensor_parallel_size=3)


@pytest.mark.parametrize("size", [0, -2, 1.5, "2", True])
def test_size_that_is_not_a_positive_integer(size):
    with pytest.raises(ValueError, match="tensor_parallel_size=.*expected a positive integer"):
        jax_impl.load(default_model(), tensor_parallel_size=size)


def test_more_devices_than_present():
    n = len(jax.local_devices())
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=16 * (n + 1), num_hidden_layers=1,
                      num_attention_heads=n + 1, num_key_value_heads=n + 1, head_dim=16, dtype="float32",
                      max_position_embeddings=64)
    dev = "device" if n == 1 else "devices"
    with pytest.raises(TensorParallelError, match=rf"^tensor_parallel_size={n + 1} but this process sees {n} {dev}: "):
        jax_impl.load_random(cfg, dtype="float32", tensor_parallel_size=n + 1)


def test_mixed_device_kinds():
    devs = [_fake("NVIDIA H100 80GB HBM3"), _fake("NVIDIA H200")]
    with pytest.raises(TensorParallelError, match=r"tensor_parallel_size=2: the first 2 devices are of different "
                                                  r"kinds \(NVIDIA H100 80GB HBM3 \(gpu\), NVIDIA H200 \(gpu\)\)"):
        mesh_devices(2, devs)
    assert mesh_devices(2, devs[:1] * 2 + devs[1:]) == devs[:1] * 2  # the first two are alike


def test_fp8_shards_must_be_whole_blocks():
    cfg = dataclasses.replace(Qwen3Config(**tp_jax_worker.QUANT), head_dim=64)  # kv 128 rows: 64 per rank
    with pytest.raises(TensorParallelError, match=r"tensor_parallel_size=2: fp8 weights split in whole 128-blocks"):
        TensorParallel.create(cfg, 2, fmt="fp8")


def test_unknown_lm_head_shard():
    with pytest.raises(TensorParallelError, match="lm_head_shard='rows': expected one of 'vocab', 'replicated'"):
        jax_impl.load(default_model(), tensor_parallel_size=1, lm_head_shard="rows")


def test_size_one_is_the_single_device_model():
    assert TensorParallel.create(Qwen3Config(**tp_jax_worker.ODD), 1) is None
