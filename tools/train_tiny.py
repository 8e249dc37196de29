"""Train the tiny Qwen3 that ships with the package (common/default_model/).

    python -m tools.train_tiny --out /tmp/tiny_qwen3 [--seed 0] [--steps 1500]

The model is jax_impl's own Qwen3 (plain XLA ops): the differentiable forward is `model.prefill`
over a full window (caches of exactly the window's length, written and read back in the same
call) followed by `model.logits`. No second model definition exists.

Data: the running interpreter's standard-library sources (tools/tiny_corpus.py states the rule),
a byte-level BPE tokenizer trained on them, and random windows of `--seq-len` + 1 tokens drawn
from the joined training stream by a numpy generator seeded with `--seed`. AdamW with linear
warmup and cosine decay, global-norm clipping at 1.0, float32 master weights, the forward in
`--dtype`. The output is a complete Hugging Face directory plus a README.md model card with
the figures of this run. Same script, seed, corpus (its sha256 is printed and recorded) and
device kind reproduce the checkpoint; GPU reductions may differ in the last bits across devices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from common import argparsing
from common.config import Qwen3Config
from tools import tiny_corpus, tiny_export

log = logging.getLogger("train_tiny")


def model_config(a) -> Qwen3Config:
    return Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       head_dim=a.head_dim, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                       max_position_embeddings=a.max_positions, tie_word_embeddings=True, dtype="bfloat16")


def init_params(cfg: Qwen3Config, seed: int) -> dict:
    """float32 parameters in jax_impl's packed layout (see jax_impl.runner.load_params).

    Matrices N(0, 0.02); the two residual-branch outputs (o_proj, down_proj) scaled by
    1/sqrt(2 * layers); norm weights 1.
    """
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.key(seed), 1 + 4 * cfg.num_hidden_layers))
    normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    out_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layers = [{
        "input_norm": jnp.ones((h,)), "w_qkv": normal((cfg.qkv_size, h), 0.02),
        "q_norm": jnp.ones((d,)), "k_norm": jnp.ones((d,)), "w_o": normal((h, cfg.q_size), out_std),
        "post_norm": jnp.ones((h,)), "w_gate_up": normal((2 * i, h), 0.02), "w_down": normal((h, i), out_std),
    } for _ in range(cfg.num_hidden_layers)]
    return {"embed": normal((cfg.vocab_size, h), 0.02), "final_norm": jnp.ones((h,)), "layers": layers}


def make_loss(cfg: Qwen3Config, compute_dtype):
    import jax.numpy as jnp
    import optax

    from jax_impl.model import PLAIN_OPS, Qwen3, init_caches

    def loss_fn(params, ids, targets):
        """Mean next-token cross entropy of ids [B, L] against targets [B, L]."""
        cast = lambda a: a.astype(compute_dtype)  # noqa: E731
        p = {"embed": cast(params["embed"]), "final_norm": cast(params["final_norm"]),
             "layers": [{k: cast(v) for k, v in layer.items()} for layer in params["layers"]]}
        model = Qwen3(cfg, p, PLAIN_OPS)
        b, l = ids.shape
        h, _ = model.prefill(ids, jnp.full((b,), l, jnp.int32), init_caches(cfg, b, l, compute_dtype), l)
        logits = model.logits(h)  # float32 [B, L, vocab]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss_fn


def make_optimizer(a, params):
    import jax
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, max(a.steps, a.warmup + 1),
                                                  end_value=a.lr * a.min_lr_ratio)
    decay_mask = jax.tree.map(lambda x: x.ndim == 2, params)  # matrices decay; norms do not
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=a.weight_decay,
                                  mask=decay_mask))
    return opt, schedule


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)


def train(a) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    t_start = time.perf_counter()
    root = Path(a.stdlib) if a.stdlib else tiny_corpus.stdlib_root()
    corpus = tiny_corpus.load_corpus(root)
    desc = corpus.describe()
    log.info("corpus: %s", json.dumps(desc))
    tok = tiny_corpus.train_tokenizer(corpus.train, a.vocab)
    train_stream = tiny_corpus.token_stream(tok, corpus.train + corpus.chat)
    val_stream = tiny_corpus.token_stream(tok, corpus.val)
    desc.update(train_tokens=int(train_stream.size), val_tokens=int(val_stream.size),
                bytes_per_token=round((desc["train_bytes"] + desc["chat_bytes"]) / train_stream.size, 3))
    log.info("tokens: train %d, val %d (%.2f bytes/token); data ready in %.1f s", train_stream.size,
             val_stream.size, desc["bytes_per_token"], time.perf_counter() - t_start)
    if train_stream.size <= a.seq_len + 1 or val_stream.size <= a.seq_len + 1:
        raise ValueError(f"--seq-len={a.seq_len}: longer than the corpus streams "
                         f"({train_stream.size} training, {val_stream.size} validation tokens)")

    cfg = model_config(a)
    compute = jnp.dtype(a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    params = init_params(cfg, a.seed)
    opt, schedule = make_optimizer(a, params)
    opt_state = opt.init(params)
    loss_fn = make_loss(cfg, compute)

    @jax.jit
    def step_fn(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch[:, :-1], batch[:, 1:])
        updates, opt_state = opt.update(grads, opt_state, params)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return optax.apply_updates(params, updates), opt_state, loss, gnorm

    eval_fn = jax.jit(lambda p, batch: loss_fn(p, batch[:, :-1], batch[:, 1:]))
    n_val = min(a.val_windows, (val_stream.size - 1) // a.seq_len)
    val_batches = [windows(val_stream, np.arange(s, min(s + a.batch, n_val)) * a.seq_len, a.seq_len)
                   for s in range(0, n_val, a.batch)]

    def val_loss(p) -> float:
        sizes = [vb.shape[0] for vb in val_batches]
        return float(sum(float(eval_fn(p, jnp.asarray(vb))) * n for vb, n in zip(val_batches, sizes)) / sum(sizes))

    rng = np.random.default_rng(a.seed)
    tokens_per_step = a.batch * a.seq_len
    log.info("model: %s, %.2fM parameters; compute %s on %s (%s); %d steps x %d tokens", cfg.__class__.__name__,
             cfg.num_parameters() / 1e6, compute.name, jax.default_backend(), jax.devices()[0].device_kind,
             a.steps, tokens_per_step)
    history, recent = [], []
    t_train = time.perf_counter()
    t_log, steps_done, stopped_early = t_train, 0, False
    for step in range(1, a.steps + 1):
        batch = windows(train_stream, rng.integers(0, train_stream.size - a.seq_len - 1, size=a.batch), a.seq_len)
        params, opt_state, loss, gnorm = step_fn(params, opt_state, jnp.asarray(batch))
        steps_done = step
        if step % a.log_every == 0 or step == a.steps or step == 1:
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: training loss is {loss}")
            now = time.perf_counter()
            n = a.log_every if step % a.log_every == 0 else 1
            rate = round(n * tokens_per_step / (now - t_log)) if step > 1 else "compile"
            t_log = now
            recent.append(loss)
            entry = {"step": step, "loss": round(loss, 4), "lr": float(schedule(step)), "grad_norm": float(gnorm),
                     "tok_per_s": rate, "elapsed_s": round(now - t_train, 1)}
            if step % a.eval_every == 0 or step == a.steps:
                entry["val_loss"] = round(val_loss(params), 4)
            history.append(entry)
            log.info(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
            if a.max_seconds and now - t_train > a.max_seconds and step < a.steps:
                log.warning("stopping at step %d: --max-seconds=%s reached (the schedule was for %d steps)",
                            step, a.max_seconds, a.steps)
                stopped_early = True
                break
    train_s = time.perf_counter() - t_train
    final_val = history[-1].get("val_loss") or round(val_loss(params), 4)
    tail = [h["loss"] for h in history if h["step"] > 1][-5:] or [history[-1]["loss"]]
    run = {
        "python": platform.python_version(), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(), "compute_dtype": compute.name, "seed": a.seed, "steps": steps_done,
        "planned_steps": a.steps, "stopped_early": stopped_early, "batch": a.batch, "seq_len": a.seq_len,
        "tokens_seen": steps_done * tokens_per_step, "lr": a.lr, "warmup": a.warmup, "min_lr_ratio": a.min_lr_ratio,
        "weight_decay": a.weight_decay, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss": round(float(np.mean(tail)), 4), "final_val_loss": final_val,
        "command": "python -m tools.train_tiny " + " ".join(sys.argv[1:]),
    }
    log.info("trained in %.1f s: final train loss %.4f (mean of the last %d logged), val loss %.4f",
             train_s, run["final_train_loss"], len(tail), final_val)
    tiny_export.write_model(a.out, cfg, jax.device_get(params), tok, corpus=desc, run=run, history=history)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparsing.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="forward dtype (default: bfloat16 on a GPU, "
                   "float32 on CPU); master weights are float32")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--val-windows", type=int, default=256, help="validation windows of --seq-len tokens")
    p.add_argument("--max-seconds", type=float, default=0, help="stop early after this much training time (0: never)")
    p.add_argument("--stdlib", help="corpus root (default: the running interpreter's standard library)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("steps", "batch", "seq_len", "warmup", "log_every", "eval_every", "val_windows"):
        if getattr(a, name) < 1:
            print(f"error: --{name.replace('_', '-')}={getattr(a, name)}: expected an integer >= 1", file=sys.stderr)
            return 2
    if a.seq_len > a.max_positions:
        print(f"error: --seq-len={a.seq_len} exceeds --max-positions={a.max_positions}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
