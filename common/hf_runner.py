"""The independent peer: a Runner over Hugging Face transformers' `Qwen3ForCausalLM` (CPU by default).

    load(model_dir, *, dtype="float32", fused="auto", device="cpu") -> HFRunner

torch and transformers are imported here, inside `load`, never by `common` at import time.
The checkpoint is validated by `common.weights` first, so bad input gives the same errors as
every other runner. dtype "float64" is accepted for exact comparisons; note that transformers'
Qwen3 still computes RMSNorm and the RoPE table in float32 in that mode (its code, not ours),
which bounds the agreement with the float64 reference at about 1e-6 relative.
`fused` is accepted for interface compatibility and ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.harness import RUNNER_DTYPES, Runner, check_token_ids, resolve_fused, trim_at_eos
from common.weights import Checkpoint

HF_DTYPES = RUNNER_DTYPES["hf"]


class HFRunner(Runner):
    name = "hf"

    def __init__(self, model, config, dtype: str):
        self.model = model
        self.config = config
        self.dtype = dtype

    def logits(self, token_ids) -> np.ndarray:
        import torch

        ids = check_token_ids(token_ids, self.config.vocab_size)
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=self.model.device),
                             use_cache=False).logits
        return out.float().cpu().numpy()

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, *, chunk):
        import torch
        from transformers import GenerationConfig

        eos = sorted(eos)
        # A fresh GenerationConfig: the checkpoint's generation_config.json (e.g. top_k=20) must not
        # leak into a comparison that asked for other settings.
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
                   eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
        if temperature == 0:
            gen.update(do_sample=False)
        else:
            gen.update(do_sample=True, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        gen_config = GenerationConfig(**gen)
        out = []
        torch.manual_seed(seed)
        with torch.inference_mode():
            for prompt in prompts:  # one at a time: no padding, exactly the tokens asked for
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.model.device)
                seq = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                          generation_config=gen_config)
                out.append([int(t) for t in seq[0, ids.shape[1]:]])
        # transformers stops at eos and keeps it; cut defensively at the first eos anyway.
        yield trim_at_eos(out, eos)


def load(model_dir: str | Path, *, dtype: str = "float32", fused="auto", device: str = "cpu") -> HFRunner:
    """transformers' Qwen3ForCausalLM in `dtype` (float64, float32, bfloat16, float16) on `device`
    (a torch device name: "cpu", the default, or "cuda" for long prompts)."""
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(HF_DTYPES)}")
    resolve_fused(fused)  # validated, then ignored: transformers has no fused path here
    ckpt = Checkpoint(model_dir)  # ConfigError / WeightsError before any model is built
    import torch
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = Qwen3ForCausalLM.from_pretrained(str(ckpt.dir), dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    # generate() merges the checkpoint's generation_config.json (temperature, top_k, ...) into the
    # settings each call passes, and warns that they do not apply to greedy search: start neutral.
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
    return HFRunner(model, ckpt.config, dtype)
