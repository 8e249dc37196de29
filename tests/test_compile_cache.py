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


# ----- torch_impl: the same switch, over Triton's kernel cache --------------------------------------

TORCH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch_impl
    r = torch_impl.load({model!r}, dtype="float32", compile_cache={cache})
    import triton
    d = triton.knobs.cache.dir
    print(json.dumps(dict(cache=r.compile_cache, knob=d, env=os.environ.get("TRITON_CACHE_DIR"),
                          exists=os.path.isdir(d))))
    """)


@pytest.mark.parametrize("how", ["argument", "environment", "default"])
def test_torch_no_compile_cache_keeps_nothing(tmp_path, how):
    """compile_cache=False (--no-compile-cache) or QWEN3_FUSED_COMPILE_CACHE=0: Triton compiles into a
    temporary directory of the process, removed at exit; by default Triton's own cache is left alone."""
    pytest.importorskip("triton")
    script = tmp_path / "torch_gen.py"
    script.write_text(TORCH_SCRIPT.format(root=str(ROOT), model=str(common.default_model()),
                                          cache=how != "argument"))
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), TRITON_HOME=str(tmp_path / "home"))
    env.pop("TRITON_CACHE_DIR", None)
    if how == "environment":
        env["QWEN3_FUSED_COMPILE_CACHE"] = "off"
    (tmp_path / "tmp").mkdir()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if how == "default":
        assert out["cache"] == out["knob"] == str(tmp_path / "home" / ".triton" / "cache") and out["env"] is None
        return
    assert out["cache"] == out["knob"] == out["env"] and out["exists"], out
    assert Path(out["cache"]).parent == tmp_path / "tmp"
    assert not Path(out["cache"]).exists(), "the temporary kernel cache outlived the process"


def test_torch_generate_no_compile_cache_leaves_no_directory(tmp_path):
    """The command ends through os._exit (common.interrupt): the temporary cache is removed there too."""
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    p = subprocess.run([sys.executable, "-m", "torch_impl.generate", "--no-compile-cache", "--prompt", "x",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("qwen3-fused-triton-*"))


# ----- the environment variables take only their values ------------------------------------------------

BAD_ENV = [("QWEN3_FUSED_COMPILE_CACHE", "maybe",
            "QWEN3_FUSED_COMPILE_CACHE='maybe': expected 1, true, on, yes (the cache on, the default) or 0, "
            "false, off, no (off)"),
           ("QWEN3_TILE_TABLES", "bogus", "QWEN3_TILE_TABLES='bogus': expected 'on' (the default) or 'off'")]


@pytest.mark.parametrize("twin", ["jax_impl", "torch_impl"])
@pytest.mark.parametrize("name, value, message", BAD_ENV)
def test_a_bad_environment_value_is_one_error_line(twin, name, value, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{name: value})
    p = subprocess.run([sys.executable, "-m", f"{twin}.generate", "--prompt", "x", "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith(f"error: {message}") and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("twin", ["jax_impl", "torch_impl"])
@pytest.mark.parametrize("name, value, message", BAD_ENV)
def test_load_checks_the_environment(twin, name, value, message, monkeypatch):
    import importlib

    pytest.importorskip(twin.split("_")[0])
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as e:
        importlib.import_module(twin).load(common.default_model(), dtype="float32", fused=False)
    assert str(e.value).startswith(message)
