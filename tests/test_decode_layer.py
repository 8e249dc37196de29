"""torch_impl's one-launch decoder layer (torch_impl/kernels/decode_layer.py) against the per-op layer.

On CPU the kernel runs in Triton's interpreter on a one-program grid (the interpreter runs programs
one after another, so a wait on another program's task would never end): every stage runs, in
order, through the same scheduling and counter code as on the GPU. The shapes are Qwen3's in
kind: head_dim 128, GQA (4 query heads on 2 kv heads), hidden and intermediate sizes that are not
powers of two, q/k-norm weights of tens.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common.config import Qwen3Config  # noqa: E402
from common.ops import AttentionMeta  # noqa: E402
from common.tiles import LayerTiles  # noqa: E402
from common.tolerances import assert_close  # noqa: E402
import torch_impl  # noqa: E402
from torch_impl.ops import PLAIN_OPS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = Qwen3Config(vocab_size=512, hidden_size=384, intermediate_size=640, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=1024)
TILES = dict(block_n=32, block_k=256, block_kv=32)  # several tasks per stage, several K chunks, a partial last one
BLOCK_ROWS, BLOCK = 256, 1  # the sequence owns cache block 1 of two


def _layer_kernel():
    from torch_impl.kernels import decode_layer  # noqa: PLC0415 - triton's interpreter is set by conftest

    return decode_layer


def _setup(dtype: str, quantization=None, ctx: int = 37, seed: int = 0):
    runner = torch_impl.load_random(dataclasses.replace(CFG, dtype=dtype), dtype=dtype, fused=True, device=DEV,
                                    quantization=quantization)
    model = runner.model
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    cache = [torch.randn(2, BLOCK_ROWS, CFG.num_key_value_heads, CFG.head_dim, generator=g).to(dt).to(DEV)
             for _ in range(2)]
    x = torch.randn(1, CFG.hidden_size, generator=g).to(dt).to(DEV)
    step = dict(positions=torch.tensor([ctx - 1], device=DEV), slots=torch.tensor([BLOCK * BLOCK_ROWS + ctx - 1], device=DEV),
                context_lens=torch.tensor([ctx], dtype=torch.int32, device=DEV),
                block_tables=torch.tensor([[BLOCK]], dtype=torch.int32, device=DEV))
    return model, x, cache, step


def _per_op(model, x, cache, step, ops=None):
    """The per-op layer's output and caches (its own copies of the caches)."""
    layer = model.model.layers[0]
    kc, vc = cache[0].clone(), cache[1].clone()
    layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = kc, vc
    meta = AttentionMeta(positions=step["positions"], slots=step["slots"].to(torch.int32), cu_seqlens_q=None,
                         cu_seqlens_k=None, context_lens=step["context_lens"], block_tables=step["block_tables"],
                         max_seqlen_q=1, max_seqlen_k=int(step["context_lens"][0]), is_prefill=False)
    saved = layer.ops
    layer.ops = ops or saved
    try:
        with torch.inference_mode():
            return layer(meta, x, model.model.cos_sin), kc, vc
    finally:
        layer.ops = saved


def _one_launch(model, x, cache, step, state, **kw):
    K = _layer_kernel()
    kc, vc = cache[0].clone(), cache[1].clone()
    with torch.inference_mode():
        out = K.decode_layer(x, model.model.layers[0], kc, vc, model.model.cos_sin, state=state,
                             eps=model.config.rms_norm_eps, tiles=LayerTiles(**TILES), **step, **kw)
    return out, kc, vc


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                                ("bfloat16", "fp8")])
def test_one_launch_equals_the_per_op_layer(dtype, quantization):
    """Output and the cache rows written equal the per-op fused layer's (the same stage loops in the
    same rounding), and the float32 layer is within the float32 tolerance of the plain torch ops."""
    K = _layer_kernel()
    model, x, cache, step = _setup(dtype, quantization)
    state = K.LayerState.new(torch.device(DEV), 1)
    out, kc, vc = _one_launch(model, x, cache, step, state, max_spin=1000)
    K.check_state(state)
    want, kc_want, vc_want = _per_op(model, x, cache, step)
    tol = "float32" if dtype == "float32" else "bfloat16"
    assert_close(out.float().cpu(), want.float().cpu(), tol, what="layer output")
    assert_close(kc.float().cpu(), kc_want.float().cpu(), tol, what="k cache")
    assert_close(vc.float().cpu(), vc_want.float().cpu(), tol, what="v cache")
    changed = (kc != cache[0]).reshape(-1, CFG.num_key_value_heads * CFG.head_dim).any(-1).nonzero().flatten()
    assert changed.tolist() == [int(step["slots"][0])], "the step writes its own cache row and no other"
    if dtype == "float32" and quantization is None:
        plain, _, _ = _per_op(model, x, cache, step, ops=PLAIN_OPS)
        assert_close(out.cpu(), plain.cpu(), "float32", what="layer output against the plain ops")


