"""Write the trained tiny Qwen3 as a Hugging Face directory with a README.md model card.

The parameters arrive in jax_impl's packed layout; `hf_weights` unpacks them with common's one
name map (LAYER_PLAN / GLOBAL_PLAN): w_qkv -> q/k/v_proj, w_gate_up -> gate/up_proj.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.checkpoint import CHAT_TEMPLATE, write_checkpoint
from common.config import Qwen3Config
from common.weights import GLOBAL_PLAN, LAYER_PLAN, SINGLE_FILE, expected_shapes, layer_prefix
from tools import tiny_corpus

STORAGE_DTYPE = "bfloat16"
# Sampling defaults of the shipped generation_config.json (the CLIs use them unless told otherwise).
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.95}
SAMPLE_PROMPTS = ("def ", "import os\n", "class Parser:\n    def __init__(self")
SAMPLE_TOKENS = 96
CHAT_PROMPT = "Write a Python function `is_prime`: Return True if n is a prime number."
TRAINING_LOG = "training_log.json"  # corpus description, run settings and figures, loss history


def hf_weights(cfg: Qwen3Config, params: dict) -> dict[str, np.ndarray]:
    """float32 tensors by Hugging Face name from packed parameters (the inverse of load_params)."""
    shapes = expected_shapes(cfg)
    out = {GLOBAL_PLAN[k]: np.asarray(params[k], np.float32) for k in ("embed", "final_norm")}
    if "lm_head" in params:
        out[GLOBAL_PLAN["lm_head"]] = np.asarray(params["lm_head"], np.float32)
    for i, layer in enumerate(params["layers"]):
        pre = layer_prefix(i)
        for key, sources in LAYER_PLAN.items():
            arr = np.asarray(layer[key], np.float32)
            sizes = [shapes[pre + s][0] for s in sources]
            if arr.shape[0] != sum(sizes):
                raise ValueError(f"layer {i} {key}: {arr.shape[0]} rows, expected {sum(sizes)} "
                                 f"({' + '.join(map(str, sizes))} for {', '.join(sources)})")
            for name, part in zip(sources, np.split(arr, np.cumsum(sizes)[:-1], axis=0)):
                out[pre + name] = part
    return out


def write_tokenizer_files(out: Path, tok, cfg: Qwen3Config) -> dict[str, int]:
    ids = {s: tok.token_to_id(s) for s in tiny_corpus.SPECIAL_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for s, i in ids.items()}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": tiny_corpus.IM_END,
            "pad_token": tiny_corpus.ENDOFTEXT, "unk_token": None, "add_prefix_space": False,
            "added_tokens_decoder": added, "model_max_length": cfg.max_position_embeddings,
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    return ids


def write_model(out: str | Path, cfg: Qwen3Config, params: dict, tok, *, corpus: dict, run: dict,
                history: list[dict]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_files(out, tok, cfg)
    eos = ids[tiny_corpus.IM_END]
    write_checkpoint(out, cfg, hf_weights(cfg, params), dtype=STORAGE_DTYPE, eos_token_id=eos)
    hf = json.loads((out / "config.json").read_text())
    hf.update(bos_token_id=ids[tiny_corpus.ENDOFTEXT], pad_token_id=ids[tiny_corpus.ENDOFTEXT])
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": ids[tiny_corpus.ENDOFTEXT], "eos_token_id": [eos, ids[tiny_corpus.ENDOFTEXT]],
           "pad_token_id": ids[tiny_corpus.ENDOFTEXT], **SAMPLING}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / TRAINING_LOG).write_text(json.dumps({"corpus": corpus, "run": run, "history": history}, indent=1) + "\n")
    write_card(out)
    return out


def write_card(model_dir: Path) -> None:
    """README.md from training_log.json and fresh samples of the written checkpoint."""
    log = json.loads((model_dir / TRAINING_LOG).read_text())
    cfg = Qwen3Config.from_pretrained(model_dir)
    samples = generate_samples(model_dir)
    (model_dir / "README.md").write_text(model_card(cfg, log["corpus"], log["run"], log["history"], samples,
                                                    model_dir))


def generate_samples(model_dir: Path) -> list[dict]:
    """Greedy and default-sampling completions of SAMPLE_PROMPTS by jax_impl on the written files."""
    import jax_impl
    from common.textgen import eos_token_ids, load_tokenizer, render_chat

    tok = load_tokenizer(model_dir)
    runner = jax_impl.load(model_dir, dtype="float32", fused=False)
    eos = eos_token_ids(model_dir, tok)
    chat = render_chat(CHAT_TEMPLATE, [{"role": "user", "content": CHAT_PROMPT}])
    texts = [*SAMPLE_PROMPTS, chat]
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in texts]
    greedy = runner.generate(prompts, SAMPLE_TOKENS, eos_token_id=eos)
    kw = {k: SAMPLING[k] for k in ("temperature", "top_k", "top_p")}
    sampled = runner.generate(prompts, SAMPLE_TOKENS, seed=0, eos_token_id=eos, **kw)
    return [{"prompt": p, "chat": p == chat, "greedy": tok.decode(g, skip_special_tokens=True),
             "sampled": tok.decode(s, skip_special_tokens=True)}
            for p, g, s in zip(texts, greedy, sampled)]


def model_card(cfg: Qwen3Config, corpus: dict, run: dict, history: list[dict], samples: list[dict],
               out: Path) -> str:
    size_mb = (out / SINGLE_FILE).stat().st_size / 1e6
    curve = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['val_loss']:.3f} |" for h in history if "val_loss" in h)
    c = corpus
    early = f" (stopped early by --max-seconds; {run['planned_steps']} planned)" if run["stopped_early"] else ""
    how = (f"temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}, seed 0: "
           f"the shipped generation_config.json")
    sample_md = "\n\n".join(
        (f"`--chat --prompt {CHAT_PROMPT!r}`" if s["chat"] else f"Prompt `{s['prompt']!r}`") + ", greedy:\n\n"
        f"```python\n{'' if s['chat'] else s['prompt']}{s['greedy']}\n```\n\n"
        f"Sampled ({how}):\n\n```python\n{'' if s['chat'] else s['prompt']}{s['sampled']}\n```" for s in samples)
    return f"""# Tiny Qwen3 trained on Python's standard library

