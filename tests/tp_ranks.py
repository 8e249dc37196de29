"""One rank of tests/test_tensor_parallel_torch.py's multi-process checks, run as its own process:

    python tests/tp_ranks.py nanovllm RANK SIZE PORT OUT CKPT...   nano-vllm's side: its process group,
        its model construction (hf_config, default dtype) and loader loop on each checkpoint, bf16 and
        int8, then a prefill into a cache sharded as nano-vllm allocates it and a decode step
    python tests/tp_ranks.py torchrun RANK SIZE PORT OUT CKPT      torch_impl.load(tensor_parallel_size=SIZE)
        as under torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set by the caller); a second
        runner in the same processes is refused
    python tests/tp_ranks.py orphan 0 2 0 OUT CKPT                 a standalone TP runner whose process then dies

Each writes OUT/rank{RANK}.npz (and .txt for messages). Interpreter mode and the like come from the
environment the test passes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = [[5, 17, 3, 99, 12], [9, 1, 200]]  # prefill lengths 5 and 3 (block_size 4: 2 blocks and 1)


def nanovllm(rank: int, size: int, port: int, out: Path, ckpts: list[str]) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    import transformers

    from torch_impl import context as ctx_mod
    from torch_impl.model import Qwen3ForCausalLM
    from test_torch_nanovllm import nanovllm_load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=size, rank=rank)
    i32 = dict(dtype=torch.int32)
    results = {}
    for n, ckpt in enumerate(ckpts):
        hf = transformers.AutoConfig.from_pretrained(ckpt)
        for q in (None, "int8"):
            torch.set_default_dtype(torch.float32)  # nano-vllm's runner: the config's dtype (the test's is fp32)
            model = Qwen3ForCausalLM(hf, use_fused_kernels=False, quantization=q)
            nanovllm_load_model(model, ckpt)
            kvh = hf.num_key_value_heads // size  # nano-vllm's allocate_kv_cache
            kv = torch.zeros(2, hf.num_hidden_layers, 4, 4, kvh, hf.head_dim)
            layer = 0
            for module in model.modules():
                if hasattr(module, "k_cache") and hasattr(module, "v_cache"):
                    module.k_cache, module.v_cache = kv[0, layer], kv[1, layer]
                    layer += 1
            tables = [[0, 1], [2]]
            slot = lambda b, p: tables[b][p // 4] * 4 + p % 4  # noqa: E731
            with torch.inference_mode():
                slots = [slot(0, p) for p in range(5)] + [slot(1, p) for p in range(3)]
                cu = torch.tensor([0, 5, 8], **i32)
                ctx_mod.set_context(True, cu, cu, 5, 5, torch.tensor(slots, **i32))
                ids = torch.tensor(PROMPTS[0] + PROMPTS[1])
                pre = model.compute_logits(model(ids, torch.tensor(list(range(5)) + list(range(3)))))
                nxt = pre.argmax(-1)
                ctx_mod.set_context(False, slot_mapping=torch.tensor([slot(0, 5), slot(1, 3)], **i32),
                                    context_lens=torch.tensor([6, 4], **i32),
                                    block_tables=torch.tensor([[0, 1], [2, -1]], **i32))
                dec = model.compute_logits(model(nxt, torch.tensor([5, 3])))
                ctx_mod.reset_context()
            results[f"{n}_{q}_prefill"] = pre.float().numpy()
            results[f"{n}_{q}_decode"] = dec.float().numpy()
            results[f"{n}_{q}_next"] = nxt.numpy()
            results[f"{n}_{q}_cache_heads"] = np.array(kv.shape[4])
    np.savez(out / f"rank{rank}.npz", **results)
    dist.destroy_process_group()


def torchrun(rank: int, out: Path, ckpt: str) -> None:
    import numpy as np

    import torch_impl
    from common.sharding import TensorParallelError

    runner = torch_impl.load(ckpt, dtype="float32", fused=False, tensor_parallel_size=int(os.environ["WORLD_SIZE"]),
                             device="cpu")
    try:  # the first runner made the group and destroys it at close(): a second one may not share it
        torch_impl.load(ckpt, dtype="float32", fused=False, tensor_parallel_size=int(os.environ["WORLD_SIZE"]),
                        device="cpu")
        second = "a second runner loaded"
    except TensorParallelError as e:
        second = str(e)
    (out / f"rank{rank}.second.txt").write_text(second)
    res = dict(logits=runner.logits(PROMPTS[:1]), greedy=np.array(runner.generate(PROMPTS[:1] * 2, 6)))
    try:  # every rank must make the same calls: one with other arguments is refused on every rank
        runner.generate(PROMPTS[:1], 3 + rank)
    except TensorParallelError as e:
        (out / f"rank{rank}.txt").write_text(str(e))
    res["after"] = np.array(runner.generate(PROMPTS[:1], 4))  # and the runner goes on
    runner.close()
    np.savez(out / f"rank{rank}.npz", **res)


def orphan(out: Path, ckpt: str) -> None:
    import torch_impl

    runner = torch_impl.load(ckpt, dtype="float32", fused=False, tensor_parallel_size=2, device="cpu")
    (out / "rank0.txt").write_text(" ".join(str(p.pid) for p in runner._session.procs))
    os._exit(0)  # no clean-up at all: the worker must notice and exit by itself


if __name__ == "__main__":
    mode, rank, size, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    if mode == "nanovllm":
        nanovllm(rank, size, port, out, sys.argv[6:])
    elif mode == "torchrun":
        torchrun(rank, out, sys.argv[6])
    else:
        orphan(out, sys.argv[6])
