"""Write Hugging Face layout Qwen3 checkpoints with random weights, for tests and benchmarks.

No model hub is reachable, so every test and benchmark makes its own checkpoint:
config.json, generation_config.json, model.safetensors (or shards plus
model.safetensors.index.json) and, on request, a small byte-level BPE tokenizer.json with a
tokenizer_config.json holding a chat template.

`norm_scale="realistic"` draws q_norm/k_norm weights of tens (real Qwen3 has k_norm values up
to about 96) and layer norms around 1, which amplify rounding bugs that N(0, 0.02) hides.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # before numpy imports: a Ctrl-C while it does exits 130 too
    from common import interrupt

    interrupt.install()

import numpy as np

from common import argparsing, progress
from common.config import PRESETS, Qwen3Config
from common import formats
from common.weights import INDEX_FILE, QUANT_SOURCES, SCALE_SUFFIX, SINGLE_FILE, expected_shapes

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def random_weights(cfg: Qwen3Config, **kwargs) -> dict[str, np.ndarray]:
    """float32 random weights for every tensor of the config, keyed by Hugging Face name."""
    return dict(iter_random_weights(cfg, **kwargs))


def iter_random_weights(cfg: Qwen3Config, *, seed: int = 0, std: float = 0.02, embed_std: float | None = None,
                        norm_scale: str = "unit", fast: bool = False):
    """Yield (Hugging Face name, float32 random tensor) one at a time (large models stream).

    fast: fill matrices from a pool of 2^24 normals at random offsets (benchmarks: timing does not
    depend on the values, and drawing 8e9 fresh normals takes minutes).

    norm_scale: "unit" (norm weights near 1), "realistic" (q/k-norm weights of tens).
    embed_std: std of the embedding (and lm_head); larger values give peaked logits.
    """
    if norm_scale not in ("unit", "realistic"):
        raise ValueError(f"norm_scale={norm_scale!r}: expected 'unit' or 'realistic'")
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(size=1 << 24, dtype=np.float32) if fast else None
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 2:
            s = embed_std if (embed_std is not None and ("embed" in name or "lm_head" in name)) else std
            if pool is None:
                w = rng.standard_normal(size=shape, dtype=np.float32)
            else:
                w = np.resize(np.roll(pool, int(rng.integers(pool.size))), shape)
            w *= np.float32(s)
        elif norm_scale == "realistic" and ("q_norm" in name or "k_norm" in name):
            w = rng.uniform(1.0, 30.0, size=shape)
            w[rng.integers(0, shape[0], size=max(1, shape[0] // 16))] = 96.0 if "k_norm" in name else 60.0
        elif norm_scale == "realistic":
            w = rng.uniform(0.3, 3.0, size=shape)
        else:
            w = 1.0 + rng.normal(0.0, 0.1, size=shape)
        yield name, np.asarray(w, dtype=np.float32)


def stored_checkpoint_format(name: str) -> "formats.WeightFormat":
    """A registry format checkpoints are published in (one with a quantization_config)."""
    fmt = formats.get(name)
    if not fmt.checkpoint_config:
        stored = [f.name for f in formats.FORMATS.values() if f.checkpoint_config]
        raise formats.QuantError(f"stored_format={name!r}: no checkpoint layout; expected one of {', '.join(stored)}")
    return fmt


def write_checkpoint(model_dir: str | Path, cfg: Qwen3Config, weights: dict[str, np.ndarray] | None = None,
                     *, seed: int = 0, dtype: str | None = None, shards: int = 1, tokenizer: bool = False,
                     eos_token_id: int | None = None, stored_format: str | None = None, scale_dtype: str = "bfloat16",
                     **random_kwargs) -> Path:
    """Write a complete checkpoint directory; returns its path.

    weights: tensors by Hugging Face name (default: `iter_random_weights(cfg, seed=seed, **random_kwargs)`,
    converted to the storage dtype one tensor at a time).
    dtype: storage dtype (default the config's). shards > 1 writes model-0000k-of-0000n files
    and an index, splitting by tensor in order.
    stored_format: a quantized checkpoint layout of the registry (common.formats: those with a
    `checkpoint_config`, the layouts Qwen publishes): the seven projections of every layer in the
    format's storage with `<name>_scale_inv` multipliers (in `scale_dtype`), everything else in
    `dtype`, and the format's `quantization_config` in config.json (real Qwen3 sizes are whole
    blocks; transformers infers the block size from the shapes, so test configs should be too).
    """
    from safetensors.numpy import save_file

    fmt = None if stored_format is None else stored_checkpoint_format(stored_format)
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or cfg.dtype
    items = weights.items() if weights is not None else iter_random_weights(cfg, seed=seed, **random_kwargs)
    store = {}
    with progress.bar(len(weights) if weights is not None else len(expected_shapes(cfg)), f"writing {path.name}",
                      unit="tensor") as pb:
        for k, v in items:
            if fmt and k.split(".", 3)[-1] in QUANT_SOURCES:
                q, scale = fmt.quantize(v)
                store[k], store[k + SCALE_SUFFIX] = q, scale.astype(_np_dtype(scale_dtype))
            else:
                store[k] = np.ascontiguousarray(np.asarray(v).astype(_np_dtype(dtype)))
            pb.update(1)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = dtype
    if fmt:
        hf["quantization_config"] = dict(fmt.checkpoint_config)
    if tokenizer:
        eos_token_id = write_tokenizer(path, cfg.vocab_size)
    hf["eos_token_id"] = eos_token_id
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {"eos_token_id": eos_token_id, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    names = list(store)
    if shards <= 1:
        save_file(store, str(path / SINGLE_FILE), metadata={"format": "pt"})
        return path
    groups = np.array_split(np.arange(len(names)), shards)
    weight_map, total = {}, 0
    for k, idx in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: store[names[j]] for j in idx}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(a.nbytes for a in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return path


_TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. A model reads tokens and writes tokens.
def forward(self, x): return self.norm(x) + x  # residual stream of a decoder layer
Qwen3 uses grouped-query attention, rotary position embeddings and a SwiGLU feed-forward block.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: ,.;:!?()[]{}<>"'-_/\\|@#$%^&*+=~`
"""


