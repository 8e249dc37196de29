"""common.sampling: the one statement of the sampling rule (allowed_mask), the reference sampler,
and the validation of generate()'s arguments."""

from __future__ import annotations

import re

import numpy as np
import pytest

from common.sampling import GenerationArgsError, allowed_mask, check_generate_args, sample_numpy


def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_greedy_keeps_every_tied_maximum_and_samples_the_lowest_id():
    z = np.array([1.0, 3.0, 3.0, 0.0, 3.0 - 1e-9])
    np.testing.assert_array_equal(allowed_mask(z, 0.0), [False, True, True, False, False])
    # top_k/top_p are ignored by greedy
    np.testing.assert_array_equal(allowed_mask(z, 0.0, top_k=4, top_p=0.01), [False, True, True, False, False])
    rng = np.random.default_rng(0)
    assert {sample_numpy(z, 0.0, 0, 1.0, rng) for _ in range(5)} == {1}


def test_top_k_keeps_ties_at_the_kth_value():
    z = np.array([1.0, 2.0, 2.0, 3.0, 0.5])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=2), [False, True, True, True, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=1), [False, False, False, True, False])
    assert allowed_mask(z, 1.0, top_k=50).all()  # k beyond the vocabulary keeps everything
    assert allowed_mask(z, 1.0, top_k=0).all()  # 0 = off


def test_top_p_is_the_smallest_prefix_reaching_p():
    z = logits_of([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.45), [True, False, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.6), [True, True, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.85), [True, True, True, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.96), [True, True, True, True])
    assert allowed_mask(z, 1.0, top_p=1.0).all()


def _first(n, size):
    return np.arange(size) < n


@pytest.mark.parametrize("size", [4, 8])
def test_top_p_exact_boundary_keeps_the_prefix_that_reaches_p(size):
    """Equal logits give probabilities 1/size, exact in float64, as are their cumulative sums: when
    the mass of the first k tokens equals top_p exactly, those k tokens reach it and nothing more is
    kept; a hair above top_p needs the next token, a hair below still needs all k."""
    z = np.zeros(size)
    for k in range(1, size):
        top_p = k / size
        np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=top_p), _first(k, size), err_msg=f"top_p={top_p}")
        np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=top_p + 1e-12), _first(k + 1, size),
                                      err_msg=f"top_p={top_p}+1e-12")
        np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=top_p - 1e-12), _first(k, size),
                                      err_msg=f"top_p={top_p}-1e-12")
        # the temperature leaves equal logits equal
        np.testing.assert_array_equal(allowed_mask(z + 2.0, 0.7, top_p=top_p), _first(k, size))


def test_top_p_exact_boundary_after_zero_mass_tokens_and_top_k():
    # exp(-1000) underflows to exactly 0 in float64: the four others have probability 0.25 each,
    # and the zero-mass tokens in between do not move the boundary.
    z = np.array([0.0, -1000.0, 0.0, 0.0, -1000.0, 0.0])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.5), [True, False, True, False, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.75), [True, False, True, True, False, False])
    # top_k=4 keeps the four 3.0s (exactly 0.25 each after top-k); top_p=0.75 then keeps the first three
    z = np.array([3.0, 3.0, 1.0, 3.0, 3.0, 0.0])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=4, top_p=0.75), [True, True, False, True, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=4, top_p=0.5), [True, True, False, False, False, False])


def test_top_p_just_around_a_non_dyadic_boundary():
    # mass before each token (sorted): 0, 0.4, 0.7, 0.9, each within 1e-15 in float64
    z = logits_of([0.2, 0.4, 0.1, 0.3])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.4 - 1e-9), [False, True, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.4 + 1e-9), [False, True, False, True])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.7 - 1e-9), [False, True, False, True])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.7 + 1e-9), [True, True, False, True])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.9 + 1e-9), [True, True, True, True])


def test_top_p_always_keeps_the_most_likely_token():
    z = logits_of([0.1, 0.6, 0.3])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=1e-9), [False, True, False])
    # also when it is a near-certain token
    np.testing.assert_array_equal(allowed_mask(logits_of([1e-12, 1 - 2e-12, 1e-12]), 1.0, top_p=1e-12),
                                  [False, True, False])


def test_top_k_is_applied_before_top_p():
    # Full distribution: 0.4, 0.25, 0.2, 0.15. With top_p alone = 0.6, token 1 is kept (mass before it 0.4).
    # After top_k=2 the kept pair renormalizes to 0.615, 0.385, so top_p=0.6 keeps token 0 alone.
    z = logits_of([0.4, 0.25, 0.2, 0.15])
    assert allowed_mask(z, 1.0, top_p=0.6)[1]
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=2, top_p=0.6), [True, False, False, False])


