"""The commands rank 0 sends a tensor-parallel runner's other ranks (torch_impl/workers.py): plain
int64 arrays, broadcast as tensors - token ids and sizes as they are, temperature and top_p as the
bits of their float64 values. Never pickles.

    LOGITS    [batch, seq, *token ids]
    GENERATE  [max_new_tokens, chunk, top_k, seed, temperature bits, top_p bits, n_eos, *eos ids,
               n_prompts, *prompt lengths, *prompt token ids]
    EXIT      []
"""

from __future__ import annotations

import numpy as np

LOGITS, GENERATE, EXIT = 1, 2, 3

def _bits(x: float) -> int:
    return int(np.array([x], np.float64).view(np.int64)[0])


def _float(bits) -> float:
    return float(np.array([bits], np.int64).view(np.float64)[0])


def encode_logits(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[ids.shape[0], ids.shape[1]], ids.reshape(-1)]).astype(np.int64)


def decode_logits(p: np.ndarray) -> np.ndarray:
    return p[2:].reshape(int(p[0]), int(p[1]))


def encode_generate(prompts, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                    eos, chunk: int) -> np.ndarray:
    eos = sorted(int(t) for t in eos)
    seed = int(seed) % (1 << 64)  # rank 0 samples: the others only check it
    head = [int(max_new_tokens), int(chunk), int(top_k), seed - (1 << 64) if seed >= 1 << 63 else seed,
            _bits(temperature), _bits(top_p), len(eos), *eos, len(prompts), *(len(p) for p in prompts)]
    return np.array(head + [int(t) for p in prompts for t in p], dtype=np.int64)


def decode_generate(p: np.ndarray) -> dict:
    max_new, chunk, top_k, seed, temperature, top_p, n_eos = (int(v) for v in p[:7])
    eos = set(int(t) for t in p[7:7 + n_eos])
    i = 7 + n_eos
    n = int(p[i])
    lens = [int(v) for v in p[i + 1:i + 1 + n]]
    tokens = p[i + 1 + n:].tolist()
    prompts, at = [], 0
    for length in lens:
        prompts.append(tokens[at:at + length])
        at += length
    return dict(prompts=prompts, max_new_tokens=max_new, temperature=_float(temperature), top_k=top_k,
                top_p=_float(top_p), seed=seed % (1 << 64), eos=eos, chunk=chunk)


__all__ = ["LOGITS", "GENERATE", "EXIT", "encode_logits", "decode_logits", "encode_generate", "decode_generate"]
