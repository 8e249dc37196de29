"""torch_impl's model and standalone Runner, plain and fused (Triton's interpreter on CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common.checkpoint import write_checkpoint  # noqa: E402
from common.config import ConfigError, Qwen3Config, shrink  # noqa: E402
from common.harness import load_reference  # noqa: E402
from common.sampling import allowed_mask  # noqa: E402
from common.tolerances import assert_lowp_close  # noqa: E402
from common.weights import WeightsError  # noqa: E402
import torch_impl  # noqa: E402
from torch_impl import context as ctx_mod  # noqa: E402
from torch_impl.ops import FusedUnavailable, choose_ops  # noqa: E402
from torch_impl.decode_loop import bucket_for  # noqa: E402
from torch_impl import prefill_loop  # noqa: E402
from torch_impl.runner import CacheCapacityError, TorchRunner  # noqa: E402

SHAPES = {
    "0.6B": dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-0.6B")), dtype="float32"),
    "awkward": Qwen3Config(vocab_size=300, hidden_size=96, intermediate_size=97, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           tie_word_embeddings=False, dtype="float32", max_position_embeddings=512),
    "tiny": Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        dtype="float32", max_position_embeddings=512),
}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_model")
    out = {name: write_checkpoint(root / name, cfg, seed=1, norm_scale="realistic") for name, cfg in SHAPES.items()}
    out["sharded"] = write_checkpoint(root / "sharded", SHAPES["awkward"], seed=1, shards=3, norm_scale="realistic")
    # Peaked logits (large embedding / head) make greedy choices robust to rounding.
    out["peaked"] = write_checkpoint(root / "peaked", SHAPES["tiny"], seed=2, embed_std=1.0, norm_scale="realistic")
    return out


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["0.6B", "awkward"])
def test_logits_match_transformers(ckpts, name, fused):
    transformers = pytest.importorskip("transformers")
    ids = np.random.default_rng(1).integers(0, SHAPES[name].vocab_size, size=(2, 9))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = torch_impl.load(ckpts[name], dtype="float32", fused=fused).logits(ids)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel(got, want) < 2e-4, _rel(got, want)


def test_sharded_checkpoint_matches_reference(ckpts):
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 7))
    got = torch_impl.load(ckpts["sharded"], dtype="float32", fused=False).logits(ids)
    assert _rel(got, load_reference(ckpts["sharded"]).logits(ids)) < 2e-4


def test_bf16_fused_logits_within_the_rule(ckpts):
    """bfloat16 logits of the fused model are no further from the float64 reference than 2x the plain model's."""
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 7))
    want = load_reference(ckpts["tiny"]).logits(ids)
    plain = torch_impl.load(ckpts["tiny"], dtype="bfloat16", fused=False).logits(ids)
    fused = torch_impl.load(ckpts["tiny"], dtype="bfloat16", fused=True).logits(ids)
    assert_lowp_close(fused, plain, want, what="bf16 fused logits")


