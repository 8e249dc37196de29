"""The project's environment variables that switch things, read and checked in one place.

- QWEN3_FUSED_COMPILE_CACHE: 1/true/on/yes (the default: compiled programs kept on disk; jax_impl:
  jax's persistent compilation cache, torch_impl: Triton's kernel cache) or 0/false/off/no (nothing
  read from or kept on disk: jax_impl leaves jax's cache off, torch_impl points Triton at a
  temporary directory removed at exit). `load(..., compile_cache=False)` and --no-compile-cache
  do the same.
- QWEN3_TILE_TABLES: on (the default) or off (common.tiles: the default rule alone).

Any other value is an error naming the variable, its value and the values it takes, on every
backend (a CPU run that never reads a tile table included): `check_environment()`.
"""

from __future__ import annotations

import os

ENV = "QWEN3_FUSED_COMPILE_CACHE"
ON_VALUES = ("1", "true", "on", "yes")
OFF_VALUES = ("0", "false", "off", "no")


def env_enabled() -> bool:
    """Whether QWEN3_FUSED_COMPILE_CACHE leaves the compile cache on (unset or empty: on)."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower()
    if value in ("", *ON_VALUES):
        return True
    if value in OFF_VALUES:
        return False
    raise ValueError(f"{ENV}={raw!r}: expected {', '.join(ON_VALUES)} (the cache on, the default) or "
                     f"{', '.join(OFF_VALUES)} (off)")


def check_environment() -> None:
    """Raise ValueError (one line) for a value of QWEN3_FUSED_COMPILE_CACHE or QWEN3_TILE_TABLES that
    is neither of the values it takes."""
    from common import tiles

    env_enabled()
    tiles.tables_on()
