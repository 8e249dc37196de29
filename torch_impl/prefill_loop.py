"""A short prefill on static buffers, optionally captured in a CUDA graph: one per (batch bucket, token bucket).

A call's prompts are packed back to back, as an eager prefill packs them (cu_seqlens from their
lengths), into buffers of `tokens` rows (common.buckets.prompt_bucket of their total) for `batch`
sequences (a decode batch bucket). Padding tokens after the last prompt belong to no sequence:
attention never computes them, they write no cache row (slot -1), and each row of every other op
is its own, so they change nothing that is read. Padding sequences are empty (cu_seqlens repeats
the total). A run copies the call's ids, positions, slots and cu_seqlens to the device in one copy
(one int64 buffer, cast inside the step), then replays the graph - every layer, the final norm and
the head on each sequence's last token - and returns the logits [B, vocab]; the caller samples them
as it samples an eager prefill's. Replays of different buckets share one memory pool (they never
run at once).

The eager forward of a 16-token prompt is launch-bound (Qwen3-8B: 36 layers x ~8 launches, each
with its Python overhead); a replay is one launch of the whole graph.
"""

from __future__ import annotations

import numpy as np
import torch

from common import buckets
from common.fused import log_once
from torch_impl import context as ctx_mod

MAX_TOKENS = 512  # prompts totalling more run eagerly (their kernels are long enough that launches do not weigh)
MAX_BATCH = 8


def fits(batch: int, tokens: int) -> bool:
    """Whether a prefill of `batch` prompts totalling `tokens` tokens runs through a Prefiller."""
    return batch <= MAX_BATCH and tokens <= MAX_TOKENS


def token_bucket(tokens: int) -> int:
    """Rows of the Prefiller a prefill of `tokens` tokens (all prompts together) runs in: a power of
    two, at least common.buckets.MIN_PROMPT."""
    return buckets.pow2_at_least(tokens, buckets.MIN_PROMPT)


class Prefiller:
    def __init__(self, model, batch: int, tokens: int, device: torch.device, *, graph: bool, pool=None):
        """model: a torch_impl Qwen3ForCausalLM whose attention layers hold the KV cache (the graph
        keeps its addresses: rebuild after the cache is replaced)."""
        self.model, self.batch, self.tokens = model, batch, tokens
        # ids | positions | slots | cu_seqlens, filled by one host-to-device copy per run
        self.staging = torch.zeros(3 * tokens + batch + 1, dtype=torch.int64, device=device)
        self.host = torch.zeros(self.staging.shape, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.logits: torch.Tensor | None = None
        self.graph = None
        if graph:
            self._capture(pool)

    def _forward(self) -> torch.Tensor:
        t = self.tokens
        ids, positions = self.staging[:t], self.staging[t:2 * t]
        slots = self.staging[2 * t:3 * t].to(torch.int32)
        cu = self.staging[3 * t:].to(torch.int32)
        ctx_mod.set_context(True, cu, cu, t, t, slot_mapping=slots)  # tables: from the slots
        try:
            return self.model.compute_logits(self.model(ids, positions))
        finally:
            ctx_mod.reset_context()

    def _capture(self, pool) -> None:
        # The neutral state (every sequence empty, every slot -1) reads and writes no cache row: warm up
        # on a side stream with it (Triton compilation), then capture.
        self.staging.zero_()
        self.staging[2 * self.tokens:3 * self.tokens] = -1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.logits = self._forward()
        except RuntimeError as e:  # an op that reads its input on the host (the plain prefill attention)
            log_once("torch_impl", f"torch_impl: short prefills run eagerly: capturing one failed ({e})")
            self.logits = None
            return
        torch.cuda.synchronize()
        self.graph = graph

    def run(self, prompts, slots: np.ndarray) -> torch.Tensor:
        """The logits [B, vocab] of each prompt's last token, after writing its KV-cache rows at `slots`
        (the flat cache row of each prompt token, all prompts back to back)."""
        lens = [len(p) for p in prompts]
        b, total, t = len(prompts), sum(lens), self.tokens
        if b > self.batch or total > t:
            raise ValueError(f"Prefiller of {self.batch} sequences x {t} tokens: got {b} prompts of {total} tokens")
        host = self.host.numpy()
        host[:] = 0
        host[:total] = [tok for p in prompts for tok in p]
        host[t:t + total] = np.concatenate([np.arange(n) for n in lens])
        host[2 * t:3 * t] = -1
        host[2 * t:2 * t + total] = slots
        cu = host[3 * t:]
        cu[:] = total
        cu[:b + 1] = np.concatenate([[0], np.cumsum(lens)])
        self.staging.copy_(self.host)  # blocking: the host buffer is rewritten by the next run
        if self.graph is None:
            return self._forward()[:b]
        self.graph.replay()
        return self.logits[:b]