@pytest.mark.parametrize("fused", [False, True])
def test_paged_prefill_and_decode_equal_the_dense_forward(ckpts, fused):
    """Scattered cache blocks: prefill, prefill over a cached prefix (block tables), then decode
    steps of a shrinking batch give the logits of one dense forward over each whole sequence."""
    runner = TorchRunner(ckpts["awkward"], dtype="float32", fused=fused, block_size=4)
    model, cfg = runner.model, runner.config
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (13, 9)]
    dense = [runner.logits([s])[0] for s in seqs]
    kv = torch.zeros(2, cfg.num_hidden_layers, 12, 4, cfg.num_key_value_heads, cfg.head_dim, device=DEV)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = kv[0, i], kv[1, i]
    tables = [[7, 2, 9, 4], [1, 11, 5, -1]]
    i32 = dict(dtype=torch.int32, device=DEV)

    def slot(b, p):
        return tables[b][p // 4] * 4 + p % 4

    def run(chunks, *, prefill):
        """chunks: per sequence (start, stop) of the tokens fed now; returns logits of every fed token."""
        ids = [t for b, (s, e) in chunks for t in seqs[b][s:e]]
        pos = [p for _, (s, e) in chunks for p in range(s, e)]
        slots = [slot(b, p) for b, (s, e) in chunks for p in range(s, e)]
        bt = torch.tensor([tables[b] for b, _ in chunks], **i32)
        if prefill:
            cu_q = np.cumsum([0] + [e - s for _, (s, e) in chunks])
            cu_k = np.cumsum([0] + [e for _, (s, e) in chunks])
            prefix = any(s > 0 for _, (s, e) in chunks)
            ctx_mod.set_context(True, torch.tensor(cu_q, **i32), torch.tensor(cu_k, **i32),
                                max(e - s for _, (s, e) in chunks), max(e for _, (s, e) in chunks),
                                torch.tensor(slots, **i32), None, bt if prefix else None)
        else:
            ctx_mod.set_context(False, slot_mapping=torch.tensor(slots, **i32),
                                context_lens=torch.tensor([e for _, (s, e) in chunks], **i32), block_tables=bt)
        try:
            with torch.inference_mode():
                h = model(torch.tensor(ids, device=DEV), torch.tensor(pos, device=DEV))
                return model.lm_head(h).float().cpu().numpy()
        finally:
            ctx_mod.reset_context()

    got = {0: [], 1: []}
    out = run([(0, (0, 6)), (1, (0, 4))], prefill=True)
    got[0].append(out[:6]), got[1].append(out[6:])
    out = run([(0, (6, 9)), (1, (4, 7))], prefill=True)  # over the cached prefix
    got[0].append(out[:3]), got[1].append(out[3:])
    for p in range(9, 13):
        live = [(0, (p, p + 1))] + ([(1, (p - 2, p - 1))] if p - 2 < 9 else [])
        out = run(live, prefill=False)
        for row, (b, _) in enumerate(live):
            got[b].append(out[row:row + 1])
    for b in (0, 1):
        assert _rel(np.concatenate(got[b]), dense[b]) < 2e-4, f"sequence {b}"


@pytest.mark.parametrize("fused", [False, True])
def test_padded_prefill_buffers_equal_the_eager_prefill(ckpts, fused):
    """A short prefill on a Prefiller's static buffers (what a CUDA graph replays; eagerly here):
    three prompts packed into a 16-token bucket for a 4-sequence batch bucket give each prompt's
    last-token logits, and write exactly the cache rows the eager prefill writes - the padding
    tokens and the empty padding sequence write none."""
    runner = TorchRunner(ckpts["awkward"], dtype="float32", fused=fused)
    prompts = [[5, 17, 3, 9], [9, 1, 4, 4, 4, 2], [42]]
    lens = [len(p) for p in prompts]
    bs, per_seq = runner._cache_plan(prompts, 4)
    runner._ensure_cache(len(prompts) * per_seq, bs)
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0, gen=None)
    with torch.inference_mode():
        eager_tokens = runner._prefill(prompts, lens, per_seq, bs, **greedy).cpu().tolist()
        eager_kv = runner.kv.clone()
        runner.kv.fill_(7.0)  # rows the padded run must leave alone keep this
        pre = prefill_loop.Prefiller(runner.model, bucket_for(3), prefill_loop.token_bucket(sum(lens)),
                                     torch.device(DEV), graph=False)
        assert (pre.batch, pre.tokens) == (4, 16)
        slots = np.concatenate([b * per_seq * bs + np.arange(n) for b, n in enumerate(lens)])
        logits = pre.run(prompts, slots).float().cpu().numpy()
    assert logits.shape == (3, runner.config.vocab_size)
    for b, prompt in enumerate(prompts):
        assert _rel(logits[b], runner.logits([prompt])[0, -1]) < 2e-4, f"prompt {b}"
    assert logits.argmax(-1).tolist() == eager_tokens
    written = torch.zeros(runner.kv.shape[2] * bs, dtype=torch.bool)
    written[torch.from_numpy(slots)] = True
    written = written.view(runner.kv.shape[2], bs)
    kv = runner.kv.cpu()
    assert torch.equal(kv[:, :, ~written], torch.full_like(kv[:, :, ~written], 7.0)), "a padding token wrote a row"
    torch.testing.assert_close(kv[:, :, written], eager_kv.cpu()[:, :, written], rtol=2e-5, atol=2e-5)


