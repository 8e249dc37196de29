"""torch_impl at tensor_parallel_size=2 on CPU: two processes over gloo, plain and fused (Triton's
interpreter), against the same model at size 1 - the standalone runner (its own worker process),
torchrun's layout (every rank a process of its own), nano-vllm's construction and loader protocol,
the bad-input errors, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common import default_model  # noqa: E402
from common.checkpoint import write_checkpoint  # noqa: E402
from common.config import Qwen3Config  # noqa: E402
from common.sharding import TensorParallelError  # noqa: E402
from common.tolerances import assert_close  # noqa: E402
import torch_impl  # noqa: E402
from torch_impl.model import Qwen3ForCausalLM  # noqa: E402
from torch_impl.parallel import TPGroup  # noqa: E402
from torch_impl.workers import RankFailed  # noqa: E402

HERE = Path(__file__).resolve().parent
# non-power-of-two hidden, GQA 4/2, head_dim 128 != hidden / heads, a vocabulary 2 does not divide
ODD = Qwen3Config(vocab_size=301, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, dtype="float32",
                  max_position_embeddings=256)
PROMPTS = [[5, 17, 3, 99, 12], [9, 1, 200]]
CPU = dict(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "odd", ODD, seed=7, embed_std=1.0, norm_scale="realistic")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_as_tp1(tp2, tp1, what, new_tokens=6):
    ids = np.array([PROMPTS[0], [7, 8, 9, 10, 11]])
    assert_close(tp2.logits(ids), tp1.logits(ids), "float32", what=f"{what}: logits at tensor_parallel_size=2")
    outs = tp2.generate(PROMPTS, new_tokens)
    assert outs == tp1.generate(PROMPTS, new_tokens), f"{what}: greedy tokens"
    return outs


def test_shipped_model_plain():
    """The shipped model (tied embeddings, vocab-parallel head), plain: logits, greedy tokens, sampled
    tokens (rank 0's, broadcast), a stream stopped early, then one more call."""
    tp1 = torch_impl.load(default_model(), fused=False, **CPU)
    tp2 = torch_impl.load(default_model(), fused=False, tensor_parallel_size=2, **CPU)
    try:
        assert tp2.tensor_parallel_size == 2 and tp2.model.shard_config.num_key_value_heads == 1
        _same_as_tp1(tp2, tp1, "shipped, plain")
        kw = dict(temperature=0.8, top_k=20, seed=5)
        assert tp2.generate(PROMPTS, 5, **kw) == tp2.generate(PROMPTS, 5, **kw)
        stream = tp2.generate_stream(PROMPTS[0], 40, chunk=2)
        assert len(next(stream)) == 3
        stream.close()  # the worker stops with rank 0
        with pytest.raises(TensorParallelError, match="another tensor-parallel runner"):
            torch_impl.load(default_model(), fused=False, tensor_parallel_size=2, **CPU)
        assert tp2.generate(PROMPTS[:1], 4) == tp1.generate(PROMPTS[:1], 4)
    finally:
        tp2.close()
    with pytest.raises(RankFailed, match="^the tensor-parallel runner is closed"):  # not that a worker died
        tp2.generate(PROMPTS[:1], 4)


def test_input_errors_leave_the_runner_working():
    """A call past max_cache_tokens fails on rank 0 before any command: the workers and the runner go on."""
    from torch_impl.runner import CacheCapacityError

    tp2 = torch_impl.load(default_model(), fused=False, tensor_parallel_size=2, max_cache_tokens=512, **CPU)
    try:
        with pytest.raises(CacheCapacityError, match="max_cache_tokens=512"):
            tp2.generate(PROMPTS, 600)
        tp1 = torch_impl.load(default_model(), fused=False, **CPU)
        assert tp2.generate(PROMPTS, 4) == tp1.generate(PROMPTS, 4)
    finally:
        tp2.close()


@pytest.mark.parametrize("fused,lm_head_shard", [(False, "vocab"), (True, "vocab"), (False, "replicated")])
def test_odd_checkpoint(odd, fused, lm_head_shard):
    """Odd shapes (the last rank's vocabulary slice shorter), plain and fused kernels in the interpreter
    with the vocab-parallel head (greedy tokens picked across ranks), plain with the embedding and head
    replicated."""
    tp1 = torch_impl.load(odd, fused=fused, **CPU)
    tp2 = torch_impl.load(odd, fused=fused, tensor_parallel_size=2, lm_head_shard=lm_head_shard, **CPU)
    try:
        head = tp2.model.lm_head.weight.shape[0]
        assert head == (151 if lm_head_shard == "vocab" else 301)
        outs = _same_as_tp1(tp2, tp1, f"odd, fused={fused}, lm_head_shard={lm_head_shard}",
                            new_tokens=2 if fused else 6)
        if not fused:  # the decode steps' greedy tokens came from both ranks' vocabulary slices
            assert {t >= 151 for o in outs for t in o[1:]} == {True, False}, outs
    finally:
        tp2.close()


def test_int8_and_random_weights():
    """int8 projections and head (the tied head a quantized copy), row-parallel shards keeping the scales
    of whole rows; then load_random: every size draws the same weights."""
    tp1 = torch_impl.load(default_model(), fused=False, quantization="int8", **CPU)
    tp2 = torch_impl.load(default_model(), fused=False, quantization="int8", tensor_parallel_size=2, **CPU)
    try:
        assert tp2.model.lm_head.fmt == tp1.model.lm_head.fmt
        _same_as_tp1(tp2, tp1, "shipped, int8")
    finally:
        tp2.close()
    for tied in (False, True):  # tied: the int8 head has its own draw at every size (as jax_impl's)
        cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tied,
                          dtype="float32", max_position_embeddings=128)
        r1 = torch_impl.load_random(cfg, fused=False, seed=3, quantization="int8", **CPU)
        r2 = torch_impl.load_random(cfg, fused=False, seed=3, quantization="int8", tensor_parallel_size=2, **CPU)
        try:
            ids = np.array([PROMPTS[0]])
            assert_close(r2.logits(ids), r1.logits(ids), "float32",
                         what=f"load_random at tensor_parallel_size=2, tied={tied}")
        finally:
            r2.close()