def test_temperature_changes_what_top_p_keeps():
    z = logits_of([0.7, 0.2, 0.1])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.65), [True, False, False])
    np.testing.assert_array_equal(allowed_mask(z, 10.0, top_p=0.65), [True, True, False])  # flatter


def test_mask_works_over_leading_axes():
    z = np.stack([logits_of([0.5, 0.3, 0.2]), logits_of([0.2, 0.3, 0.5])])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_k=1), [[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(allowed_mask(z, 1.0, top_p=0.6), [[True, True, False], [False, True, True]])


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.8, 8, 0.7), (2.0, 3, 0.99), (0.5, 1, 1.0),
])
def test_sampler_never_leaves_the_mask_and_follows_the_distribution(temperature, top_k, top_p):
    rng = np.random.default_rng(123)
    z = rng.standard_normal(32) * 2.0
    z[[3, 4]] = z.max() + 0.5  # a tie at the top
    mask = allowed_mask(z, temperature, top_k, top_p)
    n = 4000
    draws = np.array([sample_numpy(z, temperature, top_k, top_p, rng) for _ in range(n)])
    assert mask[draws].all(), f"sampled {sorted(set(draws[~mask[draws]].tolist()))} outside the mask"
    p = np.where(mask, np.exp((z - z.max()) / temperature), 0.0)
    p /= p.sum()
    freq = np.bincount(draws, minlength=len(z)) / n
    # 4000 draws: the binomial standard deviation is at most 0.008; 5 sigma
    np.testing.assert_allclose(freq, p, atol=0.04)


def test_sampler_is_reproducible_with_a_seed():
    z = np.random.default_rng(0).standard_normal(100)
    a = [sample_numpy(z, 1.0, 0, 0.9, np.random.default_rng(7)) for _ in range(3)]
    seq = lambda s: [sample_numpy(z, 1.0, 0, 0.9, r) for r in [np.random.default_rng(s)] for _ in range(20)]
    assert seq(7) == seq(7)
    assert seq(7) != seq(8)
    assert len(set(a)) == 1


# ----- the twins' samplers draw exactly the nucleus ---------------------------------------------
# Each case: logits, temperature, top_k, top_p and the allowed set computed by hand. Every kept
# token has probability >= 0.16 after renormalization, so in DRAWS draws each one shows up (a
# kept token is missed with probability below 0.84**2000 ~ 1e-150): a sampler keeping one token
# too few fails, as does one keeping a token too many (it is drawn too). Boundaries are clear
# of float32 rounding except cases "exact" and "k then exact", whose probabilities (1/4) and sums
# are exact in float32.

def _probs_64():
    p = np.full(64, 0.05 / 59)
    p[[7, 19, 33, 50, 61]] = [0.3, 0.25, 0.2, 0.15, 0.05]
    return p


NUCLEUS_CASES = {
    # mass before each (sorted): 0, .4, .7, .9, .95 -> the first three reach 0.8
    "p": (logits_of([0.05, 0.3, 0.05, 0.4, 0.2]), 1.0, 0, 0.8, {3, 1, 4}),
    # top_k=3 renormalizes to .47, .29, .24: before 0, .47, .76 -> two reach 0.7
    "k then p": (logits_of([0.4, 0.25, 0.2, 0.15]), 1.0, 3, 0.7, {0, 1}),
    # temperature 2: p ~ sqrt -> .47, .33, .19: before 0, .47, .81 -> two reach 0.75
    "temperature": (logits_of([0.6, 0.3, 0.1]), 2.0, 0, 0.75, {0, 1}),
    # four equal logits: 0.25 each, the first two reach exactly 0.5
    "exact": (np.zeros(4), 1.0, 0, 0.5, {0, 1}),
    # top_k=5 keeps all six (the two -200s tie at the 5th value); 0.25 each for the four zeros and
    # exp(-200) = 0 in float32: the mass before id 2 is exactly 0.5, not < top_p, so ids 0, 1 only
    "k then exact": (np.array([0.0, 0.0, 0.0, 0.0, -200.0, -200.0]), 1.0, 5, 0.5, {0, 1}),
    # the most likely token alone is past top_p: it is kept
    "top token only": (logits_of([0.9, 0.1]), 1.0, 0, 0.5, {0}),
    # 64 tokens: before 0, .3, .55, .75, .9 -> four reach 0.85, scattered over the vocabulary
    "wide": (np.log(_probs_64()), 1.0, 0, 0.85, {7, 19, 33, 50}),
}
DRAWS = 2000