def test_short_prefills_replay_a_graph_only_on_cuda(ckpts):
    """Prefills of at most prefill_loop.MAX_TOKENS tokens and MAX_BATCH prompts take a Prefiller per
    (batch bucket, token bucket) where decode steps are CUDA graphs (on CUDA, cuda_graphs=True, one
    process); elsewhere, and past those sizes, the prefill runs eagerly."""
    assert prefill_loop.fits(8, 512) and not prefill_loop.fits(9, 16) and not prefill_loop.fits(1, 513)
    assert [prefill_loop.token_bucket(n) for n in (1, 16, 17, 300, 512)] == [16, 16, 32, 512, 512]
    runner = TorchRunner(ckpts["peaked"], dtype="float32", fused=True, device=DEV)
    runner._ensure_cache(1, 256)
    assert (runner._prefiller(1, 16) is None) == (DEV == "cpu")
    assert runner._prefiller(1, 513) is None and runner._prefiller(9, 16) is None
    if DEV == "cuda":  # the plain prefill attention reads lengths on the host: no graph, the eager prefill
        plain = TorchRunner(ckpts["peaked"], dtype="float32", fused=False, device=DEV)
        plain._ensure_cache(1, 256)
        assert plain._prefiller(1, 16) is None and plain.generate([[1, 2, 3]], 4) == runner.generate([[1, 2, 3]], 4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_prefill_gives_the_eager_tokens(ckpts, batch):
    """On CUDA a short prefill replays its bucket's graph: greedy tokens as with cuda_graphs=False,
    a second call in the same buckets (other lengths) captures nothing new."""
    prompts = [[5, 17, 3], [9, 1], [42, 8, 8, 2]][:batch]
    graphed = torch_impl.load(ckpts["peaked"], dtype="float32", device="cuda", fused=True)
    eager = torch_impl.load(ckpts["peaked"], dtype="float32", device="cuda", fused=True, cuda_graphs=False)
    assert graphed.generate(prompts, 12) == eager.generate(prompts, 12)
    assert [p.graph is not None for p in graphed._prefillers.values()] == [True]
    built = dict(graphed._prefillers)
    others = [p + [7] * 2 for p in prompts]  # still within the 16-token bucket
    assert graphed.generate(others, 12) == eager.generate(others, 12)
    assert graphed._prefillers == built


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_matches_transformers(ckpts, fused):
    from common.hf_runner import load as load_hf

    prompts = [[5, 17, 3], [9, 1, 200, 44, 7]]
    want = load_hf(ckpts["peaked"], dtype="float32").generate(prompts, 5)
    runner = torch_impl.load(ckpts["peaked"], dtype="float32", fused=fused, block_size=4)
    assert runner.generate(prompts, 5) == want


def test_batched_equals_one_by_one(ckpts):
    runner = torch_impl.load(ckpts["peaked"], dtype="float32", fused=False, block_size=8)
    prompts = [[5, 17, 3], [9, 1, 200, 44, 7, 8, 9, 10, 11], [42]]
    batched = runner.generate(prompts, 12)
    assert batched == [runner.generate([p], 12)[0] for p in prompts]
    assert all(len(o) == 12 for o in batched)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 5, 1.0), (1.3, 0, 0.7), (1.0, 20, 0.9)])
def test_sampled_tokens_lie_in_the_allowed_set(ckpts, temperature, top_k, top_p):
    runner = torch_impl.load(ckpts["tiny"], dtype="float32", fused=False, block_size=4)
    prompts = [[5, 17, 3], [9, 1]]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    outs = runner.generate(prompts, 6, **kw)
    assert outs == runner.generate(prompts, 6, **kw), "the same seed gives the same tokens"
    for prompt, out in zip(prompts, outs):
        for i, tok in enumerate(out):
            logits = runner.logits([prompt + out[:i]])[0, -1]
            assert allowed_mask(logits, temperature, top_k, top_p)[tok], (prompt, i, tok)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_sampling_inside_the_cuda_graph(ckpts, batch):
    """Sampled steps draw inside the captured graph with the decoder's registered generator: one
    sequence gets the eager loop's tokens exactly; three (padded to a bucket of four, whose padding
    rows the sampler must ignore) stay in the allowed set and repeat with the seed."""
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    prompts = [[5, 17, 3], [9, 1], [42, 8, 8, 2]][:batch]
    graphed = torch_impl.load(ckpts["tiny"], dtype="float32", device="cuda")
    outs = graphed.generate(prompts, 24, **kw)
    assert outs == graphed.generate(prompts, 24, **kw), "the same seed gives the same tokens"
    assert any(dec.graph is not None and dec.sampling is not None for dec in graphed._decoders.values())
    if batch == 1:
        eager = torch_impl.load(ckpts["tiny"], dtype="float32", device="cuda", cuda_graphs=False)
        assert outs == eager.generate(prompts, 24, **kw)
    for prompt, out in zip(prompts, outs):
        for i, tok in enumerate(out):
            logits = graphed.logits([prompt + out[:i]])[0, -1]
            assert allowed_mask(logits, 0.8, 20, 0.9)[tok], (prompt, i, tok)