def _ranks(mode, size, tmp_path, *args, env=None):
    port = _free_port()
    procs = []
    for rank in range(size):
        e = dict(os.environ) | {k: v.format(rank=rank, port=port) for k, v in (env or {}).items()}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "tp_ranks.py"), mode, str(rank), str(size),
                                       str(port), str(tmp_path), *map(str, args)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for rank, p in enumerate(procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {rank} of {mode}:\n{out[-3000:]}"
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(size)]


def test_nanovllm_loader_protocol_at_tp2(odd, tmp_path):
    """nano-vllm's side in two gloo ranks: the process group it initializes, the model built from a
    transformers config, its loader handing every parameter the whole checkpoint tensor (bf16 and int8,
    an untied and a tied checkpoint), a prefill into a cache of num_kv_heads // 2 heads, a decode step;
    every rank's compute_logits equals the model's at size 1."""
    ckpts = [odd, default_model()]
    got = _ranks("nanovllm", 2, tmp_path, *ckpts)
    for n, ckpt in enumerate(ckpts):
        for q in (None, "int8"):
            ref = torch_impl.load(ckpt, fused=False, quantization=q, **CPU)
            nxt = got[0][f"{n}_{q}_next"]
            full = ref.logits(np.array([PROMPTS[0] + [int(nxt[0])]]))[0]
            short = ref.logits(np.array([PROMPTS[1] + [int(nxt[1])]]))[0]
            for rank in (0, 1):
                res = got[rank]
                assert int(res[f"{n}_{q}_cache_heads"]) == 1
                what = f"{ckpt.name}, {q or 'bf16'}, rank {rank}"
                assert_close(res[f"{n}_{q}_prefill"], np.stack([full[4], short[2]]), "float32", what=what + " prefill")
                assert_close(res[f"{n}_{q}_decode"], np.stack([full[5], short[3]]), "float32", what=what + " decode")


