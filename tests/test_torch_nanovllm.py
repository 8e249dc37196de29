"""torch_impl's model through nano-vllm's protocol: its loader loop, its context and cache handling,
`install()`, and (on a GPU where nano-vllm is importable) nano-vllm's real engine."""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from common.checkpoint import write_checkpoint  # noqa: E402
from common.config import Qwen3Config  # noqa: E402
from common.weights import NANOVLLM_PACKED  # noqa: E402
import torch_impl  # noqa: E402
from torch_impl import context as ctx_mod  # noqa: E402
from torch_impl.model import Qwen3ForCausalLM  # noqa: E402

CFG = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, dtype="float32",
                  max_position_embeddings=512)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
I32 = dict(dtype=torch.int32, device=DEV)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("nanovllm") / "m", CFG, seed=3, shards=2, norm_scale="realistic")


def nanovllm_load_model(model, path):
    """nano-vllm's loader loop (nanovllm/utils/loader.py): every tensor of every safetensors file,
    renamed through packed_modules_mapping and handed to the parameter's weight_loader."""
    from safetensors import safe_open

    packed = getattr(model, "packed_modules_mapping", {})
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                hit = next((k for k in packed if k in name), None)
                if hit is not None:
                    target, shard_id = packed[hit]
                    param = model.get_parameter(name.replace(hit, target))
                    param.weight_loader(param, f.get_tensor(name), shard_id)
                else:
                    param = model.get_parameter(name)
                    param.weight_loader(param, f.get_tensor(name))


def build_like_nanovllm(path, fused):
    """Construct as nano-vllm's ModelRunner does: default dtype/device set, a transformers config."""
    hf_config = transformers.AutoConfig.from_pretrained(path)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(DEV):
            model = Qwen3ForCausalLM(hf_config, use_fused_kernels=fused)
    finally:
        torch.set_default_dtype(prev)
    nanovllm_load_model(model, str(path))
    return model


def test_packed_modules_mapping_is_commons():
    assert Qwen3ForCausalLM.packed_modules_mapping == NANOVLLM_PACKED


@pytest.mark.parametrize("fused", [False, True])
def test_nanovllm_loader_gives_the_logits_of_load(ckpt, fused):
    model = build_like_nanovllm(ckpt, fused)
    runner = torch_impl.load(ckpt, dtype="float32", fused=fused)
    for name, p in runner.model.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 6))
    t = ids.size
    cu = torch.tensor([0, 6, 12], **I32)
    ctx_mod.set_context(True, cu, cu, 6, 6, slot_mapping=None)
    try:
        with torch.inference_mode():
            h = model(torch.tensor(ids.reshape(-1), device=DEV), torch.arange(6, device=DEV).repeat(2))
            logits = model.compute_logits(h).float().cpu().numpy()
    finally:
        ctx_mod.reset_context()
    assert h.shape == (t, CFG.hidden_size)
    want = runner.logits(ids)[:, -1]  # compute_logits in prefill: the last token of each sequence
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_weight_loader_errors_name_the_parameter(ckpt):
    model = build_like_nanovllm(ckpt, False)
    p = model.get_parameter("model.layers.0.self_attn.qkv_proj.weight")
    with pytest.raises(ValueError, match=r"qkv_proj.weight shard 'k'.*\[64, 64\]"):
        p.weight_loader(p, torch.zeros(65, 64), "k")
    with pytest.raises(ValueError, match="unknown shard id 'x'"):
        p.weight_loader(p, torch.zeros(64, 64), "x")
    e = model.get_parameter("model.embed_tokens.weight")
    with pytest.raises(ValueError, match="embed_tokens.weight: checkpoint tensor has shape"):
        e.weight_loader(e, torch.zeros(3, 3))


