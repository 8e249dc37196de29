"""What the quantized weight formats (common.formats) cost in accuracy.

    python -m tools.quant_accuracy                      # the shipped model's project-sources loss per format
    python -m tools.quant_accuracy --shapes Qwen3-0.6B  # + logits error and greedy agreement at real shapes
    python -m tools.quant_accuracy --build-heldout      # (re)write the project-sources token ids

- Project-sources loss: the shipped model's loss on the project-sources set (`tools/data/heldout.safetensors`:
  this project's own sources at one commit, tokenized with the shipped tokenizer - text the model
  never saw, fixed in the repo because the training corpus comes from the running Python's standard
  library and differs between Python versions). The loss is the float32 reference's
  (common.reference) on the weights each format stands for (q * scale), so it measures the format
  alone, not a kernel's rounding.
- At real shapes (random weights, q/k-norm of tens): logits of a prompt against bf16's (relative
  error, max abs), and how many greedy tokens each format shares with bf16 (jax_impl, plain XLA,
  float32, on this machine).
Results are printed as a table and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import argparsing, formats, progress
from common.checkpoint import write_checkpoint
from common.config import PRESETS
from common.harness import load_reference

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tools" / "data" / "heldout.safetensors"
HELDOUT_SOURCES = ("common/*.py",)  # this project's code: never in the stdlib training corpus
FORMATS = (None, *formats.QUANTIZED)
WINDOW = 256


def build_heldout(model_dir: Path, path: Path = HELDOUT) -> Path:
    """Tokenize HELDOUT_SOURCES (sorted, joined by <|endoftext|>) into `path` (uint16 ids)."""
    from safetensors.numpy import save_file

    from common.textgen import load_tokenizer
    from tools.tiny_corpus import token_stream

    files = sorted(p for pattern in HELDOUT_SOURCES for p in ROOT.glob(pattern))
    ids = token_stream(load_tokenizer(model_dir), [f.read_text(encoding="utf-8") for f in files])
    save_file({"ids": ids}, str(path), metadata={"sources": ",".join(f.relative_to(ROOT).as_posix() for f in files)})
    return path


def read_heldout(path: Path = HELDOUT) -> np.ndarray:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no held-out token ids (python -m tools.quant_accuracy --build-heldout)")
    return load_file(str(path))["ids"].astype(np.int64)


def sources_loss(model_dir: Path, ids: np.ndarray, quantization, batch: int = 8) -> float:
    """Mean next-token cross-entropy over non-overlapping WINDOW-token windows (float32 reference)."""
    from common import reference

    ref = load_reference(model_dir, dtype="float32", quantization=quantization)
    n = (ids.size - 1) // WINDOW
    windows = np.stack([ids[i * WINDOW:(i + 1) * WINDOW + 1] for i in range(n)])
    total = 0.0
    with progress.bar(n, f"loss {quantization or 'bf16'}") as pb:
        for s in range(0, n, batch):
            w = windows[s:s + batch]
            logits = reference.forward(ref.weights, ref.config, w[:, :-1], dtype=np.float32).astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            total += float((logz - np.take_along_axis(logits, w[:, 1:, None], -1)[..., 0]).sum())
            pb.update(len(w))
    return total / (n * WINDOW)


def shipped_losses(model_dir: Path) -> dict:
    ids = read_heldout()
    out = {(q or "bf16"): sources_loss(model_dir, ids, q) for q in FORMATS}
    return {"tokens": int((ids.size - 1) // WINDOW * WINDOW), "loss": out,
            "increase_pct": {k: 100 * (v / out["bf16"] - 1) for k, v in out.items()}}


def real_shape(preset: str, prompt_len: int = 32, new_tokens: int = 64) -> dict:
    """Logits error against bf16 and greedy agreement of each quantized format, random weights of `preset`.

    Norm weights near 1: with q/k-norm weights of tens (norm_scale="realistic") a random model is
    chaotic - on Qwen3-0.6B's shapes cut to 4 layers, 0.3% gaussian noise on the float weights alone
    gave logits 52% off (relative norm) and 41% top-1 agreement, int8 69% and 16% - so that would
    measure the random model's sensitivity, not the format's rounding (unit norms: 1.2% and 91% for
    the noise, 2.7% and 88% for int8)."""
    import jax_impl

    cfg = PRESETS[preset]
    prompt = [[(7 * j + 13) % (cfg.vocab_size - 1) + 1 for j in range(prompt_len)]]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / preset, cfg, seed=0, norm_scale="unit", fast=True)
        res, base, base_tokens = {}, None, None
        for q in FORMATS:
            runner = jax_impl.load(path, dtype="float32", fused=False, quantization=q, compile_cache=False)
            logits = runner.logits(prompt)[0].astype(np.float64)
            tokens = runner.generate(prompt, new_tokens)[0]
            del runner
            if q is None:
                base, base_tokens = logits, tokens
                continue
            agree = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), len(tokens))
            res[q] = dict(rel_error=float(np.linalg.norm(logits - base) / np.linalg.norm(base)),
                          max_abs=float(np.abs(logits - base).max()),
                          top1_agree=float((logits.argmax(-1) == base.argmax(-1)).mean()),
                          greedy_agree=agree, new_tokens=new_tokens)
    return res


def main(argv=None) -> int:
    p = argparsing.ArgumentParser(prog="python -m tools.quant_accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--shapes", default="", help="comma-separated presets for the real-shape checks (e.g. Qwen3-0.6B)")
    p.add_argument("--build-heldout", action="store_true", help="tokenize the held-out sources again and exit")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    import common

    model_dir = a.model or Path(common.default_model())
    if a.build_heldout:
        print(build_heldout(model_dir))
        return 0
    t0 = time.perf_counter()
    doc = {"model": str(model_dir), "shipped": shipped_losses(model_dir), "real_shapes": {}}
    print(f"project-sources loss over {doc['shipped']['tokens']:,} tokens of the project-sources set (float32 reference):")
    for k, v in doc["shipped"]["loss"].items():
        print(f"  {k:5s} {v:.4f}  ({doc['shipped']['increase_pct'][k]:+.2f}%)")
    for preset in filter(None, (s.strip() for s in a.shapes.split(","))):
        if preset not in PRESETS:
            p.error(f"--shapes: unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
        doc["real_shapes"][preset] = r = real_shape(preset)
        for q, v in r.items():
            print(f"  {preset} {q}: logits rel. error {v['rel_error']:.4f}, max abs {v['max_abs']:.4f}, top-1 "
                  f"agreement {100 * v['top1_agree']:.1f}%, greedy tokens equal to bf16's: {v['greedy_agree']} of "
                  f"{v['new_tokens']}")
    doc["seconds"] = time.perf_counter() - t0
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