@pytest.mark.parametrize("ctx", [37, 200, 256])
def test_attention_split_over_the_context_equals_the_per_op_layer(ctx):
    """Attention in 4 splits per kv head (2 tiles of keys at least each: 1, 3 and 4 active at these
    contexts): the last split to arrive merges the others' partials, also with each stage's tasks
    reversed; the output equals the per-op layer's in float32, and the split arrivals are back at 0."""
    K = _layer_kernel()
    model, x, cache, step = _setup("float32", ctx=ctx)
    tiles = LayerTiles(**TILES, num_splits=4)
    want, kc_want, _ = _per_op(model, x, cache, step)
    for order in (None, K.task_order(CFG, tiles, DEV)):
        state = K.LayerState.new(torch.device(DEV), 1)
        kc, vc = cache[0].clone(), cache[1].clone()
        with torch.inference_mode():
            out = K.decode_layer(x, model.model.layers[0], kc, vc, model.model.cos_sin, state=state,
                                 eps=model.config.rms_norm_eps, tiles=tiles, max_spin=1000, order=order, **step)
        K.check_state(state)
        assert_close(out.cpu(), want.cpu(), "float32", what=f"layer output at ctx {ctx}")
        assert_close(kc.cpu(), kc_want.cpu(), "float32", what="k cache")
        assert state.arrivals(CFG.num_key_value_heads).tolist() == [0] * CFG.num_key_value_heads
        assert state.counters[2].item() == CFG.num_key_value_heads * 4


def test_counters_grow_across_launches_without_a_reset():
    """Each launch takes one ticket per program and adds each stage's task count to its done counter:
    a second launch over the same state targets the next multiple, with no host reset in between."""
    K = _layer_kernel()
    model, x, cache, step = _setup("float32")
    state = K.LayerState.new(torch.device(DEV), 1)
    first, _, _ = _one_launch(model, x, cache, step, state, max_spin=1000)
    second, _, _ = _one_launch(model, x, cache, step, state, max_spin=1000)
    K.check_state(state)
    tasks = K.stage_tasks(CFG, LayerTiles(**TILES))
    assert tasks == [8, 2, 12, 20, 12]  # q, k, v heads; kv heads; 384 / 32, 640 / 32, 384 / 32 row blocks
    assert state.counters.tolist() == [2] + [2 * t for t in tasks]
    assert torch.equal(first, second)


def test_any_order_within_each_stage_gives_the_same_layer():
    """Each stage's tasks reversed, or shuffled (a stress test's `order`), run through the same waits
    and give the identical output and cache rows; an order that moves a task across stages is refused."""
    K = _layer_kernel()
    model, x, cache, step = _setup("float32")
    tiles = LayerTiles(**TILES)
    want = _one_launch(model, x, cache, step, K.LayerState.new(torch.device(DEV), 1), max_spin=1000)
    for order in (K.task_order(CFG, tiles, DEV), K.task_order(CFG, tiles, DEV, generator=torch.Generator().manual_seed(1))):
        assert not torch.equal(order.cpu(), torch.arange(order.numel(), dtype=torch.int32))
        state = K.LayerState.new(torch.device(DEV), 1)
        got = _one_launch(model, x, cache, step, state, max_spin=1000, order=order)
        K.check_state(state)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    bad = torch.arange(sum(K.stage_tasks(CFG, tiles)), dtype=torch.int32, device=DEV)
    bad[[7, 8]] = bad[[8, 7]]  # the last qkv task swapped with the first attention task
    with pytest.raises(ValueError, match=r"places 0\.\.7 \(stage qkv\) are not a permutation"):
        _one_launch(model, x, cache, step, K.LayerState.new(torch.device(DEV), 1), order=bad)


def test_a_missing_release_raises_instead_of_hanging():
    """A planted missing release (the counters say a launch arrived whose stages never finished):
    every wait gives up after max_spin reads, sets the error flag, and check_state raises."""
    K = _layer_kernel()
    model, x, cache, step = _setup("float32")
    state = K.LayerState.new(torch.device(DEV), 1)
    state.counters[0] = 1  # a launch that took its ticket and released nothing
    _one_launch(model, x, cache, step, state, max_spin=20)
    with pytest.raises(RuntimeError, match="waited past max_spin"):
        K.check_state(state)


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter's one-program rule (CPU only)")
def test_more_than_one_program_is_refused_in_the_interpreter():
    K = _layer_kernel()
    model, x, cache, step = _setup("float32")
    with pytest.raises(ValueError, match="programs one after another"):
        _one_launch(model, x, cache, step, K.LayerState.new(torch.device(DEV), 2))


