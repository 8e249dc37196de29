"""jax_impl compiles once: a second process reuses the first's compiled programs (jax's persistent
compilation cache in the user's cache directory), and the cache can be turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import common

pytest.importorskip("jax")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    hits = []
    jax.monitoring.register_event_listener(lambda e, **_: hits.append(e) if e.endswith("cache_hits") else None)
    import jax_impl
    r = jax_impl.load({model!r}, dtype="float32", compile_cache={cache})
    r.generate([[1, 2, 3]], 20)
    print(json.dumps(dict(hits=len(hits), compile_s=r.last_stats["compile_s"], cache=str(r.compile_cache))))
    """)


def _run(tmp_path, cache: bool = True, **env) -> dict:
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT.format(root=str(ROOT), model=str(common.default_model()), cache=cache))
    full_env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", **env)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=full_env)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_compiled_programs(tmp_path):
    first = _run(tmp_path)
    assert first["cache"] == str(tmp_path / "cache" / "qwen3-fused" / "jax")
    assert any(Path(first["cache"]).iterdir()), "nothing was written to the compilation cache"
    second = _run(tmp_path)
    assert second["hits"] >= 3, second  # prefill and both decode programs came from disk
    assert first["hits"] == 0


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_the_cache_can_be_turned_off(tmp_path, how):
    out = _run(tmp_path, cache=how != "argument", **({"QWEN3_FUSED_COMPILE_CACHE": "0"} if how == "environment"
                                                       else {}))
    assert out["cache"] == "None" and not (tmp_path / "cache" / "qwen3-fused").exists()


def test_turning_it_off_after_a_load_turned_it_on_says_so(monkeypatch, caplog):
    """jax cannot turn its cache off again: a later compile_cache=False (or the variable set late)
    reports the cache as on, where it is, and logs why once - not None while programs are cached."""
    import logging

    from jax_impl import compilation

    monkeypatch.setitem(compilation._state, "cache", Path("/cache/in/use"))
    monkeypatch.setitem(compilation._state, "said_on", False)
    monkeypatch.setenv(compilation.ENV_OFF, "1")
    with caplog.at_level(logging.INFO, logger="jax_impl"):
        assert compilation.enable_persistent_cache(False) == Path("/cache/in/use")
        monkeypatch.setenv(compilation.ENV_OFF, "0")
        assert compilation.enable_persistent_cache(True) == Path("/cache/in/use")
    said = [r.getMessage() for r in caplog.records if "stays on" in r.getMessage()]
    assert len(said) == 1 and "/cache/in/use" in said[0], said
