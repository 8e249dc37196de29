"""One decode step for a padded batch, on static buffers, optionally captured in a CUDA graph.

State lives on the device: the last tokens, positions, cache slots, context lengths, the block
tables and the emitted tokens. A step runs the model on the last tokens, picks the next tokens and
advances the state inside the step, so a captured step needs nothing from the host: greedy steps
take the argmax, sampled steps (`sampling=(temperature, top_k, top_p)`) draw with torch_impl.sampling
and the decoder's own generator (`gen`, registered with the graph, so a replay draws what an eager
step would). With `sampling=None` and a temperature, steps return the logits and `advance()` takes
tokens sampled outside (tensor parallelism: rank 0 samples and broadcasts).
Padding rows (a bucket larger than the batch) have slot -1 and context length 0: they write
nothing and read nothing. Under tensor parallelism every rank runs the same step on its shard; the
model's all-reduces and the head's gather (or, greedy, its cross-rank argmax) are NCCL calls
captured in the graph, so a replay is one launch per rank.
"""

from __future__ import annotations

import torch

from torch_impl import context as ctx_mod
from common.fused import log_once
from torch_impl.sampling import sample

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PAD_SLOT = -(1 << 40)  # slot_base of padding rows: slot = base + position stays negative


def bucket_for(batch: int) -> int:
    return next((b for b in BUCKETS if b >= batch), -(-batch // 256) * 256)


class Decoder:
    def __init__(self, model, batch: int, blocks_per_seq: int, block_size: int, greedy: bool,
                 device: torch.device, *, graph: bool, sampling: tuple[float, int, float] | None = None):
        self.model, self.greedy, self.sampling = model, greedy, None if greedy else sampling
        if self.sampling is not None and graph and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            log_once("torch_impl", "this torch cannot register a generator with a CUDA graph: sampled decode "
                     "steps replay for the logits and sample outside the graph")
            self.sampling = None
        self.gen = torch.Generator(device=device)  # the in-step sampler's; seed it before each run
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.tokens = torch.zeros(batch, **i64)
        self.positions = torch.zeros(batch, **i64)
        self.valid = torch.zeros(batch, **i64)  # 1 for real rows
        self.first = torch.zeros(batch, **i64)  # position of each row's first new token
        self.slot_base = torch.full((batch,), PAD_SLOT, **i64)
        self.slots = torch.full((batch,), -1, **i64)
        self.context_lens = torch.zeros(batch, **i32)
        self.block_tables = torch.zeros(batch, blocks_per_seq, **i32)
        self.out = torch.zeros(batch, blocks_per_seq * block_size, **i64)  # emitted tokens
        self.logits = None
        self.graph = None
        if graph:
            self._capture()

    def _forward(self) -> torch.Tensor | None:
        """The step's logits [batch, vocab]; greedy: None, the next tokens written into `tokens`."""
        ctx_mod.set_context(False, slot_mapping=self.slots, context_lens=self.context_lens,
                            block_tables=self.block_tables)
        try:
            h = self.model(self.tokens, self.positions)
        finally:
            ctx_mod.reset_context()
        if self.greedy:
            self.model.lm_head.greedy(h, self.tokens)
            return None
        return self.model.lm_head(h)

    def _advance(self) -> None:
        """tokens hold the new tokens: record them and move every real row one position on."""
        if self.tokens.is_cuda:  # one launch instead of five
            from torch_impl.kernels.advance import advance  # noqa: PLC0415

            advance(self.tokens, self.positions, self.first, self.valid, self.slot_base, self.slots,
                    self.context_lens, self.out)
            return
        idx = (self.positions - self.first + 1).clamp(max=self.out.shape[1] - 1)[:, None]
        keep = self.out.gather(1, idx)[:, 0]
        self.out.scatter_(1, idx, torch.where(self.valid > 0, self.tokens, keep)[:, None])
        self.positions.add_(self.valid)
        self.context_lens.add_(self.valid.to(torch.int32))
        torch.add(self.slot_base, self.positions, out=self.slots)

    def _body(self) -> torch.Tensor | None:
        logits = self._forward()
        if self.sampling is not None:
            # padding rows (valid 0) hold no sequence: their logits are replaced by zeros, so the
            # sampler never sees what an empty attention may leave there
            z = torch.where(self.valid[:, None] > 0, logits.float(), 0.0)
            self.tokens.copy_(sample(z, *self.sampling, self.gen, fused=z.is_cuda and self.model.lm_head.fused))
            logits = None
        if logits is None:
            self._advance()
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (Triton compilation, cuBLAS handles) with the neutral state: padding
        # rows everywhere, so nothing is read or written; then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
            if self.sampling is not None:  # the sampler's ops too (the neutral state advances nothing)
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if self.sampling is not None:
            self.graph.register_generator_state(self.gen)
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        torch.cuda.synchronize()

    def start(self, first_tokens: torch.Tensor, lens: list[int], blocks_per_seq: int) -> None:
        """Fill the state for a batch whose prompts (lens) are prefilled and whose first new tokens are
        `first_tokens` [B]; sequence b owns cache blocks b * blocks_per_seq ... (b + 1) * blocks_per_seq - 1."""
        b, bs = len(lens), self.out.shape[1] // blocks_per_seq
        dev = self.tokens.device
        lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)
        rows = torch.arange(b, dtype=torch.int64, device=dev)
        self.tokens.zero_()
        self.tokens[:b] = first_tokens
        self.positions.zero_()
        self.positions[:b] = lens_t
        self.valid.zero_()
        self.valid[:b] = 1
        self.first.copy_(self.positions)
        self.slot_base.fill_(PAD_SLOT)
        self.slot_base[:b] = rows * blocks_per_seq * bs
        torch.add(self.slot_base, self.positions, out=self.slots)
        self.context_lens.zero_()
        self.context_lens[:b] = (lens_t + 1).to(torch.int32)
        self.block_tables.zero_()
        self.block_tables[:b] = (rows[:, None] * blocks_per_seq
                                 + torch.arange(blocks_per_seq, device=dev)[None, :]).to(torch.int32)
        self.out.zero_()
        self.out[:b, 0] = first_tokens

    def step(self) -> torch.Tensor | None:
        """One decode step; returns the logits [batch, vocab] to sample outside, or None: the step
        picked its tokens and advanced already (greedy, or sampled in the step)."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._body()

    def advance(self, next_tokens: torch.Tensor) -> None:
        """After a sampled step: next_tokens [B <= batch] become the last tokens."""
        self.tokens[:next_tokens.shape[0]] = next_tokens
        self._advance()
