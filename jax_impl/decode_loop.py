"""Compiled programs of the jax model: full forward, prefill, and the decode loop.

`Programs(graphdef)` holds the three jitted programs. The whole decode loop is one jit: it stops
when every sequence has emitted an eos or `stop_step` is reached (a streaming caller advances
`stop_step` chunk by chunk; a plain generate() runs to the token budget in one call). The model
state is passed as arguments (never closed over as constants), the caches are donated so XLA
updates them in place.

The loop is two loops: an outer `lax.while_loop` that tests "all done or stop reached", around an
inner `lax.fori_loop` of `sync_every` steps (see `steps_per_test`). A while loop's test is read
back by the host before every iteration (a device-to-host copy and a wait for the GPU to drain);
a loop with a static trip count is not, so the host queues the inner steps back to back. Inner
steps past the stop (or past every eos) are idle: the state is kept, their token goes to a column
of `out` past the emitted ones, and the one cache row they write is the row the next real step
writes with the same values (same token, same position). Measured on an H100, Qwen3-0.6B batch
1, one process: 837.5 us per step testing after every step, 823.9 testing every 16 steps
(docs/MEASUREMENTS.md).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.sampling import sample

SYNC_RANGE = (8, 32)  # decode steps per test of the loop condition: fewest and most


def steps_per_test(n: int) -> int:
    """The inner trip count for a decode call of n steps: a divisor of n in SYNC_RANGE where there
    is one (no idle step unless every sequence stops early), else the one leaving the fewest idle
    steps (the larger on a tie); n itself below the range."""
    lo, hi = SYNC_RANGE
    if n <= lo:
        return max(1, n)
    return min(range(lo, hi + 1), key=lambda d: (-n % d, -d))


class Programs:
    """The compiled programs of one model graph: `forward_logits`, `prefill` and `decode` below,
    each jitted with the graph bound, called without it (`programs.decode(state, ds, ...)`).

    The graph is bound once rather than passed as a static argument: jit hashes its static
    arguments on every call, and an nnx GraphDef hashes its whole tree (504 us per call for
    Qwen3-0.6B's graph on the host of the H100 machine), time in which the GPU waits.
    """

    def __init__(self, graphdef):
        self.forward_logits = jax.jit(partial(forward_logits, graphdef))
        self.prefill = jax.jit(partial(prefill, graphdef), donate_argnames=("caches",),
                               static_argnames=("max_new", "greedy", "top_k", "use_top_p"))
        self.decode = jax.jit(partial(decode, graphdef), donate_argnames=("ds",),
                              static_argnames=("greedy", "top_k", "use_top_p", "sync_every"))


class DecodeState(NamedTuple):
    step: jax.Array  # () int32: index of the next token to emit in `out`
    tokens: jax.Array  # [B] last emitted token
    offset: jax.Array  # [B] position of `tokens` minus `step` (every step moves both by one)
    done: jax.Array  # [B] bool: emitted an eos
    out: jax.Array  # [B, max_new + 1] emitted tokens (eos_pad after done); the last column is
    #                 spare, where an idle step at step == max_new writes
    caches: list  # per layer (k, v)
    key: jax.Array


def forward_logits(graphdef, state, ids, lengths, caches):
    """Full causal forward of right-padded ids [B, L] -> float32 logits [B, L, vocab]."""
    model = nnx.merge(graphdef, state)
    h, _ = model.prefill(ids, lengths, caches, caches[0][0].shape[1])
    return model.logits(h)


def prefill(graphdef, state, ids, lengths, caches, key, temperature, top_p, eos_ids, *, max_new: int,
            greedy: bool, top_k: int, use_top_p: bool) -> DecodeState:
    """Run the prompts, sample the first new token, and return the decode loop's start state."""
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    h, caches = model.prefill(ids, lengths, caches, caches[0][0].shape[1])
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, hidden]
    tok = sample(model.logits(last), jax.random.fold_in(key, 0), temperature, top_p,
                 greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    out = jnp.zeros((b, max_new + 1), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)
    return DecodeState(jnp.int32(1), tok, lengths.astype(jnp.int32) - 1, done, out, caches, key)


def decode(graphdef, state, ds: DecodeState, stop_step, temperature, top_p, eos_ids, *, greedy: bool,
           top_k: int, use_top_p: bool, sync_every: int = 16) -> DecodeState:
    """Decode until every sequence is done or `stop_step` tokens have been emitted, testing that
    every `sync_every` steps (steps_per_test(stop_step - ds.step) leaves no idle step)."""
    model = nnx.merge(graphdef, state)
    stop = jnp.minimum(stop_step, ds.out.shape[1] - 1)

    def cond(s: DecodeState):
        return (s.step < stop) & ~jnp.all(s.done)

    def step(_, s: DecodeState):
        active = cond(s)  # () bool: False on the idle tail of an inner loop
        h, caches = model.decode(s.tokens, s.offset + s.step, s.caches)
        tok = sample(model.logits(h), jax.random.fold_in(s.key, s.step), temperature, top_p,
                     greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        tok = jnp.where(s.done | ~active, jnp.where(active, eos_ids[0], s.tokens), tok)
        # An idle step writes its kept tokens at column `step`: past the emitted ones, overwritten
        # by the next real step, or the spare last column.
        out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step))
        done = s.done | (active & jnp.isin(tok, eos_ids))
        return DecodeState(s.step + active.astype(jnp.int32), tok, s.offset, done, out, caches, s.key)

    return jax.lax.while_loop(cond, lambda s: jax.lax.fori_loop(0, sync_every, step, s), ds)
