"""jax_impl model tests, each run on the plain XLA path and on the fused Pallas kernels
(interpreter mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

from common.checkpoint import write_checkpoint
from common.config import Qwen3Config, shrink
from common.harness import load_reference
from common.sampling import allowed_mask
from common.tolerances import assert_close, assert_lowp_close

jax = pytest.importorskip("jax")
jnp = jax.numpy
import jax_impl  # noqa: E402
from jax_impl import decode_loop  # noqa: E402
from jax_impl.model import init_caches  # noqa: E402


SHAPES = {
    "0.6B": dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-0.6B")), dtype="float32"),
    "8B": dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-8B"), width=16), dtype="float32"),
    "awkward": Qwen3Config(vocab_size=1000, hidden_size=96, intermediate_size=97, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           tie_word_embeddings=False, dtype="float32", max_position_embeddings=512),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_model")
    out = {}
    for name, cfg in SHAPES.items():
        out[name] = write_checkpoint(root / name, cfg, seed=1, norm_scale="realistic")
    out["sharded"] = write_checkpoint(root / "sharded", SHAPES["8B"], seed=1, shards=3, norm_scale="realistic")
    # Peaked logits: a large embedding / head makes greedy choices robust to rounding.
    out["peaked"] = write_checkpoint(root / "peaked", SHAPES["0.6B"], seed=2, embed_std=1.0)
    return out


@pytest.fixture(params=[False, True], ids=["plain", "fused"])
def fused(request):
    return request.param


_RUNNERS: dict = {}


def _load(path, fused, dtype="float32"):
    key = (str(path), fused, dtype)
    if key not in _RUNNERS:  # loading and compiling once per checkpoint keeps the suite fast
        _RUNNERS[key] = jax_impl.load(path, dtype=dtype, fused=fused)
    return _RUNNERS[key]


@pytest.mark.parametrize("name", ["0.6B", "8B", "awkward", "sharded"])
def test_logits_match_reference(ckpts, fused, name):
    ids = np.random.default_rng(0).integers(0, SHAPES.get(name, SHAPES["8B"]).vocab_size, size=(2, 11))
    got = _load(ckpts[name], fused).logits(ids)
    want = load_reference(ckpts[name]).logits(ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2e-4, np.abs(got - want).max() / scale


def test_logits_match_transformers(ckpts, fused):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = np.random.default_rng(1).integers(0, 1000, size=(2, 9))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpts["awkward"], dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = _load(ckpts["awkward"], fused).logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-4


def test_decode_steps_match_full_forward(ckpts, fused):
    """Prefill then one-token decode steps give, step by step, the logits of a full forward: the
    float64 reference's (and this path's own full forward within the same tolerance of it).

    Each side is held to the reference rather than to the other: at two of these eight steps the
    realistic q/k-norm scales make the logits ill-conditioned (numpy's own float32 forward is
    2.3e-5 and 3.9e-5 off its float64 one there, against ~1.5e-6 elsewhere), and two float32
    computations erring in opposite directions differed by 1.9e-4 on the H100 (fused path, each
    within 1.1e-4 of the reference)."""
    runner = _load(ckpts["8B"], fused)
    ref = load_reference(ckpts["8B"])
    model, cfg = runner.model, runner.config
    rng = np.random.default_rng(3)
    lengths = np.array([5, 9], np.int32)
    seqs = rng.integers(0, cfg.vocab_size, size=(2, 14))
    ids = np.zeros((2, 16), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = seqs[i, :n]
    caches = init_caches(cfg, 2, 32, model.dtype)
    _, caches = model.prefill(jnp.asarray(ids), jnp.asarray(lengths), caches, 32)
    pos = lengths.copy()
    for step in range(4):
        toks = seqs[np.arange(2), pos]
        h, caches = model.decode(jnp.asarray(toks, jnp.int32), jnp.asarray(pos), caches)
        got = np.asarray(model.logits(h))
        for b in range(2):
            prefix = seqs[b:b + 1, :pos[b] + 1]
            want = ref.logits(prefix)[0, -1]
            assert_close(got[b], want, "float32", what=f"decode step {step}, sequence {b}")
            assert_close(runner.logits(prefix)[0, -1], want, "float32", what=f"full forward {step}, sequence {b}")
        pos += 1


def test_greedy_matches_transformers(ckpts, fused):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpts["peaked"], dtype=torch.float32)
    prompts = [[5, 17, 33, 2], [100, 7, 7, 9, 41, 300, 12]]
    ours = _load(ckpts["peaked"], fused).generate(prompts, 12)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist()
        assert got == want


def test_batched_equals_one_by_one(ckpts, fused):
    runner = _load(ckpts["peaked"], fused)
    prompts = [[3, 4, 5], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], [7]]
    batched = runner.generate(prompts, 8)
    assert batched == [runner.generate([p], 8)[0] for p in prompts]


def test_eos_stops_and_is_kept(ckpts, fused):
    runner = _load(ckpts["peaked"], fused)
    free = runner.generate([[3, 4, 5]], 8)[0]
    eos = free[3]
    cut = runner.generate([[3, 4, 5]], 8, eos_token_id=eos)[0]
    assert cut == free[:free.index(eos) + 1]


# A checkpoint whose greedy runs do not repeat early (small random weights, no peaked head): an
# eos picked from the middle of a free run is first met there, in the decode loop, not at prefill.
EOS_CFG = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                      dtype="float32", max_position_embeddings=256)
EOS_MAX_NEW = 16


@pytest.fixture(scope="module")
def eos_runner(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("jax_eos") / "ckpt", EOS_CFG, seed=3)
    return jax_impl.load(path, dtype="float32", fused=False)


def _eos_steps(rows, eos):
    """Per row, the index of its first token in eos (None when there is none)."""
    return [next((i for i, t in enumerate(r) if t in eos), None) for r in rows]


def _pick_eos(free, first=5):
    """eos ids (one per row) first met at distinct decode steps >= first: (ids, step per row)."""
    n = len(free[0])
    for picks in itertools.product(range(first, n - 2), repeat=len(free)):
        if len(set(picks)) != len(picks):
            continue
        eos = {row[i] for row, i in zip(free, picks)}
        if _eos_steps(free, eos) == list(picks):
            return sorted(eos), list(picks)
    pytest.fail(f"no eos candidates in {free}")


@pytest.mark.parametrize("prompts", [[[3, 4, 5]], [[3, 4, 5], [9, 10, 11, 12, 13, 14]]], ids=["batch1", "batch2"])
def test_decode_loop_stops_at_an_eos_met_while_decoding(eos_runner, prompts):
    """An eos met at a decode step (not at prefill) marks its sequence done: the loop stops when
    the last sequence meets its eos, and each output ends at its eos. Outputs are trimmed at the
    first eos anyway, so the number of decode steps run is what shows a loop that never stops."""
    runner = eos_runner
    free = runner.generate(prompts, EOS_MAX_NEW)
    assert runner.last_stats["decode_steps"] == EOS_MAX_NEW - 1
    eos, steps = _pick_eos(free)
    cut = runner.generate(prompts, EOS_MAX_NEW, eos_token_id=eos)
    assert cut == [row[:i + 1] for row, i in zip(free, steps)], (eos, steps)
    assert runner.last_stats["decode_steps"] == max(steps), (
        f"eos {eos} first emitted at decode steps {steps}, but the loop ran {runner.last_stats['decode_steps']} "
        f"of at most {EOS_MAX_NEW - 1} steps")


def test_sampling_reproducible_and_in_allowed_set(ckpts, fused):
    runner = _load(ckpts["awkward"], fused)
    prompt = [1, 2, 3, 4]
    kwargs = dict(temperature=0.8, top_k=7, top_p=0.9)
    a = runner.generate([prompt], 24, seed=11, **kwargs)[0]
    assert a == runner.generate([prompt], 24, seed=11, **kwargs)[0]
    assert a != runner.generate([prompt], 24, seed=12, **kwargs)[0]
    logits = runner.logits(np.array([prompt + a[:-1]]))[0, len(prompt) - 1:]
    for t, (tok, row) in enumerate(zip(a, logits)):
        mask = allowed_mask(row, **kwargs)
        assert mask[tok], f"step {t}: token {tok} outside the top-k/top-p set {np.flatnonzero(mask)}"


def test_top_k_one_is_greedy(ckpts, fused):
    runner = _load(ckpts["peaked"], fused)
    greedy = runner.generate([[3, 4, 5]], 10)[0]
    assert runner.generate([[3, 4, 5]], 10, temperature=1.0, top_k=1, seed=5)[0] == greedy


def test_stream_equals_generate(ckpts, fused):
    runner = _load(ckpts["peaked"], fused)
    chunks = list(runner.generate_stream([3, 4, 5], 10, chunk=3))
    assert len(chunks) > 1
    assert sum(chunks, []) == runner.generate([[3, 4, 5]], 10)[0]
    # the prefill's token comes alone, before any decode step (and before the decode programs of a
    # new bucket compiled), then `chunk` tokens at a time
    assert [len(c) for c in chunks] == [1, 3, 3, 3]


def test_decode_resumes_exactly_after_idle_steps(ckpts, fused):
    """The decode loop tests its condition every `sync_every` steps; steps past the stop change
    nothing. One step per call (each call idles sync_every - 1 steps) must leave the same tokens,
    positions and caches, bit for bit, as one call for all steps."""
    runner = _load(ckpts["peaked"], fused)
    cfg, programs, state = runner.config, runner.programs, runner.state
    ids = jnp.asarray([[3, 4, 5, 0], [9, 10, 11, 12]], jnp.int32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    statics = dict(greedy=True, k_cap=0, use_top_p=False)
    eos, one, k0 = jnp.asarray([-1] * 8, jnp.int32), jnp.float32(1.0), jnp.int32(0)
    new = 8 + 3  # past one full inner loop

    def start():
        caches = init_caches(cfg, 2, 32, runner.model.dtype)
        return programs.prefill(state, ids, lengths, jnp.ones((2,), bool), caches, jax.random.key(0), one, one, k0,
                                eos, jnp.int32(new), **statics)

    whole = programs.decode(state, start(), jnp.int32(new), one, one, k0, eos, sync_every=8, **statics)
    ds = start()
    for stop in range(2, new + 1):
        ds = programs.decode(state, ds, jnp.int32(stop), one, one, k0, eos, sync_every=8, **statics)
        assert int(ds.step) == stop
    for name in ("step", "tokens", "offset", "done", "out"):
        np.testing.assert_array_equal(np.asarray(getattr(ds, name)), np.asarray(getattr(whole, name)), err_msg=name)
    for layer, ((k1, v1), (k2, v2)) in enumerate(zip(ds.caches, whole.caches)):
        np.testing.assert_array_equal(np.asarray(k1), np.asarray(k2), err_msg=f"layer {layer} k cache")
        np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2), err_msg=f"layer {layer} v cache")


def test_plan_calls_leave_no_idle_step():
    f, sync = decode_loop.plan_calls, decode_loop.SYNC
    assert f(1, 1) == [] and f(1, 2) == [(2, 1)] and f(1, 17) == [(17, sync)]
    assert f(1, 256) == [(241, sync), (253, 4), (256, 1)]
    for first in (1, 5):
        for stop in range(first, 300):
            calls = f(first, stop)
            assert len(calls) <= 3 and (not calls or calls[-1][0] == stop)
            start = first
            for end, s in calls:  # every call runs a whole number of its blocks
                assert (end - start) % s == 0 and end > start
                start = end


def test_a_new_length_or_budget_in_the_buckets_compiles_nothing(ckpts, fused):
    """After the first call, another prompt length, token budget or sampling value within the same
    buckets compiles nothing (the budget, the stop step and the sampling values are traced)."""
    from jax_impl.compilation import compile_seconds

    runner = _load(ckpts["awkward"], fused)
    runner.generate([[1, 2, 3, 4, 5]], 40)  # prompt bucket 16, cache 128: both decode programs
    runner.generate([[1, 2, 3]], 20, temperature=0.5, top_k=20, top_p=0.9, seed=1)
    before = compile_seconds(all_threads=True)
    runner.generate([[7, 8, 9, 10, 11, 12, 13, 14, 15]], 37)
    runner.generate([[7, 8]], 90)
    runner.generate([[4, 5, 6]], 25, temperature=0.9, top_k=9, top_p=0.5, seed=3)
    assert compile_seconds(all_threads=True) == before, \
        "a new length, budget or sampling value inside the buckets compiled"
    assert runner.last_stats["compile_s"] == 0.0


def test_first_runs_of_new_decode_programs_count_as_warm_up(ckpts, fused):
    """A new bucket's decode programs run once before decoding (loading them onto the device): that
    time is reported in compile_s, never in decode_s (the CLI's decode rate)."""
    runner = jax_impl.load(ckpts["awkward"], dtype="float32", fused=fused)  # its own: no bucket ready yet
    decode, delay = runner.programs.decode, 0.4

    def slow_first_runs(state, ds, stop, *args, **kw):
        if int(stop) <= int(ds.step):  # the warm-up runs: no step
            time.sleep(delay)
        return decode(state, ds, stop, *args, **kw)

    slow_first_runs.lower = decode.lower  # the new bucket's programs compile ahead (jax_impl.runner._compile_decode)
    runner.programs.decode = slow_first_runs
    runner.generate([[1, 2, 3, 4, 5]], 12)
    stats = runner.last_stats
    assert stats["decode_s"] < delay, stats
    assert stats["compile_s"] - stats["compile_first_s"] >= 3 * delay, stats
    runner.generate([[1, 2, 3]], 12)  # the same bucket: no warm-up
    assert runner.last_stats["compile_s"] == 0.0 and runner.last_stats["decode_s"] < delay


def test_a_new_buckets_decode_programs_compile_beside_the_prefill(ckpts, fused):
    """A new bucket's decode programs compile in threads of their own while the prefill compiles
    and runs (the call waits for the longest, not the sum); the decode that follows compiles
    nothing more, and the tokens are those of a runner that compiled the same bucket before."""
    from jax_impl.compilation import compile_seconds

    runner = jax_impl.load(ckpts["awkward"], dtype="float32", fused=fused)
    mine, every = compile_seconds(), compile_seconds(all_threads=True)
    out = runner.generate([[3, 1, 4, 1, 5, 9, 2, 6]], 23)
    mine, every = compile_seconds() - mine, compile_seconds(all_threads=True) - every
    assert every - mine > 0.0, "no decode program compiled outside the calling thread"
    assert runner.last_stats["compile_s"] >= runner.last_stats["compile_first_s"] > 0.0
    assert out == _load(ckpts["awkward"], fused).generate([[3, 1, 4, 1, 5, 9, 2, 6]], 23)


def test_warmup_at_load_compiles_the_buckets_of_later_calls():
    """load(..., warmup=[...]) compiles each shape's programs at load (a dict shape with the sampling
    to compile for, as the CLI passes it), its time in runner.warmup_s: later calls inside those
    buckets, other lengths and sampling values, compile nothing and report compile_s 0 (a fresh
    runner's first call compiles: see the test above)."""
    from jax_impl.compilation import compile_seconds

    cfg = dataclasses.replace(SHAPES["awkward"], num_hidden_layers=1)
    runner = jax_impl.load_random(cfg, dtype="float32", fused=False, warmup=[
        dict(batch=2, prompt_tokens=20, new_tokens=12, temperature=0.7, top_k=20, top_p=0.9)])
    assert runner.warmup_s > 0, runner.warmup_s
    before = compile_seconds(all_threads=True)
    for prompts, new, kw in [([[1, 2, 3, 4, 5] * 5, [6, 7]], 9, dict(temperature=0.7, top_k=20, top_p=0.9)),
                             ([[3, 1, 4] * 6, [5, 9]], 50, dict(temperature=0.5, top_k=9, top_p=0.5, seed=2))]:
        runner.generate(prompts, new, **kw)  # as warmed: batch bucket 2, prompt bucket 32, 128 cache rows
        assert runner.last_stats["compile_s"] == 0.0, (len(prompts), new, kw, runner.last_stats)
        assert runner.last_stats["first_token_s"] > 0.0, runner.last_stats
    assert compile_seconds(all_threads=True) == before, "a call inside the warmed buckets compiled"


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=1.5, temperature=1.0), "top_p"),
    (dict(prompts=[[1] * 600]), "maximum length"),
    (dict(prompts=[[5000]]), "outside"),
])
def test_bad_generate_args(ckpts, fused, bad, match):
    runner = _load(ckpts["awkward"], fused)
    args = dict(prompts=[[1, 2]], max_new_tokens=4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        runner.generate(args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_fused_bf16_error_within_twice_plain(ckpts):
    """bf16 logits of the fused model: error against float32 <= ~2x the plain bf16 model's."""
    ids = np.random.default_rng(4).integers(0, SHAPES["8B"].vocab_size, size=(2, 7))
    ref = _load(ckpts["8B"], False).logits(ids)
    plain = _load(ckpts["8B"], False, "bfloat16").logits(ids)
    fused_bf16 = _load(ckpts["8B"], True, "bfloat16").logits(ids)
    assert_lowp_close(fused_bf16, plain, ref, what="fused bf16 logits")


def test_fused_auto_is_plain_without_gpu(ckpts):
    runner = jax_impl.load(ckpts["awkward"], dtype="float32", fused="auto")
    if jax.default_backend() != "gpu":
        assert all(kind == "plain" for _, kind in runner.model.ops.paths)
    else:
        assert set(dict(runner.model.ops.paths).values()) == {"per-shape"}  # common.tiles decides each shape
