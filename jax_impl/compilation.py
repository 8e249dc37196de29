"""What jax compiles, and keeping it: the compile-time clock and the persistent compilation cache.

- `compile_seconds()`: seconds jax has spent tracing, lowering and compiling in the calling thread
  (`all_threads=True`: in the process; jax.monitoring events), so a call's report can keep compile
  time apart from prefill and decode while other threads compile its next programs.
- `enable_persistent_cache()`: XLA's compiled programs kept on disk across processes in
  `$XDG_CACHE_HOME/qwen3-fused/jax/` (else `~/.cache/qwen3-fused/jax/`), every program however small.
  Off with `QWEN3_FUSED_COMPILE_CACHE=0` (values: common.environment) (or `load(..., compile_cache=False)`, `--no-compile-cache`)
  before the process's first load (jax cannot turn it off again);
  a cache directory the user configured for jax already is left as it is.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax

from common.environment import ENV, check_environment, env_enabled

log = logging.getLogger("jax_impl")

ENV_OFF = ENV  # QWEN3_FUSED_COMPILE_CACHE
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds: dict[int, float] = {}  # per thread (jax reports an event in the thread that did the work)
_state = {"cache": None}


def _on_duration(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        t = threading.get_ident()
        _compile_seconds[t] = _compile_seconds.get(t, 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds(all_threads: bool = False) -> float:
    """Seconds jax has spent tracing, lowering and compiling since this module was imported, in the
    calling thread (all_threads: in every thread)."""
    if all_threads:
        return sum(list(_compile_seconds.values()))
    return _compile_seconds.get(threading.get_ident(), 0.0)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen3-fused" / "jax"


def enable_persistent_cache(enabled: bool = True) -> Path | None:
    """Turn on jax's persistent compilation cache in cache_dir() (once per process); returns the
    directory in use, or None when it is off. jax cannot turn the cache off again once on: asked to
    after an earlier load turned it on, this says so (logged once) and returns the directory."""
    check_environment()  # QWEN3_FUSED_COMPILE_CACHE and QWEN3_TILE_TABLES take only their values
    off = not enabled or not env_enabled()
    if _state["cache"] is not None:
        if off and not _state.get("said_on"):
            _state["said_on"] = True
            log.info(f"jax_impl: the compilation cache stays on in this process ({_state['cache']}): an earlier "
                     f"load turned it on, and jax cannot turn it off again")
        return _state["cache"]
    if off:
        return None
    configured = jax.config.jax_compilation_cache_dir
    path = Path(configured) if configured else cache_dir()
    if not configured:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning(f"jax_impl: compilation cache off ({path}: {e.strerror})")
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _state["cache"] = path
    return path
