"""Attention metadata of the current forward pass, with nano-vllm's field names.

The model reads it through `get_context()` once per forward, as nano-vllm's model does, and turns it
into common's AttentionMeta (`attention_meta`, `cache_free_meta`) for the attention ops.
By default this module's own context is used (the standalone runner sets it);
`torch_impl.nanovllm.install()` points `get_context` at nano-vllm's `nanovllm.utils.context`
so that nano-vllm's model runner drives this model unchanged.

Fields (all tensors on the model's device):
  is_prefill     True: variable-length prefill over `cu_seqlens_q` / `cu_seqlens_k`; False: decode.
  cu_seqlens_q   [B + 1] int32 cumulative new-token counts (prefill).
  cu_seqlens_k   [B + 1] int32 cumulative context lengths, cached prefix included (prefill).
  max_seqlen_q, max_seqlen_k   Python ints.
  slot_mapping   [T] int32: flat cache row of each new token (-1 = do not write); None = no cache.
  context_lens   [B] int32 (decode): tokens each sequence attends to, its new one included.
  block_tables   [B, max_blocks] int32: cache blocks of each sequence (decode; prefill with a
                 cached prefix), -1 padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from common.ops import AttentionMeta


@dataclass(slots=True)
class Context:
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None


_CONTEXT = Context()
_PROVIDER: Callable[[], Any] | None = None  # nano-vllm's get_context once installed


def own_context() -> Context:
    """This module's context, whatever provider is installed (the standalone runner's models read it)."""
    return _CONTEXT


def get_context():
    """The context of the running forward pass (this module's, or nano-vllm's once installed)."""
    return _PROVIDER() if _PROVIDER is not None else _CONTEXT


def set_context(is_prefill: bool, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
                max_seqlen_k: int = 0, slot_mapping=None, context_lens=None, block_tables=None) -> Context:
    global _CONTEXT
    _CONTEXT = Context(is_prefill, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, slot_mapping,
                       context_lens, block_tables)
    return _CONTEXT


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()


def set_provider(provider: Callable[[], Any] | None) -> None:
    """Read the context from `provider()` instead (None: back to this module's own context)."""
    global _PROVIDER
    _PROVIDER = provider


# ----- common.ops.AttentionMeta of the running step ------------------------------------------------

def attention_meta(ctx, positions: torch.Tensor, block_size: int) -> AttentionMeta:
    """The AttentionMeta of a step over a KV cache of `block_size`-row blocks, from a context with
    nano-vllm's fields. A prefill without a cached prefix carries no block tables (nano-vllm's, and
    this module's): they are read off its slot_mapping (each sequence starts at a block boundary)."""
    tables = ctx.block_tables
    if ctx.is_prefill and tables is None:
        tables = tables_from_slots(ctx.slot_mapping, ctx.cu_seqlens_q, int(ctx.max_seqlen_q), block_size)
    return AttentionMeta(positions=positions, slots=ctx.slot_mapping, cu_seqlens_q=ctx.cu_seqlens_q,
                         cu_seqlens_k=ctx.cu_seqlens_k, context_lens=ctx.context_lens, block_tables=tables,
                         max_seqlen_q=int(ctx.max_seqlen_q or 0), max_seqlen_k=int(ctx.max_seqlen_k or 0),
                         is_prefill=bool(ctx.is_prefill))


def tables_from_slots(slots: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int,
                      block_size: int) -> torch.Tensor:
    """[B, blocks] block ids of sequences whose tokens fill their blocks from row 0, in order
    (a prefill from position 0): block j of sequence b holds its token j * block_size."""
    nblk = max(1, -(-max_seqlen_q // block_size))
    starts = cu_seqlens_q[:-1, None].long() + torch.arange(nblk, device=slots.device)[None, :] * block_size
    ok = starts < cu_seqlens_q[1:, None]
    first = slots.long()[starts.clamp(max=max(0, slots.shape[0] - 1))]
    return torch.where(ok & (first >= 0), first // block_size, -1).to(torch.int32)


def cache_free_meta(ctx, positions: torch.Tensor) -> tuple[AttentionMeta, int]:
    """A prefill without a KV cache (a logits-only forward, nano-vllm's warm-up): sequence b's keys
    go to rows 0 .. of block b of a scratch cache of max_seqlen_q-row blocks. Returns the meta and
    the scratch block size."""
    if not ctx.is_prefill or ctx.block_tables is not None:
        raise RuntimeError("decode (or prefill over a cached prefix) needs the KV cache: k_cache is empty or "
                           "the context has no slot_mapping")
    rows = max(1, int(ctx.max_seqlen_q))
    cu = ctx.cu_seqlens_q.long()
    t = positions.shape[0]
    token = torch.arange(t, device=positions.device)
    seq = torch.searchsorted(cu[1:], token, right=True)
    slots = (seq * rows + token - cu[seq]).to(torch.int32)
    meta = AttentionMeta(positions=positions, slots=slots, cu_seqlens_q=ctx.cu_seqlens_q,
                         cu_seqlens_k=ctx.cu_seqlens_q, block_tables=None, max_seqlen_q=rows, max_seqlen_k=rows,
                         is_prefill=True)
    return meta, rows
