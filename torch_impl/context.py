"""Attention metadata of the current forward pass, with nano-vllm's field names.

The model reads it through `get_context()` at every attention layer, as nano-vllm's model does.
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
