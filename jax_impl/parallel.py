"""Tensor parallelism in one process: a Mesh over the first N local devices, the parameters split as
common.weights' plan says (common.sharding), and the compiled programs run per rank in shard_map.

Layout. Every leaf of the model state is stacked on a new leading axis of N, sharded over the mesh
axis "tp": rank r's slice is what common.sharding.take_shard gives rank r - column shards of w_qkv
(its q, k and v rows of whole kv-head groups) and w_gate_up, row shards of w_o and w_down, the norms
whole. Inside shard_map each rank drops that axis and sees a model of shard_config's shapes: the
Pallas kernels and the plain ops run unchanged on its heads and its part of the intermediate size.
Packed and quantized weights (QWeight: values with their per-row or block scales) need no sharding
rule of their own: a rank's shard is a whole parameter.
The KV caches are the global [B, rows, Hkv, D] split on the head axis (a rank's kv heads are
contiguous, the order of its w_qkv shard). The row-parallel projections return partial sums that
`jax.lax.psum` adds in the activation dtype (as nano-vllm's and vLLM's all-reduce), the residual
added once after it (model.DecoderLayer.row_parallel).
Embedding and head: the embedding is whole on every rank (the lookup needs no collective). The head
is "vocab" by default, as torch_impl's and nano-vllm's (rank r holds ceil(V / N) rows, padded to
that count on the last rank; the logits are all-gathered: 1/N of the head's bytes per rank and one
all-gather per step; with tied embeddings the head is then a copy of the embedding's rows), or
"replicated" (every rank computes all the logits and samples the same token with the same key: no
collective, the head's bytes read by every rank).
"""

from __future__ import annotations

import dataclasses
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.config import Qwen3Config
from common.formats import QWeight
from common.sharding import (TensorParallelError, check_lm_head_shard, check_tensor_parallel, shard_config, take_shard,
                             vocab_shard)
from jax_impl import arrays  # noqa: F401  (registers QWeight as a pytree)

AXIS = "tp"
CACHE_SPEC = P(None, None, AXIS, None)  # [B, rows, Hkv, D]: split on the kv heads


