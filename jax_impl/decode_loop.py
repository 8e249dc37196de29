"""Compiled programs of the jax model: full forward, prefill, and the decode loop.

`Programs(graphdef)` holds the three jitted programs. The whole decode loop is one jit: it stops
when every sequence has emitted an eos or `stop_step` is reached (a streaming caller advances
`stop_step` chunk by chunk; a plain generate() runs to the token budget). The model state is passed
as arguments (never closed over as constants), the caches are donated so XLA updates them in place.

Few programs, whatever the lengths: the token budget (`DecodeState.limit`), the stop step and the
sampling values (temperature, top-p, top-k) are traced; only the shapes (batch, prompt and cache
buckets, jax_impl.runner), the greedy / top-p switches, top-k's static bound and the inner trip
count pick a program. The loop is two loops: an outer `lax.while_loop` that tests "all done or stop
reached", around an inner `lax.fori_loop` of `sync_every` steps. A while loop's test is read back by
the host before every iteration (a device-to-host copy and a wait for the GPU to drain); a loop
with a static trip count is not, so the host queues the inner steps back to back. Calls run whole
blocks of 16 steps, then the rest in blocks of 4 and single steps (`plan_calls`): three decode
programs per shape bucket cover every budget (the runner compiles them together). Inner steps past the stop (or past every eos) are idle: the state is kept, their token
goes to a column of `out` past the emitted ones, and the one cache row they write is the row the
next real step writes with the same values (same token, same position). Measured on an H100,
Qwen3-0.6B batch 1, one process: 837.5 us per step testing after every step, 823.9 testing every 16
steps (docs/MEASUREMENTS.md).

Under tensor parallelism (jax_impl/parallel.py) each program's body, the whole loop included, runs
on every rank of the mesh in one shard_map: the model's collectives are inside it, and the host
sees one program as on one device.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_impl.parallel import CACHE_SPEC
from jax_impl.sampling import sample

SYNC = 16  # decode steps per test of the loop condition (whole blocks); the rest in blocks of 4, then 1
SYNC_SIZES = (SYNC, 4, 1)  # the decode programs of one shape bucket: every budget runs on these three


def plan_calls(first: int, stop: int) -> list[tuple[int, int]]:
    """(stop step, sync_every) of the decode calls that run steps first .. stop - 1 with no idle step:
    whole blocks of 16 steps, then of 4, then single steps (at most six extra tests of the condition;
    255 steps: 15 x 16, 3 x 4, 3 x 1)."""
    n, step, calls = max(0, stop - first), first, []
    for sync in SYNC_SIZES:
        if n // sync:
            step += n // sync * sync
            calls.append((step, sync))
            n %= sync
    return calls


class Programs:
    """The compiled programs of one model graph: `forward_logits`, `prefill` and `decode` below,
    each jitted with the graph bound, called without it (`programs.decode(state, ds, ...)`).

    The graph is bound once rather than passed as a static argument: jit hashes its static
    arguments on every call, and an nnx GraphDef hashes its whole tree (504 us per call for
    Qwen3-0.6B's graph on the host of the H100 machine), time in which the GPU waits.
    """

    def __init__(self, graphdef, parallel=None):
        """parallel: a jax_impl.parallel.TensorParallel to run each program on every rank of its
        mesh (shard_map): the state split as it places it, the caches on the kv heads, the rest
        (token ids, sampling values, the decode state's tokens and flags) replicated."""
        fwd, pre, dec = (partial(f, graphdef) for f in (forward_logits, prefill, decode))
        if parallel is not None:
            rep, kv = P(), CACHE_SPEC
            state = DecodeState(rep, rep, rep, rep, rep, rep, kv, rep)
            fwd = parallel.program(fwd, (rep, rep, kv), rep)
            pre = parallel.program(pre, (rep, rep, rep, kv) + (rep,) * 6, state)
            dec = parallel.program(dec, (state,) + (rep,) * 5, state)
        self.forward_logits = jax.jit(fwd)
        self.prefill = jax.jit(pre, donate_argnames=("caches",), static_argnames=("greedy", "k_cap", "use_top_p"))
        self.decode = jax.jit(dec, donate_argnames=("ds",),
                              static_argnames=("greedy", "k_cap", "use_top_p", "sync_every"))


class DecodeState(NamedTuple):
    step: jax.Array  # () int32: index of the next token to emit in `out`
    limit: jax.Array  # () int32: the token budget (max_new_tokens), traced
    tokens: jax.Array  # [B] last emitted token
    offset: jax.Array  # [B] position of `tokens` minus `step` (every step moves both by one)
    done: jax.Array  # [B] bool: emitted an eos (or a padding row of the batch bucket)
    out: jax.Array  # [B, cache rows + 1] emitted tokens (eos_ids[0] after done); columns past the
    #                 budget are spare, where idle steps write
    caches: list  # per layer (k, v)
    key: jax.Array


def forward_logits(graphdef, state, ids, lengths, caches):
    """Full causal forward of right-padded ids [B, L] -> float32 logits [B, L, vocab]."""
    model = nnx.merge(graphdef, state)
    h, _ = model.prefill(ids, lengths, caches, caches[0][0].shape[1])
    return model.full_logits(h)


def prefill(graphdef, state, ids, lengths, active, caches, key, temperature, top_p, top_k, eos_ids, limit, *,
            greedy: bool, k_cap: int, use_top_p: bool) -> DecodeState:
    """Run the prompts, sample the first new token, and return the decode loop's start state.

    ids [B, L] right-padded to the prompt bucket, lengths [B] (>= 1), active [B] bool (False: a
    padding row of the batch bucket, done from the start), limit: the token budget (traced)."""
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    rows = caches[0][0].shape[1]
    h, caches = model.prefill(ids, lengths, caches, rows)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, hidden]
    tok = sample(model.full_logits(last), jax.random.fold_in(key, 0), temperature, top_p, top_k,
                 greedy=greedy, k_cap=k_cap, use_top_p=use_top_p)
    out = jnp.zeros((b, rows + 1), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids) | ~active
    return DecodeState(jnp.int32(1), jnp.asarray(limit, jnp.int32), tok, lengths.astype(jnp.int32) - 1, done, out,
                       caches, key)


def decode(graphdef, state, ds: DecodeState, stop_step, temperature, top_p, top_k, eos_ids, *, greedy: bool,
           k_cap: int, use_top_p: bool, sync_every: int = SYNC) -> DecodeState:
    """Decode until every sequence is done or min(stop_step, the budget) tokens have been emitted,
    testing that every `sync_every` steps (plan_calls leaves no idle step)."""
    model = nnx.merge(graphdef, state)
    stop = jnp.minimum(jnp.minimum(stop_step, ds.limit), ds.out.shape[1] - 1)

    def cond(s: DecodeState):
        return (s.step < stop) & ~jnp.all(s.done)

    def step(_, s: DecodeState):
        active = cond(s)  # () bool: False on the idle tail of an inner loop
        h, caches = model.decode(s.tokens, s.offset + s.step, s.caches)
        tok = sample(model.full_logits(h), jax.random.fold_in(s.key, s.step), temperature, top_p, top_k,
                     greedy=greedy, k_cap=k_cap, use_top_p=use_top_p)
        tok = jnp.where(s.done | ~active, jnp.where(active, eos_ids[0], s.tokens), tok)
        # An idle step writes its kept tokens at column `step`: past the emitted ones, overwritten
        # by the next real step, or a spare column past the budget.
        out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step))
        done = s.done | (active & jnp.isin(tok, eos_ids))
        return DecodeState(s.step + active.astype(jnp.int32), s.limit, tok, s.offset, done, out, caches, s.key)

    return jax.lax.while_loop(cond, lambda s: jax.lax.fori_loop(0, sync_every, step, s), ds)
