"""The tensor-parallel group a model's ranks share, and the few collectives the model runs.

A model holds one `TPGroup`; at size 1 (`SINGLE`) every method is the single-GPU code itself, so
tensor parallelism adds no op, launch or synchronization there. At size N each rank holds its shard
of the weights (common.sharding) and:
- `row_parallel(op, ..., residual=x)`: a row-parallel projection (o_proj's linear_residual, the MLP)
  runs with residual None (this rank's partial product, rounded to the activation dtype), is
  all-reduced in the activation dtype, and the residual is added once, after the sum;
- `all_reduce`: the vocab-parallel embedding's sum of each rank's rows (zeros for ids it lacks);
- `gather_vocab`: each rank's slice of the logits, padded to ceil(V / N) columns, gathered into the
  full [T, V] logits on every rank (nano-vllm's runner samples on rank 0; the standalone runner's
  ranks all need the same next tokens);
- `argmax_vocab`: greedy tokens from the slices without gathering the logits (each rank's best value
  and id, gathered: 8 bytes per row); ties go to the lowest id, as torch.argmax over the full row;
- `broadcast`: rank 0's sampled tokens to the others.
`lm_head_shard` ("vocab": nano-vllm's layout, or "replicated": the embedding and head whole on every
rank, no collective for either) is the model's choice; jax_impl takes the same values.
Every collective is an NCCL (CUDA) or gloo (CPU) call on `group` (None: the default group); NCCL's
are captured in the decode step's CUDA graph. Nothing here creates multicast (NVLS) objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True, eq=False)
class TPGroup:
    size: int = 1
    rank: int = 0
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    def row_parallel(self, op: Callable, *args, residual: torch.Tensor, **kwargs) -> torch.Tensor:
        """op(*args, residual, **kwargs) at size 1; else the sum over ranks of op(*args, None) plus residual."""
        if self.size == 1:
            return op(*args, residual, **kwargs)
        out = op(*args, None, **kwargs)
        self.all_reduce(out)
        return residual + out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            _dist().all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, per: int, vocab_size: int) -> torch.Tensor:
        """[T, rows] (this rank's vocabulary slice, rows <= per) -> [T, vocab_size] on every rank."""
        if self.size == 1:
            return logits
        t = logits.shape[0]
        if logits.shape[1] < per:  # the last slice of a vocabulary the size does not divide
            logits = F.pad(logits, (0, per - logits.shape[1]))
        out = logits.new_empty(self.size * t, per)
        _all_gather(out, logits.contiguous(), self.group)
        return out.view(self.size, t, per).permute(1, 0, 2).reshape(t, self.size * per)[:, :vocab_size]

    def argmax_vocab(self, logits: torch.Tensor, first: int, out: torch.Tensor, argmax=None) -> torch.Tensor:
        """Greedy ids [T] into `out` from this rank's slice [T, rows] of the logits starting at id `first`;
        `argmax(logits, out)`: the row argmax to use (None: torch.argmax)."""
        if argmax is None:
            def argmax(x, out=None):
                return torch.argmax(x, dim=-1, out=out)
        if self.size == 1:
            return argmax(logits, out)
        idx = argmax(logits)
        best = torch.stack([logits.gather(1, idx[:, None])[:, 0].float(), (idx + first).float()], dim=-1)
        every = best.new_empty(self.size * best.shape[0], 2)  # float32 ids: exact below 2**24
        _all_gather(every, best, self.group)
        every = every.view(self.size, -1, 2)
        rank = torch.argmax(every[..., 0], dim=0)  # the first rank (lowest ids) on ties
        return out.copy_(every[..., 1].gather(0, rank[None])[0].long())

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            _dist().broadcast(x, src, group=self.group)
        return x


SINGLE = TPGroup()
def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    return dist


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """Every rank's x concatenated along dim 0 into out (torch >= 2.13 names it all_gather_single)."""
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def from_dist() -> TPGroup:
    """The default process group as nano-vllm's layers read it (dist.get_rank / get_world_size once
    initialized), else SINGLE."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return TPGroup(dist.get_world_size(), dist.get_rank(), None)


__all__ = ["TPGroup", "SINGLE", "from_dist"]