def test_eos_stops_a_sequence(ckpts):
    runner = torch_impl.load(ckpts["peaked"], dtype="float32", fused=False)
    prompts = [[5, 17, 3], [9, 1, 200]]
    free = runner.generate(prompts, 8)
    eos = free[0][2]
    outs = runner.generate(prompts, 8, eos_token_id=[eos, 100_000])
    for row, out in zip(free, outs):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:cut]


def test_stream_equals_generate(ckpts):
    runner = torch_impl.load(ckpts["tiny"], dtype="float32", fused=False)
    chunks = list(runner.generate_stream([4, 8, 15], 9, chunk=4))
    assert [t for c in chunks for t in c] == runner.generate([[4, 8, 15]], 9)[0]
    assert len(chunks) >= 2
    assert set(runner.last_stats) >= {"prefill_s", "decode_s", "new_tokens"}
    assert runner.last_stats["new_tokens"] == 9


def test_cache_capacity_overflow_raises(ckpts):
    runner = TorchRunner(ckpts["tiny"], dtype="float32", fused=False, block_size=4, max_cache_tokens=16)
    assert len(runner.generate([[1, 2, 3]], 8)[0]) == 8  # 11 rows: fits in 16
    with pytest.raises(CacheCapacityError, match="max_cache_tokens=16"):
        runner.generate([[1, 2, 3], [4, 5, 6]], 8)  # 2 x 12 rows


def test_fused_choice(monkeypatch):
    if DEV == "cpu":
        assert not choose_ops("auto", "cpu").any_fused
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(FusedUnavailable, match="TRITON_INTERPRET"):
            choose_ops(True, "cpu")
    else:
        assert choose_ops("auto", "cuda").any_fused
    assert not choose_ops(False, DEV).any_fused
    with pytest.raises(ValueError, match="fused="):
        choose_ops("sometimes", DEV)


def test_bad_checkpoints_raise_common_errors(tmp_path, ckpts):
    with pytest.raises(WeightsError, match="does not exist"):
        torch_impl.load(tmp_path / "missing")
    bad = write_checkpoint(tmp_path / "bad", SHAPES["tiny"], seed=0)
    cfg_file = bad / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"hidden_size": 64', '"hidden_size": 65'))
    with pytest.raises((WeightsError, ConfigError), match="hidden_size|shape"):
        torch_impl.load(bad)
    with pytest.raises(ValueError, match="dtype"):
        torch_impl.load(ckpts["tiny"], dtype="int8")