def _gpu_layer(preset: str, ctx: int):
    """A real preset's first layer (bf16) on the GPU, caches of two blocks of max(4096, ctx) rows, the
    step's inputs (the sequence in block 1)."""
    cfg = dataclasses.replace(Qwen3Config.preset(preset), num_hidden_layers=1, dtype="bfloat16")
    runner = torch_impl.load_random(cfg, dtype="bfloat16", fused=True, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = max(4096, ctx)
    cache = [torch.randn(2, rows, cfg.num_key_value_heads, cfg.head_dim, generator=g, device="cuda").to(torch.bfloat16)
             for _ in range(2)]
    x = torch.randn(1, cfg.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    step = dict(positions=torch.tensor([ctx - 1], device="cuda"), slots=torch.tensor([rows + ctx - 1], device="cuda"),
                context_lens=torch.tensor([ctx], dtype=torch.int32, device="cuda"),
                block_tables=torch.tensor([[1]], dtype=torch.int32, device="cuda"))
    return cfg, runner.model, x, cache, step


def _chosen_tiles(cfg, x) -> LayerTiles:
    """The tiles decode_layer runs with by default (the lookup's) for this shape on x's device."""
    K = _layer_kernel()
    return K.tiles_for("decode_layer", "test", None, LayerTiles, x.device, x.dtype, None, **K.layer_shape(cfg, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["Qwen3-0.6B", "Qwen3-8B"])
@pytest.mark.parametrize("ctx", [300, 4096, 32768])
def test_resident_grid_at_full_shapes_over_many_launches(preset, ctx):
    """On the GPU, a grid of as many programs as fit at once, a real preset's layer (bf16): the
    output and cache row equal the per-op layer's; 2,000 launches over one state with bounded waits
    leave the error flag clear and every counter at launches x tasks."""
    K = _layer_kernel()
    cfg, model, x, cache, step = _gpu_layer(preset, ctx)
    layer = model.model.layers[0]
    state = K.LayerState.new(torch.device("cuda"))
    kc, vc = cache[0].clone(), cache[1].clone()
    with torch.inference_mode():
        out = K.decode_layer(x, layer, kc, vc, model.model.cos_sin, state=state, eps=cfg.rms_norm_eps,
                             max_spin=1 << 22, **step)
        want, kc_want, vc_want = _per_op(model, x, cache, step)
        assert state.programs > 1
        assert_close(out.float().cpu(), want.float().cpu(), "bfloat16", what=f"{preset} layer output")
        assert_close(kc.float().cpu(), kc_want.float().cpu(), "bfloat16", what="k cache")
        assert_close(vc.float().cpu(), vc_want.float().cpu(), "bfloat16", what="v cache")
        for _ in range(1999):
            again = K.decode_layer(x, layer, kc, vc, model.model.cos_sin, state=state, eps=cfg.rms_norm_eps,
                                   max_spin=1 << 22, **step)
        K.check_state(state)
    assert torch.equal(again, out), "the same inputs give the same output at every launch"
    tiles = _chosen_tiles(cfg, x)
    tasks = K.stage_tasks(cfg, tiles)
    assert tasks[:2] == [cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.num_key_value_heads * tiles.num_splits]
    assert state.counters.tolist() == [2000 * state.programs] + [2000 * t for t in tasks]


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_ten_thousand_launches_in_randomized_orders():
    """On the GPU, 10,000 launches of a Qwen3-0.6B layer over one state, each with its stages' tasks
    in one of 16 random orders (or reversed): bounded waits never give up, every output equals the
    first, and the counters stand at launches x tasks."""
    K = _layer_kernel()
    cfg, model, x, cache, step = _gpu_layer("Qwen3-0.6B", 1000)
    layer = model.model.layers[0]
    tiles = _chosen_tiles(cfg, x)
    assert tiles.num_splits > 1, "the stress test covers the attention splits' merge"
    g = torch.Generator().manual_seed(0)
    orders = [K.task_order(cfg, tiles, "cuda")] + [K.task_order(cfg, tiles, "cuda", generator=g) for _ in range(16)]
    state = K.LayerState.new(torch.device("cuda"))
    kc, vc = cache[0].clone(), cache[1].clone()
    differs = torch.zeros((), dtype=torch.bool, device="cuda")
    with torch.inference_mode():
        first = K.decode_layer(x, layer, kc, vc, model.model.cos_sin, state=state, eps=cfg.rms_norm_eps,
                               max_spin=1 << 22, **step).clone()
        for n in range(1, 10_000):
            got = K.decode_layer(x, layer, kc, vc, model.model.cos_sin, state=state, eps=cfg.rms_norm_eps,
                                 max_spin=1 << 22, order=orders[n % len(orders)], **step)
            differs |= (got != first).any()
        K.check_state(state)
    assert not differs.item(), "every order gives the same output"
    assert state.counters.tolist() == [10_000 * state.programs] + [10_000 * t for t in K.stage_tasks(cfg, tiles)]


def test_layer_probe_refuses_bad_input_in_one_line(tmp_path, capsys):
    """bench.layer_probe (GPU only): an unknown preset, an existing --out, or no CUDA GPU is one
    `error:` line and status 2."""
    from bench import layer_probe  # noqa: PLC0415

    assert layer_probe.main(["--presets", "Qwen3-7B"]) == 2
    assert "unknown Qwen3-7B" in capsys.readouterr().err
    taken = tmp_path / "rows.json"
    taken.write_text("[]")
    assert layer_probe.main(["--out", str(taken)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and taken.read_text() == "[]"
    if not torch.cuda.is_available():
        assert layer_probe.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_model_decodes_through_the_layer_kernel_where_the_lookup_says_so():
    """The model's decode step runs every layer as one launch where the tile lookup's path for
    decode_layer is "fused" (here the default rule, patched; on a GPU a tile table entry): the
    greedy tokens are the per-op path's, and the runner (and bench's rows) say which path ran."""
    from common import tile_rules, tiles  # noqa: PLC0415

    cfg = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=512, dtype="float32")
    runner = torch_impl.load_random(cfg, dtype="float32", fused=True, device=DEV)
    prompt = [[5, 17, 3, 9]]
    want = runner.generate(prompt, 5)
    assert runner.decode_path == "per-op"
    default_path = tile_rules.default_path
    tile_rules.default_path = lambda kernel, *a, **kw: "fused" if kernel == "decode_layer" else default_path(kernel, *a, **kw)
    tiles.clear_cache()
    try:
        got = runner.generate(prompt, 5)
    finally:
        tile_rules.default_path = default_path
        tiles.clear_cache()
    assert runner.decode_path == "one launch per layer"
    assert got == want
    assert runner.model.model.layer_state.counters[0].item() == 4 * cfg.num_hidden_layers  # 4 decode steps x layers


def test_stage_times_read_each_task_where_its_program_wrote_it():
    """stage_times folds a timed launch's buffer (task t at program t % P, slot t // P) into per-stage
    means and spans; here a synthetic buffer where task t starts at 10 t us, waits 1 us and works
    2 us (the kernel's %globaltimer writes need a GPU)."""
    K = _layer_kernel()
    tiles, programs = LayerTiles(**TILES), 3
    total = sum(K.stage_tasks(CFG, tiles))
    buf = K.timer_buffer(CFG, tiles, programs, "cpu")
    for t in range(total):
        buf[t % programs, t // programs] = torch.tensor([1_000_000 + 10_000 * t, 1_001_000 + 10_000 * t,
                                                         1_003_000 + 10_000 * t])
    rows = K.stage_times(buf, CFG, tiles, programs)
    assert [r["stage"] for r in rows] == list(K.STAGE_NAMES)
    assert [r["tasks"] for r in rows] == K.stage_tasks(CFG, tiles)
    assert all(abs(r["wait_us"] - 1.0) < 1e-9 and abs(r["work_us"] - 2.0) < 1e-9 for r in rows)
    assert rows[0]["start_us"] == 0.0 and rows[-1]["end_us"] == 10.0 * (total - 1) + 3.0


def test_the_grid_never_exceeds_what_the_gpu_holds_at_once():
    """resident_programs: SMs x the programs per SM that the scarcest of registers, threads, shared
    memory and the 32-block limit allows, capped at the largest stage's tasks (H100-like numbers)."""
    K = _layer_kernel()
    h100 = dict(multiprocessor_count=132, max_num_regs=65536, max_shared_mem=232448, max_threads_per_sm=2048,
                warpSize=32)
    assert K.resident_programs(128, 0, 4, h100, 10_000) == 132 * 4  # registers: 65536 / (128 x 128)
    assert K.resident_programs(16, 0, 4, h100, 10_000) == 132 * 16  # threads: 2048 / 128
    assert K.resident_programs(16, 0, 1, h100, 10_000) == 132 * 32  # the block limit
    assert K.resident_programs(32, 100_000, 4, h100, 10_000) == 132 * 2  # shared memory
    assert K.resident_programs(32, 0, 4, h100, 192) == 192  # no more programs than the largest stage's tasks
    with pytest.raises(ValueError, match="more than an SM holds"):
        K.resident_programs(32, 300_000, 4, h100, 192)
