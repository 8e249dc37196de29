"""Framework-neutral core shared by jax_impl and torch_impl.

Nothing here imports jax or torch at module level: numpy, safetensors, tokenizers and
jinja2 only. See ARCHITECTURE in the README for where each concern lives.
"""

from pathlib import Path

from common.config import Qwen3Config, ConfigError


def default_model() -> Path:
    """The directory of the tiny Qwen3 that ships with the package (common/default_model/; its
    README.md is the model card, tools/train_tiny.py trains it). Raises FileNotFoundError when the
    installed package lacks it."""
    path = Path(__file__).resolve().parent / "default_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the shipped model is missing (no config.json); reinstall the "
                                f"package or pass a checkpoint directory")
    return path


__all__ = ["Qwen3Config", "ConfigError", "default_model"]