def _check_nucleus(case, draws):
    z, temperature, _, _, want = NUCLEUS_CASES[case]
    draws = np.asarray(draws)
    assert draws.shape == (DRAWS,)
    got = set(draws.tolist())
    assert got == want, (f"{case}: sampled {sorted(got)}, the nucleus is {sorted(want)} (missing "
                         f"{sorted(want - got)}, outside {sorted(got - want)})")
    p = np.where(np.isin(np.arange(len(z)), list(want)), np.exp((z - z.max()) / temperature), 0.0)
    freq = np.bincount(draws, minlength=len(z)) / DRAWS
    # the binomial standard deviation is at most 0.012 for 2000 draws: 5 sigma
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.06, err_msg=case)


@pytest.mark.parametrize("case", list(NUCLEUS_CASES))
def test_nucleus_cases_match_the_spec(case):
    z, temperature, top_k, top_p, want = NUCLEUS_CASES[case]
    np.testing.assert_array_equal(np.flatnonzero(allowed_mask(z, temperature, top_k, top_p)), sorted(want))


@pytest.mark.parametrize("case", list(NUCLEUS_CASES))
def test_torch_sampler_draws_exactly_the_nucleus(case):
    torch = pytest.importorskip("torch")
    from torch_impl.sampling import sample

    z, temperature, top_k, top_p, _ = NUCLEUS_CASES[case]
    logits = torch.as_tensor(np.tile(z, (DRAWS, 1)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    _check_nucleus(case, sample(logits, temperature, top_k, top_p, gen).numpy())


@pytest.mark.parametrize("case", list(NUCLEUS_CASES))
def test_jax_sampler_draws_exactly_the_nucleus(case):
    jax = pytest.importorskip("jax")
    from jax_impl.sampling import k_cap_for, sample

    z, temperature, top_k, top_p, _ = NUCLEUS_CASES[case]
    logits = jax.numpy.asarray(np.tile(z, (DRAWS, 1)), dtype=jax.numpy.float32)
    # traced as in the decode loop (and compiled once: faster than op-by-op on CPU); top_k traced too
    jitted = jax.jit(sample, static_argnames=("greedy", "k_cap", "use_top_p"))
    toks = jitted(logits, jax.random.key(0), jax.numpy.float32(temperature), jax.numpy.float32(top_p),
                  jax.numpy.int32(top_k), greedy=False, k_cap=k_cap_for(top_k, logits.shape[-1]),
                  use_top_p=top_p < 1.0)
    _check_nucleus(case, np.asarray(toks))


TOP_K_CASES = [c for c in NUCLEUS_CASES if NUCLEUS_CASES[c][2] > 0]
GRID = 64  # rows of one deterministic draw: u[:, 0] = (i + 0.5) / GRID


@pytest.mark.parametrize("fused", [False, True], ids=["torch ops", "draw kernel"])
@pytest.mark.parametrize("case", TOP_K_CASES)
def test_torch_top_k_draw_over_a_grid_of_uniforms_is_the_nucleus(case, fused):
    """torch_impl's top-k path (the torch ops and the draw kernel) by the inverse of the kept tokens'
    cumulative weights at evenly spaced uniforms: every kept token is drawn, nothing else, each in
    its share of the grid (deterministic, no generator)."""
    torch = pytest.importorskip("torch")
    from torch_impl import sampling

    z, temperature, top_k, top_p, want = NUCLEUS_CASES[case]
    zt = torch.as_tensor(np.tile(z / temperature, (GRID, 1)), dtype=torch.float32)
    vals, ids = sampling.candidates(zt, min(top_k, zt.shape[-1]))
    u = torch.stack([(torch.arange(GRID) + 0.5) / GRID, torch.full((GRID,), 0.5)], dim=-1)
    if fused:
        pytest.importorskip("triton")
        from torch_impl.kernels.draw import draw_top_k

        got = draw_top_k(zt, vals.contiguous(), ids.contiguous(), u, top_p).numpy()
    else:
        got = sampling._draw_top_k(zt, sampling._Candidates(zt, vals, ids, top_p), u).numpy()
    assert set(got.tolist()) == want, f"{case}: drew {sorted(set(got.tolist()))}, the nucleus is {sorted(want)}"
    p = np.where(np.isin(np.arange(len(z)), list(want)), np.exp((z - z.max()) / temperature), 0.0)
    np.testing.assert_allclose(np.bincount(got, minlength=len(z)) / GRID, p / p.sum(), atol=1.0 / GRID)
    np.testing.assert_array_equal(np.flatnonzero(sampling.top_k_nucleus(zt[:1], top_k, top_p)[0].numpy()),
                                  sorted(want))


# ----- argument validation -----------------------------------------------------------------------

GOOD = dict(temperature=0.0, top_k=0, top_p=1.0, vocab_size=100, max_len=16)


# Each argument at the edge of its range, and one step past it: (prompts, max_new, over) valid,
# then invalid, and the error's needle. A check off by one either way fails one of the two.
EDGES = {
    "length": (([[1] * 8, [4]], 8, {}), ([[1] * 9, [4]], 8, {}), "prompts[0]: 9 prompt tokens + max_new_tokens=8"),
    "token id": ((([99],), 15, {}), (([100],), 15, {}), "prompts[0]: token id 100 outside [0, 100)"),
    "lowest id": (([[0]], 1, {}), ([[-1]], 1, {}), "prompts[0]: token id -1"),
    "max_new_tokens": (([[1]], 1, {}), ([[1]], 0, {}), "max_new_tokens=0"),
    "temperature": (([[1]], 4, {"temperature": 0.0}), ([[1]], 4, {"temperature": -1e-9}), "temperature=-1e-09"),
    "top_k": (([[1]], 4, {"temperature": 1.5, "top_k": 0}), ([[1]], 4, {"temperature": 1.5, "top_k": -1}), "top_k=-1"),
    "top_p high": (([[1]], 4, {"top_p": 1.0}), ([[1]], 4, {"top_p": 1.0 + 1e-9}), "top_p=1.000000001"),
    "top_p low": (([[1]], 4, {"top_p": 1e-9}), ([[1]], 4, {"top_p": 0.0}), "top_p=0.0"),
}


@pytest.mark.parametrize("edge", list(EDGES))
def test_valid_arguments_pass(edge):
    (prompts, max_new, over), (bad_prompts, bad_max_new, bad_over), needle = EDGES[edge]
    assert check_generate_args(prompts, max_new, **{**GOOD, **over}) is None
    with pytest.raises(GenerationArgsError, match=re.escape(needle)):
        check_generate_args(bad_prompts, bad_max_new, **{**GOOD, **bad_over})


@pytest.mark.parametrize("prompts, max_new, over, needle", [
    ([], 4, {}, "prompts: expected a non-empty list"),
    ("abc", 4, {}, "prompts: expected a non-empty list"),
    ([[1], []], 4, {}, "prompts[1]: empty prompt"),
    ([[1, 100]], 4, {}, "prompts[0]: token id 100 outside [0, 100)"),
    ([[-1]], 4, {}, "prompts[0]: token id -1 outside"),
    ([[1] * 10], 7, {}, "prompts[0]: 10 prompt tokens + max_new_tokens=7 exceed the maximum length 16"),
    ([[1]], 0, {}, "max_new_tokens=0: expected an integer >= 1"),
    ([[1]], 2.0, {}, "max_new_tokens=2.0"),
    ([[1]], 4, {"temperature": -0.1}, "temperature=-0.1"),
    ([[1]], 4, {"temperature": float("nan")}, "temperature=nan"),
    ([[1]], 4, {"top_k": -1}, "top_k=-1"),
    ([[1]], 4, {"top_k": 2.5}, "top_k=2.5"),
    ([[1]], 4, {"top_p": 0.0}, "top_p=0.0: expected a value in (0, 1]"),
    ([[1]], 4, {"top_p": 1.5}, "top_p=1.5"),
    ([[1]], 4, {"top_p": float("nan")}, "top_p=nan"),
])
def test_bad_arguments_name_the_argument(prompts, max_new, over, needle):
    with pytest.raises(GenerationArgsError) as e:
        check_generate_args(prompts, max_new, **{**GOOD, **over})
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


# ----- jax_impl: top-p on top-k's candidates, the vocabulary sort only past k_cap ties ----------

def _jax_kept(z, temperature, top_k, top_p):
    jax = pytest.importorskip("jax")
    from jax_impl.sampling import filtered, k_cap_for

    f = jax.jit(filtered, static_argnames=("k_cap", "use_top_p"))
    out = f(jax.numpy.asarray(z, jax.numpy.float32), jax.numpy.float32(temperature), jax.numpy.float32(top_p),
            jax.numpy.int32(top_k), k_cap=k_cap_for(top_k, z.shape[-1]), use_top_p=top_p < 1.0)
    return np.isfinite(np.asarray(out))


@pytest.mark.parametrize("top_k,top_p", [(1, 0.9), (20, 0.95), (40, 0.7), (64, 0.5), (100, 0.9)])
def test_jax_top_p_on_candidates_keeps_the_spec_set(top_k, top_p):
    """Logits rounded to bfloat16 (many ties, as a bf16 lm_head gives) over 2,000 tokens: the kept set
    is common.sampling's, on the candidates' path (a random row has few ties at the k-th value)."""
    rng = np.random.default_rng(top_k)
    z = rng.standard_normal((6, 2000)).astype(np.float32) * 3
    z = np.asarray(__import__("ml_dtypes").bfloat16(z)).astype(np.float32)
    for temperature in (0.7, 1.0):
        want = allowed_mask(z, temperature, top_k, top_p)
        np.testing.assert_array_equal(_jax_kept(z, temperature, top_k, top_p), want)


def test_jax_top_p_with_more_ties_at_the_kth_value_than_candidates():
    """100 tokens tie at the top, top_k=40 (64 candidates): top-k keeps all 100, so the nucleus comes
    from the vocabulary sort; top_p=0.3 keeps the 30 lowest ids of the tie."""
    z = np.zeros((2, 500), np.float32)
    z[:, 100:200] = 5.0
    z[1, 7] = 6.0  # a second row with one token above the tie: still 101 kept by top-k
    want = allowed_mask(z, 1.0, 40, 0.3)
    assert want[0].sum() == 30 and want[0, 100:130].all()
    np.testing.assert_array_equal(_jax_kept(z, 1.0, 40, 0.3), want)


# ----- torch_impl: top-k then top-p from top-k's candidates, ties at the k-th value counted -------

def _torch_kept(z, temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from torch_impl.sampling import top_k_nucleus

    t = torch.as_tensor(z, dtype=torch.float32) / temperature
    return top_k_nucleus(t, min(top_k, z.shape[-1]), top_p).numpy()


@pytest.mark.parametrize("top_k,top_p", [(1, 0.9), (20, 0.95), (40, 0.7), (64, 0.5), (100, 0.9)])
def test_torch_top_k_nucleus_keeps_the_spec_set(top_k, top_p):
    """As the jax test above: bf16-rounded logits (ties among the kept tokens and at the k-th value)."""
    rng = np.random.default_rng(top_k)
    z = rng.standard_normal((6, 2000)).astype(np.float32) * 3
    z = np.asarray(__import__("ml_dtypes").bfloat16(z)).astype(np.float32)
    for temperature in (0.7, 1.0):
        np.testing.assert_array_equal(_torch_kept(z, temperature, top_k, top_p),
                                      allowed_mask(z, temperature, top_k, top_p))


@pytest.mark.parametrize("top_p", [0.305, 0.955])
def test_torch_top_k_nucleus_with_ties_past_the_candidates(top_p):
    """100 tokens tie at the k-th value (top_k=40): top-k keeps all of them, top-p the lowest ids
    among them that fit, after the tokens above the tie (top_p clear of float32 rounding: each tied
    token has 1/100 in the first row)."""
    z = np.zeros((2, 500), np.float32)
    z[:, 100:200] = 5.0
    z[1, [7, 450]] = 6.0
    want = allowed_mask(z, 1.0, 40, top_p)
    assert want[0].sum() == (31 if top_p < 0.5 else 96)
    np.testing.assert_array_equal(_torch_kept(z, 1.0, 40, top_p), want)


@pytest.mark.parametrize("top_p", [0.305, 0.955, 1.0])
def test_torch_sampler_draws_tied_tokens_past_the_candidates(top_p):
    """The sampler draws the tied group as one outcome, then one of its kept tokens uniformly: every
    kept token is drawn, nothing else, and each tied one about equally often."""
    torch = pytest.importorskip("torch")
    from torch_impl.sampling import sample

    z = np.zeros(500, np.float32)
    z[100:200] = 5.0
    z[[7, 450]] = 6.0
    want = allowed_mask(z[None], 1.0, 40, top_p)[0]
    draws = 20000
    gen = torch.Generator().manual_seed(3)
    got = sample(torch.as_tensor(np.tile(z, (draws, 1))), 1.0, 40, top_p, gen).numpy()
    assert set(got.tolist()) == set(np.flatnonzero(want).tolist())
    p = np.where(want, np.exp(z - z.max()), 0.0)
    freq = np.bincount(got, minlength=z.size) / draws
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)