def write_tokenizer(model_dir: str | Path, vocab_size: int, text: str | None = None) -> int:
    """Train a small byte-level BPE tokenizer (ids < vocab_size) and write tokenizer.json and
    tokenizer_config.json with a chat template. Returns the id of <|im_end|> (the eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    size = min(vocab_size, 1024)
    if size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                         f"{256 + len(SPECIAL_TOKENS) + 1} ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text or _TOKENIZER_TEXT] * 4, trainer=trainer)
    path = Path(model_dir)
    tok.save(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHAT_TEMPLATE,
            "model_max_length": 40960}
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return eos


def write_new_checkpoint(model_dir: str | Path, cfg: Qwen3Config, **kwargs) -> Path:
    """write_checkpoint into a directory that does not exist yet or is empty; returns its path.

    Refuses (FileExistsError) a file or a non-empty directory at `model_dir`: nothing is ever
    overwritten. The files are written into a hidden `.<name>.<random>.partial` directory beside
    it, renamed into place once complete, so an interrupted write leaves no directory that looks
    like a checkpoint (and the partial one is removed unless the process is killed outright).
    """
    path = Path(model_dir)
    _check_new_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        write_checkpoint(tmp, cfg, **kwargs)
        _check_new_dir(path)  # again: something may have appeared there while the weights were written
        # rename(2) replaces an empty directory and fails on a non-empty one or a file: never an overwrite
        os.rename(tmp, path)
    except BaseException:  # a Ctrl-C or an error: no partial checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_new_dir(path: Path) -> None:
    if path.is_dir():
        if any(path.iterdir()):
            raise FileExistsError(f"{path}: the directory exists and is not empty; "
                                  "choose a new directory or remove this one")
    elif path.exists() or path.is_symlink():
        raise FileExistsError(f"{path}: a file of that name exists; choose a new directory")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None) -> int:
    p = argparsing.ArgumentParser(prog="python -m common.checkpoint", description="Write a random-weight Qwen3 checkpoint in the Hugging Face layout.")
    p.add_argument("out", help="output directory: new, or an empty existing one (never overwritten)")
    p.add_argument("--preset", default="Qwen3-0.6B", choices=list(PRESETS), metavar="PRESET",
                   help=f"one of the six dense Qwen3 presets: {', '.join(PRESETS)} (default %(default)s)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of decoder layers, 1 to the preset's count (default: all of the preset's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shards", type=_positive, default=1, help="number of safetensors files (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--realistic-norms", action="store_true", help="q/k-norm weights of tens, as real Qwen3")
    p.add_argument("--tokenizer", action="store_true", help="also write a small byte-level BPE tokenizer")
    stored = [f.name for f in formats.FORMATS.values() if f.checkpoint_config]
    p.add_argument("--stored-format", choices=stored, default=None,
                   help="write the projections quantized in this layout: " +
                        "; ".join(f"{n}: {formats.FORMATS[n].help}" for n in stored))
    a = p.parse_args(argv)
    import dataclasses

    cfg = Qwen3Config.preset(a.preset)
    if a.layers is not None:
        if not 1 <= a.layers <= cfg.num_hidden_layers:
            p.error(f"argument --layers: {a.layers}: expected 1 to {cfg.num_hidden_layers} "
                    f"({a.preset} has {cfg.num_hidden_layers} layers)")
        cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
    tensors = sum(2 if a.stored_format and k.split(".", 3)[-1] in QUANT_SOURCES else 1 for k in expected_shapes(cfg))
    if a.shards > tensors:
        p.error(f"argument --shards: {a.shards}: expected 1 to {tensors} (the checkpoint has {tensors} tensors)")
    try:
        write_new_checkpoint(a.out, cfg, seed=a.seed, dtype=a.dtype, shards=a.shards, tokenizer=a.tokenizer,
                             norm_scale="realistic" if a.realistic_norms else "unit", stored_format=a.stored_format)
    except OSError as e:  # FileExistsError among them: an existing output, a parent that is a file, a full disk
        where = f" ({e.filename})" if e.filename and e.filename != a.out else ""
        msg = str(e) if e.errno is None else f"{a.out}: cannot write the checkpoint: {e.strerror}{where}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({cfg.num_parameters() / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    interrupt.main(main)
