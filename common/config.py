"""Typed, validated Qwen3 configuration with the Hugging Face field names.

`Qwen3Config` is frozen: derive variants with `dataclasses.replace(cfg, ...)` (validation runs
again). `from_pretrained(dir)` reads a checkpoint's config.json; `preset(name)` returns the
published values of the six dense Qwen3 models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value or config.json that does not describe a dense Qwen3 model."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r}: expected a positive number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: expected an even number (RoPE rotates halves)")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings={self.tie_word_embeddings!r}: expected true or false")
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        h, i, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = h * self.qkv_size + self.q_size * h + 3 * h * i + 2 * h + 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + l * per_layer + h + head

    def decode_bytes_per_token(self, bytes_per_param: int = 2, projection_bytes: int | None = None,
                               head_bytes: int | None = None) -> int:
        """Weight bytes one batch-1 decode step must read (the embedding row itself is negligible);
        projection_bytes: of the four projections' values when they are quantized, head_bytes: of the
        lm_head's when it is (1 for the one-byte formats; their float32 scales, under 0.4% more, are
        left out). None: bytes_per_param."""
        h, l = self.hidden_size, self.num_hidden_layers
        proj = h * self.qkv_size + self.q_size * h + 3 * h * self.intermediate_size
        rest = 2 * h + 2 * self.head_dim
        per_byte = bytes_per_param if projection_bytes is None else projection_bytes
        head = bytes_per_param if head_bytes is None else head_bytes
        return l * (per_byte * proj + bytes_per_param * rest) + bytes_per_param * h + head * self.vocab_size * h

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Qwen3Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "Qwen3Config":
        """Build from a config.json dict; refuses anything that is not a dense Qwen3."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type is not None and model_type != "qwen3":
            raise ConfigError(f"{source}: model_type={model_type!r}, expected 'qwen3'")
        if archs and not any(a in ("Qwen3ForCausalLM", "Qwen3Model") for a in archs):
            raise ConfigError(f"{source}: architectures={archs!r}, expected ['Qwen3ForCausalLM']")
        if model_type is None and not archs:
            raise ConfigError(f"{source}: neither model_type nor architectures is set; expected a Qwen3 config")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope_type={rope_type!r}; only the default RoPE of dense Qwen3 is supported")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (dense Qwen3 uses full attention)")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3 has no attention biases)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r}, expected 'silu'")
        theta = d.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        dtype = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        heads = d["num_attention_heads"]
        kwargs = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            tie_word_embeddings=d.get("tie_word_embeddings", False), dtype=dtype,
        )
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Qwen3Config":
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"{path}: model directory does not exist")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: missing config.json (expected a Hugging Face checkpoint directory)")
        try:
            d = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object")
        return cls.from_dict(d, source=str(cfg_path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents in the Hugging Face layout (both rope spellings, for old and new readers)."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
            attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
            sliding_window=None, rope_scaling=None, torch_dtype=self.dtype, use_cache=True,
            initializer_range=0.02, bos_token_id=None, eos_token_id=None,
        )
        return d


_SHARED = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
               max_position_embeddings=40960, dtype="bfloat16")


def _preset(hidden, inter, layers, heads, kv, tied):
    return Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       **_SHARED)


PRESETS: dict[str, Qwen3Config] = {
    "Qwen3-0.6B": _preset(1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": _preset(2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": _preset(2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": _preset(4096, 12288, 36, 32, 8, False),
    "Qwen3-14B": _preset(5120, 17408, 40, 40, 8, False),
    "Qwen3-32B": _preset(5120, 25600, 64, 64, 8, False),
}


def shrink(cfg: Qwen3Config, *, layers: int = 2, width: int = 8, vocab: int | None = 512) -> Qwen3Config:
    """A small config with a preset's head_dim, GQA ratio and tie flag, for CPU tests.

    hidden/intermediate and head counts are divided by `width` (kv heads keep the GQA ratio).
    """
    kv = max(1, cfg.num_key_value_heads // width)
    heads = kv * cfg.group_size
    return dataclasses.replace(
        cfg, num_hidden_layers=layers, hidden_size=max(16, cfg.hidden_size // width),
        intermediate_size=max(16, cfg.intermediate_size // width), num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab or cfg.vocab_size, max_position_embeddings=4096)