@pytest.mark.parametrize("fused", ["off", "on"])
def test_cross_framework_table(ckpts, tmp_path, fused):
    """python -m common.parity over jax_impl, torch_impl and transformers on one checkpoint, float32
    (jax_impl's plain path: its fused path has its own tests)."""
    import json

    from common import parity

    runners = ["reference", "hf", f"torch:{fused}"]
    try:
        import jax_impl  # noqa: F401

        runners.append("jax:off")
    except ImportError:
        pass
    out = tmp_path / "parity.json"
    rc = parity.main(["--model", str(ckpts["0.6B"]), "--runners", ",".join(runners), "--dtype", "float32",
                      "--json", str(out), "--batch", "2", "--prompt-len", "7", "--new-tokens", "4",
                      "--max-rel-err", "2e-4"])
    assert rc == 0
    rows = {r["runner"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(runners)
    for name, row in rows.items():
        assert row["argmax_agree"] == 1.0 and row["greedy_identical"], (name, row)


def test_one_block_per_sequence_is_the_default_layout(ckpts):
    """block_size=None: one cache block per sequence, sized to the call (256-row multiples) and kept
    for later calls it fits; the tokens equal those of nano-vllm's paged layout with small blocks."""
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    runner = TorchRunner(ckpts["tiny"], dtype="float32", fused=False)
    out = runner.generate(prompts, 6)
    assert runner.kv.shape[2:4] == (2, 256)
    runner.generate(prompts[:1], 300)  # 305 rows: one 512-row block
    assert runner.kv.shape[3] == 512
    assert runner.generate(prompts[:1], 6) == out[:1] and runner.kv.shape[3] == 512  # fits: the cache is kept
    assert runner.generate(prompts, 6) == out and runner.kv.shape[2:4] == (2, 256)  # two sequences: a new one
    assert TorchRunner(ckpts["tiny"], dtype="float32", fused=False, block_size=4).generate(prompts, 6) == out
    with pytest.raises(ValueError, match="block_size=0"):
        TorchRunner(ckpts["tiny"], dtype="float32", fused=False, block_size=0)


def test_new_lengths_within_the_buckets_build_nothing(ckpts):
    """Cache rows in power-of-two buckets (at least 256) and batch buckets: other prompt lengths and
    budgets inside them reuse the cache and the decode step (on CUDA: its captured graph)."""
    runner = TorchRunner(ckpts["tiny"], dtype="float32", fused=False)
    runner.generate([[1, 2, 3]], 40)
    kv, decoders = runner.kv, dict(runner._decoders)
    for prompt, new in (([4, 5, 6, 7, 8, 9], 100), ([1], 200), ([2, 3], 7)):
        runner.generate([prompt], new)
        assert runner.kv is kv and runner._decoders == decoders, (len(prompt), new)
    runner.generate([[1] * 10], 400)  # 410 rows: the next bucket, 512
    assert runner.kv.shape[3] == 512


def test_warmup_at_load_builds_what_later_calls_use():
    """load(..., warmup=[...]) runs each shape once at load, its time in runner.warmup_s: the KV cache
    and each shape's decode step (per batch bucket and sampling; on CUDA its captured graph) are
    built then, so later calls inside them, other lengths and budgets, build nothing."""
    sampled = dict(temperature=0.7, top_k=20, top_p=0.9)
    runner = torch_impl.load_random(SHAPES["tiny"], dtype="float32", fused=False, device=DEV, warmup=[
        (2, 20, 12), dict(batch=1, prompt_tokens=5, new_tokens=30, **sampled)])
    assert runner.warmup_s > 0, runner.warmup_s
    assert runner.kv is not None and len(runner._decoders) == 2, runner._decoders.keys()
    kv, decoders = runner.kv, dict(runner._decoders)
    for prompts, new, kw in [([[1] * 30, [2, 3]], 40, {}), ([[3, 1, 4]], 100, dict(sampled, seed=3))]:
        runner.generate(prompts, new, **kw)
        same_cache = runner.kv is kv
        assert same_cache and runner._decoders == decoders, (len(prompts), new, kw, same_cache, runner._decoders.keys())


@pytest.mark.parametrize("shapes", [[(1, 5, 30), (2, 20, 12)], [(2, 4, 4), (1, 5, 60), (2, 20, 12)]])
def test_warmup_builds_one_cache_for_every_shape(shapes):
    """Warm-up shapes in any order: a later shape needing a larger KV cache (more rows or more
    sequences) must not replace the cache, dropping the decode steps built for the earlier ones."""
    runner = torch_impl.load_random(SHAPES["tiny"], dtype="float32", fused=False, device=DEV, warmup=shapes)
    kv, decoders = runner.kv, dict(runner._decoders)
    rows = {bucket_for(b) if runner.use_graphs else b for b, _, _ in shapes}  # the decode steps' batch sizes
    assert {key[0] for key in decoders} >= rows, decoders.keys()
    for b, prompt, new in shapes:
        runner.generate([[1] * prompt] * b, new)
        assert runner.kv is kv and runner._decoders == decoders, (b, prompt, new, runner._decoders.keys())