def test_under_torchrun(tmp_path):
    """Every rank a process of its own with torchrun's environment: the same calls on every rank, a call
    with other arguments on one refused on all (and the runner goes on); a second runner refused while
    the first holds the group it made."""
    env = dict(WORLD_SIZE="2", RANK="{rank}", LOCAL_RANK="{rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
    got = _ranks("torchrun", 2, tmp_path, default_model(), env=env)
    tp1 = torch_impl.load(default_model(), fused=False, **CPU)
    for rank in (0, 1):
        assert_close(got[rank]["logits"], tp1.logits(PROMPTS[:1]), "float32", what=f"torchrun rank {rank}")
        assert got[rank]["greedy"].tolist() == tp1.generate(PROMPTS[:1] * 2, 6)
        assert got[rank]["after"].tolist() == tp1.generate(PROMPTS[:1], 4)
        assert "rank(s) [1] were called with other arguments" in (tmp_path / f"rank{rank}.txt").read_text()
        assert "another tensor-parallel runner" in (tmp_path / f"rank{rank}.second.txt").read_text()


def test_bad_input(odd, monkeypatch):
    """One clear error each, before any process starts."""
    for size, match in ((3, r"num_key_value_heads \(2\) is not divisible"), (0, "positive integer"),
                        ("2", "positive integer")):
        with pytest.raises(TensorParallelError, match=match):
            torch_impl.load(default_model(), fused=False, tensor_parallel_size=size, **CPU)
    fp8_at_tp1 = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=128, dtype="float32")
    with pytest.raises(TensorParallelError, match=r"fp8 weights split in whole 128-blocks.*intermediate_size \(128\)"):
        torch_impl.load_random(fp8_at_tp1, fused=False, quantization="fp8", tensor_parallel_size=2, **CPU)
    with pytest.raises(TensorParallelError, match="lm_head_shard='rows': expected one of 'vocab', 'replicated'"):
        torch_impl.load(default_model(), tensor_parallel_size=2, lm_head_shard="rows", **CPU)
    with pytest.raises(TensorParallelError, match="rank r runs on cuda:r"):
        torch_impl.load(default_model(), tensor_parallel_size=2, device="cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TensorParallelError, match=r"tensor_parallel_size=2: only 1 CUDA device\(s\) visible"):
        torch_impl.load(default_model(), tensor_parallel_size=2, device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA H100 80GB HBM3", "NVIDIA H200"][i])
    with pytest.raises(TensorParallelError, match="the GPUs differ.*rank 1: NVIDIA H200"):
        torch_impl.load(default_model(), tensor_parallel_size=2, device="cuda")
    with pytest.raises(TensorParallelError, match="num_key_value_heads"):  # nano-vllm's way: at construction
        Qwen3ForCausalLM(ODD, use_fused_kernels=False, tp_group=TPGroup(4, 0))


def test_a_worker_killed_mid_run_fails_the_caller_naming_it():
    runner = torch_impl.load(default_model(), fused=False, tensor_parallel_size=2, **CPU)
    worker = runner._session.procs[0]
    killed = []
    timer = threading.Timer(1.0, lambda: (os.kill(worker.pid, signal.SIGKILL), killed.append(time.monotonic())))
    timer.start()
    try:
        with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runner.generate(PROMPTS, 64)
        assert time.monotonic() - killed[0] < 10, "the caller took too long to notice"
        with pytest.raises(RankFailed, match="runner is closed"):
            runner.logits([PROMPTS[0]])
    finally:
        timer.cancel()
        runner.close()


def test_a_worker_exits_with_its_parent(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:  # a file, not a pipe: the orphaned worker would hold a pipe open
        p = subprocess.run([sys.executable, str(HERE / "tp_ranks.py"), "orphan", "0", "2", "0", str(tmp_path),
                            str(default_model())], stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert p.returncode == 0, log.read_text()
    pid = int((tmp_path / "rank0.txt").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid), f"worker {pid} outlived its parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")