def shard_map(f, *, mesh, in_specs, out_specs):
    """jax.shard_map (jax >= 0.6), else jax.experimental.shard_map, with the replication check off:
    the Pallas calls carry no varying-axes rule, and every replicated output is made equal on
    every rank by a collective (psum, all_gather) or computed from equal values."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental  # noqa: PLC0415

    return experimental(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def mesh_devices(size: int, devices=None) -> list:
    """The first `size` of `devices` (default: this process's local devices), all of one kind."""
    devices = list(jax.local_devices() if devices is None else devices)
    if size > len(devices):
        seen = ", ".join(f"{d.device_kind} ({d.platform})" for d in devices[:8]) + (", ..." if len(devices) > 8 else "")
        raise TensorParallelError(f"tensor_parallel_size={size} but this process sees {len(devices)} device"
                                  f"{'' if len(devices) == 1 else 's'}: {seen}")
    chosen = devices[:size]
    kinds = sorted({f"{d.device_kind} ({d.platform})" for d in chosen})
    if len(kinds) > 1:
        raise TensorParallelError(f"tensor_parallel_size={size}: the first {size} devices are of different kinds "
                                  f"({', '.join(kinds)}); tensor parallelism needs one kind (select the devices "
                                  f"with CUDA_VISIBLE_DEVICES)")
    return chosen


def _psum(x):
    return jax.lax.psum(x, AXIS)


def _gather_vocab(logits, vocab: int):
    """Each rank's logits [..., ceil(V / N)] -> the whole vocabulary [..., V] on every rank."""
    return jax.lax.all_gather(logits, AXIS, axis=logits.ndim - 1, tiled=True)[..., :vocab]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A mesh of `size` devices and how the model runs on it; `TensorParallel.create` checks the size."""

    cfg: Qwen3Config  # the whole model's
    size: int
    mesh: Mesh
    lm_head: str = "vocab"

    @classmethod
    def create(cls, cfg: Qwen3Config, size, *, fmt: str = "bf16", lm_head: str = "vocab",
               devices=None) -> "TensorParallel | None":
        """None for size 1 (one device, nothing sharded); else a mesh over the first `size` devices,
        after checking that the model splits into `size` (common.sharding.check_tensor_parallel)."""
        size = check_tensor_parallel(cfg, size, fmt)
        check_lm_head_shard(lm_head)
        if size == 1:
            return None
        return cls(cfg, size, Mesh(np.array(mesh_devices(size, devices)), (AXIS,)), lm_head)

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    @property
    def rank_config(self) -> Qwen3Config:
        """The shapes one rank computes with (its heads, its part of the intermediate size)."""
        return shard_config(self.cfg, self.size)

    @property
    def cache_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, CACHE_SPEC)

    def collectives(self) -> dict:
        """The model's hooks (jax_impl.model.Qwen3's keyword arguments)."""
        gather = partial(_gather_vocab, vocab=self.cfg.vocab_size) if self.lm_head == "vocab" else None
        return dict(reduce=_psum, gather_vocab=gather)

    # ----- parameters ------------------------------------------------------------------------------
    def shard_params(self, params: dict) -> dict:
        """Full parameters (load_params in host memory, or random_params on the first device) -> each
        stacked over the ranks, rank r's shard on device r. Consumes `params`: each full array is
        dropped once its shards are out."""
        out: dict = {"layers": []}
        layers = params.pop("layers")
        embed = params.pop("embed")
        head = params.pop("lm_head", None)
        if self.lm_head == "vocab":
            out["lm_head"] = self._vocab_head(embed if head is None else head)
        elif head is not None:
            out["lm_head"] = self._stack([head] * self.size)
        out["embed"] = self._stack([embed] * self.size)
        del embed, head
        for key in list(params):
            out[key] = self._stack([params.pop(key)] * self.size)  # the final norm (replicated)
        for i in range(len(layers)):
            w, layers[i] = layers[i], None
            out["layers"].append({k: self._stack([take_shard(k, v, self.cfg, self.size, r, _concat)
                                                  for r in range(self.size)]) for k, v in w.items()})
            del w
        return out

    def replicate_state(self, state):
        """The model state with every array not yet on the mesh (what the model made itself: the
        RoPE table) stacked whole on every rank, so that every leaf has the leading "tp" axis."""
        stacked = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(lambda a: a if a.sharding == stacked else self._stack([a] * self.size), state)

    def _vocab_head(self, w):
        """Each rank's vocabulary rows of the head (common.sharding), the last padded to ceil(V / N).
        The head's format (common.formats.head_format) has per-row scales or none: its rows split anywhere."""
        per = vocab_shard(self.cfg.vocab_size, self.size, 0)[2]
        return self._stack([_pad_rows(take_shard("lm_head", w, self.cfg, self.size, r, _concat), per)
                            for r in range(self.size)])

    def _stack(self, parts: list):
        """Rank r's array (or QWeight) parts[r], all of one shape -> one [N, ...] array (or QWeight
        of them) sharded over "tp", each slice on its rank's device."""
        sharding = NamedSharding(self.mesh, P(AXIS))

        def one(*leaves):  # numpy leaves (a checkpoint loaded in host memory) go straight to their device
            shards = [jax.device_put((np.asarray(a) if isinstance(a, np.ndarray) else jnp.asarray(a))[None], d)
                      for a, d in zip(leaves, self.devices)]
            return jax.make_array_from_single_device_arrays((self.size, *shards[0].shape[1:]), sharding, shards)

        return jax.tree.map(one, *parts)

    # ----- programs --------------------------------------------------------------------------------
    def program(self, fn, in_specs: tuple, out_specs):
        """fn(state, *args, **static) run on every rank under shard_map: the state's leaves lose
        their leading "tp" axis, `in_specs` place the other positional arguments, `out_specs` the
        result. Keeps fn's signature, so jax.jit's static and donated argument names still apply."""
        mesh = self.mesh

        @wraps(fn)
        def run(state, *args, **static):
            def body(state, *args):
                return fn(jax.tree.map(lambda a: a.reshape(a.shape[1:]), state), *args, **static)  # a bitcast

            return shard_map(body, mesh=mesh, in_specs=(P(AXIS), *in_specs), out_specs=out_specs)(state, *args)

        return run


def _concat(parts):
    return (np if isinstance(parts[0], np.ndarray) else jnp).concatenate(parts, axis=0)


def _pad_rows(w, rows: int):
    """w with zero rows appended up to `rows` (a QWeight's scales alike): the last rank's vocab part."""
    def pad(a, n):
        xp = np if isinstance(a, np.ndarray) else jnp
        return a if a.shape[0] == n else xp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

    if isinstance(w, QWeight):  # a head format: one scale per row
        return QWeight(pad(w.q, rows), pad(w.scale, rows), w.fmt)
    return pad(w, rows)


__all__ = ["AXIS", "CACHE_SPEC", "TensorParallel", "TensorParallelError", "mesh_devices",
           "shard_map"]
