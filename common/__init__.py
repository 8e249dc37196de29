"""Framework-neutral core shared by jax_impl and torch_impl.

Nothing here imports jax or torch at module level: numpy, safetensors, tokenizers and
jinja2 only. See ARCHITECTURE in the README for where each concern lives.
"""

from common.config import Qwen3Config, ConfigError

__all__ = ["Qwen3Config", "ConfigError"]