@pytest.mark.parametrize("fused", [False, True])
def test_nanovllm_engine_protocol(ckpt, fused):
    """What nano-vllm's ModelRunner does: warm-up prefill with no cache, the cache handed to every
    module with k_cache/v_cache, prefill (slot_mapping only), decode with -1 padded block tables and
    CUDA-graph padding rows (slot -1, context length 0), then a prefill over a cached prefix."""
    model = build_like_nanovllm(ckpt, fused)
    runner = torch_impl.load(ckpt, dtype="float32", fused=False)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (7, 12)]
    dense = [runner.logits([s])[0] for s in seqs]

    def run(ids, pos, **ctx):
        ctx_mod.set_context(**ctx)
        try:
            with torch.inference_mode():
                h = model(torch.tensor(ids, device=DEV), torch.tensor(pos, device=DEV))
                return model.compute_logits(h).float().cpu().numpy()
        finally:
            ctx_mod.reset_context()

    # warm-up: the caches are still empty tensors
    cu = torch.tensor([0, 7, 14], **I32)
    warm = run(seqs[0] * 2, list(range(7)) * 2, is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7,
               max_seqlen_k=7, slot_mapping=torch.tensor([], **I32))
    np.testing.assert_allclose(warm, np.stack([dense[0][-1]] * 2), rtol=2e-4, atol=2e-4 * np.abs(dense[0]).max())
    # the cache, assigned as nano-vllm assigns it
    bs, blocks = 4, 10
    kv = torch.zeros(2, CFG.num_hidden_layers, blocks, bs, CFG.num_key_value_heads, CFG.head_dim, device=DEV)
    layer = 0
    for module in model.modules():
        if hasattr(module, "k_cache") and hasattr(module, "v_cache"):
            module.k_cache, module.v_cache = kv[0, layer], kv[1, layer]
            layer += 1
    assert layer == CFG.num_hidden_layers
    tables = [[3, 8], [0, 6, 2, 9]]
    slot = lambda b, p: tables[b][p // bs] * bs + p % bs  # noqa: E731
    # prefill of the first 5 and 9 tokens
    cu_q = torch.tensor([0, 5, 14], **I32)
    out = run(seqs[0][:5] + seqs[1][:9], list(range(5)) + list(range(9)), is_prefill=True, cu_seqlens_q=cu_q,
              cu_seqlens_k=cu_q, max_seqlen_q=9, max_seqlen_k=9,
              slot_mapping=torch.tensor([slot(0, p) for p in range(5)] + [slot(1, p) for p in range(9)], **I32))
    scale = max(np.abs(d).max() for d in dense)
    np.testing.assert_allclose(out, np.stack([dense[0][4], dense[1][8]]), rtol=2e-4, atol=2e-4 * scale)
    # decode positions 5 and 9, batch padded to 4 as a captured graph would be
    bt = torch.tensor([tables[0] + [-1, -1], tables[1], [0] * 4, [0] * 4], **I32)
    out = run([seqs[0][5], seqs[1][9], 0, 0], [5, 9, 0, 0], is_prefill=False,
              slot_mapping=torch.tensor([slot(0, 5), slot(1, 9), -1, -1], **I32),
              context_lens=torch.tensor([6, 10, 0, 0], **I32), block_tables=bt)
    np.testing.assert_allclose(out[:2], np.stack([dense[0][5], dense[1][9]]), rtol=2e-4, atol=2e-4 * scale)
    # the rest of sequence 1 as a prefill over its cached prefix (chunked prefill / prefix cache)
    out = run(seqs[1][10:], [10, 11], is_prefill=True, cu_seqlens_q=torch.tensor([0, 2], **I32),
              cu_seqlens_k=torch.tensor([0, 12], **I32), max_seqlen_q=2, max_seqlen_k=12,
              slot_mapping=torch.tensor([slot(1, 10), slot(1, 11)], **I32),
              block_tables=torch.tensor([tables[1]], **I32))
    np.testing.assert_allclose(out, dense[1][-1:], rtol=2e-4, atol=2e-4 * scale)


STAND_IN = {
    "nanovllm/__init__.py": "",
    "nanovllm/utils/__init__.py": "",
    "nanovllm/utils/context.py": """
        from dataclasses import dataclass
        @dataclass
        class Context:
            is_prefill: bool = False
            cu_seqlens_q: object = None
            cu_seqlens_k: object = None
            max_seqlen_q: int = 0
            max_seqlen_k: int = 0
            slot_mapping: object = None
            context_lens: object = None
            block_tables: object = None
        _CONTEXT = Context()
        def get_context():
            return _CONTEXT
        def set_context(*args, **kwargs):
            global _CONTEXT
            _CONTEXT = Context(*args, **kwargs)
    """,
    "nanovllm/models/__init__.py": "",
    "nanovllm/models/qwen3.py": "class Qwen3ForCausalLM:\n    pass\n",
    "nanovllm/layers/__init__.py": "",
    "nanovllm/layers/attention.py": "from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache\n",
    "nanovllm/engine/__init__.py": "",
    "nanovllm/engine/model_runner.py": """
        import nanovllm.layers.attention
        from nanovllm.models.qwen3 import Qwen3ForCausalLM
        class ModelRunner:
            def __init__(self, config, rank, event):
                self.config, self.rank, self.event = config, rank, event
                self.model_class = Qwen3ForCausalLM
    """,
    "nanovllm/engine/llm_engine.py": "from nanovllm.engine.model_runner import ModelRunner\n",
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A stand-in with nano-vllm's module layout (the real one needs flash-attn and a GPU) importable
    for one test; its modules are dropped after it (monkeypatch puts back any real ones)."""
    for rel, text in STAND_IN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nanovllm" or m.startswith("nanovllm.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "nanovllm" or m.startswith("nanovllm.")]:
        del sys.modules[name]


def test_install_swaps_the_model_and_the_context(ckpt, stand_in):
    """install() against the stand-in of nano-vllm."""
    import torch_impl.nanovllm as integration

    original = importlib.import_module("nanovllm.models.qwen3").Qwen3ForCausalLM
    had_flash_attn = importlib.util.find_spec("flash_attn") is not None
    cls = integration.install(use_fused_kernels=False)
    try:
        # the placeholder served nano-vllm's import and is gone: transformers' checks must not see it
        assert (importlib.util.find_spec("flash_attn") is not None) == had_flash_attn
        runner_mod = importlib.import_module("nanovllm.engine.model_runner")
        nctx = importlib.import_module("nanovllm.utils.context")
        assert runner_mod.Qwen3ForCausalLM is cls and issubclass(cls, Qwen3ForCausalLM)
        # the engine's rank target (tensor parallel: what its spawned ranks unpickle) builds this model too
        target = pickle.loads(pickle.dumps(importlib.import_module("nanovllm.engine.llm_engine").ModelRunner))
        rank1 = target("config", 1, "event")
        assert rank1.rank == 1 and issubclass(rank1.model_class, Qwen3ForCausalLM)
        model = build_like_nanovllm_with(cls, ckpt)
        ids = [5, 9, 11]
        cu = torch.tensor([0, 3], **I32)
        nctx.set_context(True, cu, cu, 3, 3, None, None, None)  # nano-vllm's context, not torch_impl's
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids, device=DEV), torch.arange(3, device=DEV)))
        want = torch_impl.load(ckpt, dtype="float32", fused=False).logits([ids])[:, -1]
        np.testing.assert_allclose(logits.float().cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    finally:
        integration.uninstall()
    assert importlib.import_module("nanovllm.engine.model_runner").Qwen3ForCausalLM is original
    assert (importlib.import_module("nanovllm.engine.llm_engine").ModelRunner
            is importlib.import_module("nanovllm.engine.model_runner").ModelRunner)
    assert ctx_mod.get_context() is ctx_mod.own_context()


def test_install_with_a_bad_quantization_is_one_error(stand_in):
    """install(quantization="int4") is one line naming the value and the formats, raised before
    nano-vllm is touched: its model, engine and context stay its own."""
    import torch_impl.nanovllm as integration

    models = importlib.import_module("nanovllm.models.qwen3")  # (its engine imports need install's flash_attn)
    original = models.Qwen3ForCausalLM
    with pytest.raises(ValueError) as e:
        integration.install(quantization="int4")
    assert str(e.value) == "quantization='int4': expected one of int8, fp8 (or None)"
    assert models.Qwen3ForCausalLM is original and "nanovllm.engine.model_runner" not in sys.modules
    assert ctx_mod.get_context() is ctx_mod.own_context()


def build_like_nanovllm_with(cls, path):
    hf_config = transformers.AutoConfig.from_pretrained(path)
    with torch.device(DEV):
        model = cls(hf_config)
    nanovllm_load_model(model, str(path))
    return model


def test_real_nanovllm_loader_fills_this_model(ckpt):
    """nano-vllm's own load_model (when nano-vllm is importable; it needs neither a GPU nor flash-attn
    after install()) gives the weights of torch_impl.load."""
    if importlib.util.find_spec("nanovllm") is None:
        pytest.skip("nano-vllm is not installed")
    import torch_impl.nanovllm as integration

    cls = integration.install(use_fused_kernels=False)
    try:
        from nanovllm.utils.loader import load_model

        hf_config = transformers.AutoConfig.from_pretrained(ckpt)
        with torch.device(DEV):
            model = cls(hf_config)
        load_model(model, str(ckpt))
    finally:
        integration.uninstall()
    runner = torch_impl.load(ckpt, dtype="float32", fused=False)
    for name, p in runner.model.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name


@pytest.mark.gpu
def test_real_nanovllm_engine_runs_this_model(tmp_path):
    """nano-vllm's LLM (loader, scheduler, CUDA graphs, sampler) on this model: near-greedy sampling on a
    peaked checkpoint gives torch_impl's greedy tokens. Needs nano-vllm importable (flash-attn is not)."""
    if importlib.util.find_spec("nanovllm") is None:
        pytest.skip("nano-vllm is not installed")
    if importlib.util.find_spec("xxhash") is None:
        pytest.skip("nano-vllm needs xxhash")
    import dataclasses

    import torch_impl.nanovllm as integration

    cfg = dataclasses.replace(CFG, dtype="bfloat16", vocab_size=1024, num_hidden_layers=4, hidden_size=256,
                              num_attention_heads=8, head_dim=64, intermediate_size=512, max_position_embeddings=4096)
    path = write_checkpoint(tmp_path / "m", cfg, seed=5, embed_std=1.0, tokenizer=True)
    integration.install()
    try:
        from nanovllm import LLM, SamplingParams

        llm = LLM(str(path), enforce_eager=False, max_model_len=1024, max_num_batched_tokens=2048, max_num_seqs=16,
                  gpu_memory_utilization=0.3, kvcache_block_size=256)
        prompts = [[5, 17, 3, 99], [9, 1, 200, 44, 7, 8, 9, 10, 11], [42] * 300]
        outs = llm.generate(prompts, SamplingParams(temperature=1e-4, max_tokens=24, ignore_eos=True), use_tqdm=False)
        atexit.unregister(llm.exit)
        llm.exit()
        runner = torch_impl.load(path, dtype="bfloat16")
        for prompt, out in zip(prompts, outs):
            got = out["token_ids"]
            assert len(got) == 24
            # near-greedy: every token is the top (bf16) logit of this model after its prefix
            for i, tok in enumerate(got):
                z = runner.logits([prompt + got[:i]])[0, -1]
                assert z[tok] >= z.max() - 1e-2 * abs(z.max()), (i, tok, int(z.argmax()))
    finally:
        integration.uninstall()