A {cfg.num_parameters() / 1e6:.2f}M-parameter model of exactly Qwen3's architecture, trained from scratch
by `tools/train_tiny.py` on the standard-library sources of Python {corpus['python']}. It ships with the
package as the default model of `python -m jax_impl.generate` and `python -m torch_impl.generate`
(`common.default_model()`) and is the checkpoint of the greedy parity tests. It writes
Python-looking code and knows nothing else; it is a test fixture with confident predictions,
not a useful assistant.

## Architecture

Qwen3ForCausalLM: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query heads and
{cfg.num_key_value_heads} key/value heads of head_dim {cfg.head_dim} (GQA), per-head q/k RMSNorm, RoPE (theta
{cfg.rope_theta:g}), SwiGLU MLP with intermediate size {cfg.intermediate_size}, tied embeddings, vocabulary
{cfg.vocab_size}, max_position_embeddings {cfg.max_position_embeddings}. Stored in {STORAGE_DTYPE}
(model.safetensors: {size_mb:.2f} MB).

## Corpus

Every `*.py` file under `sysconfig.get_paths()["stdlib"]` of Python {c['python']} (`{c['stdlib']}`),
sorted by relative path, skipping any path with a directory named {', '.join(sorted(tiny_corpus.EXCLUDED_DIRS))} and any
file that is not UTF-8; each file is one document, documents are joined by `<|endoftext|>`. The
file at sorted index i is held out for validation when i % {tiny_corpus.VAL_EVERY} == {tiny_corpus.VAL_EVERY - 1}.
Plus chat examples built from the training files: every {tiny_corpus.CHAT_EVERY}th documented function or
method (at most {tiny_corpus.CHAT_MAX_CHARS} characters) as "Write a Python function `name`: <first
docstring line>" answered by its source, in the shipped chat template.

| | files | bytes | tokens |
|---|---|---|---|
| training | {c['train_files']} (+ {c['chat_examples']} chat examples) | {c['train_bytes']} (+ {c['chat_bytes']}) | {c['train_tokens']} |
| validation | {corpus['val_files']} | {corpus['val_bytes']} | {corpus['val_tokens']} |

sha256 of the corpus texts: `{corpus['sha256']}`.

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the training files (GPT-2 pre-tokenizer,
no prefix space), {cfg.vocab_size} ids, {corpus['bytes_per_token']} bytes per token on the training stream.
Special tokens `<|endoftext|>` (0), `<|im_start|>` (1), `<|im_end|>` (2); Qwen-style chat template in
tokenizer_config.json; generation stops at `<|im_end|>` or `<|endoftext|>`.

## Training

`{run['command']}`

Seed {run['seed']}; {run['steps']} steps{early} of {run['batch']} random windows of {run['seq_len']} tokens
({run['tokens_seen'] / 1e6:.1f}M tokens seen); AdamW (betas 0.9/0.95, weight decay {run['weight_decay']} on matrices), peak
learning rate {run['lr']:g}, {run['warmup']} warmup steps, cosine decay to {run['min_lr_ratio']:g}x; gradient clipping at 1.0;
float32 master weights, forward in {run['compute_dtype']}. Trained in {run['train_seconds']:.0f} s on {run['device']}
(jax {run['jax']}, {run['total_seconds']:.0f} s including corpus, tokenizer and compilation).

**Final training loss {run['final_train_loss']:.3f}** (mean of the last logged steps), **validation loss
{run['final_val_loss']:.3f}** (nats per token).

| step | train loss | validation loss |
|---|---|---|
{curve}

## Samples

Generated by `jax_impl` in float32 from this directory, {SAMPLE_TOKENS} new tokens at most.

{sample_md}

## Limits

Trained on {run['seq_len']}-token windows: text much longer than that degrades. Greedy decoding
falls into loops within a few lines (a model this small does); the shipped generation_config.json
samples instead. Python {corpus['python'].rsplit('.', 1)[0]} on another machine gives the same corpus when its
build ships the same files (distributions leave out or patch a few: compare the sha256 above);
another minor version gives a slightly different one. The same script, seed and corpus on the
same kind of device reproduce the run; GPU reductions may differ in the last bits across devices.
"""


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tools.tiny_export MODEL_DIR   (rewrites MODEL_DIR/README.md from "
                 f"{TRAINING_LOG} with fresh samples)")
    write_card(Path(sys.argv[1]))
