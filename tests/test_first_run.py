"""What a new user meets first, run the way a user runs it: the commands as processes on the shipped
model, Ctrl-C at any moment, bfloat16 on the numpy side alone, eos ids of generation_config.json,
the CPU thread count."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import common
from common import interrupt
from common.checkpoint import write_checkpoint
from common.config import Qwen3Config, shrink
from common.textgen import eos_token_ids, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = common.default_model()


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("TRITON_INTERPRET", None)  # what a user's shell has: nothing set
    return env


def _run(*args, timeout=300, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=_env(**env))


def _interrupt_after(delay: float, *args, **env) -> tuple[int, str, str]:
    """Start a command, send SIGINT (what Ctrl-C sends) after `delay` s; (status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=_env(**env))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


# ----- the numpy side reads bfloat16 on its own -----------------------------------------------------

def test_reference_reads_bfloat16_without_another_framework():
    code = textwrap.dedent(f"""
        import sys
        from common.harness import load_reference
        r = load_reference({str(MODEL)!r})
        print(r.generate([[1, 2, 3]], 3))
        assert "jax" not in sys.modules and "torch" not in sys.modules, "a framework was imported"
        """)
    p = _run("-c", code)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr


def test_parity_on_the_shipped_model_prints_its_table():
    pytest.importorskip("transformers")
    p = _run("-m", "common.parity", "--model", str(MODEL))
    assert p.returncode == 0, p.stderr
    assert "| reference | float64 |" in p.stdout and "| hf | float32 |" in p.stdout
    assert "Traceback" not in p.stderr


def test_parity_names_a_runner_that_cannot_load():
    p = _run("-m", "common.parity", "--model", str(MODEL), "--runners", "reference,torch:on")
    if "CUDA" in p.stdout:  # a GPU machine: torch:on loads
        pytest.skip("torch's fused kernels run here")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: runner 'torch:on': ") and "TRITON_INTERPRET=1" in lines[-1]
    assert "Traceback" not in p.stderr


# ----- the generate commands ------------------------------------------------------------------------

def test_readme_generate_command_shows_only_the_projects_lines():
    p = _run("-m", "jax_impl.generate", "--prompt", "def main():", "--max-new-tokens", "8", JAX_PLATFORMS="")
    assert p.returncode == 0, p.stderr
    assert "libtpu" not in p.stderr and "tpu" not in p.stderr.lower()
    assert "first token" in p.stderr and "tok/s" in p.stderr


@pytest.mark.parametrize("twin", ["jax_impl", "torch_impl"])
def test_help_lists_the_chat_flags(twin):
    p = _run("-m", f"{twin}.generate", "--help")
    assert p.returncode == 0
    for flag in ("--no-think", "--system", "--ignore-eos", "(default: 128)"):
        assert flag in p.stdout


def test_interrupt_watchdog_ends_a_stuck_main_thread(tmp_path):
    """A main thread that does not unwind (stuck in native code, or a library swallowing the
    KeyboardInterrupt) is ended by the watchdog: status 130, what was printed kept."""
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from common import interrupt

        def body():
            print("partial output", flush=False)
            while True:
                try:
                    time.sleep(10)
                except KeyboardInterrupt:
                    pass  # swallowed: only the watchdog can end this
        interrupt.main(body)
        """))
    t0 = time.monotonic()
    rc, out, err = _interrupt_after(1.0, str(script))
    assert rc == interrupt.EXIT_INTERRUPTED and out == "partial output\n" and "interrupted" in err
    assert time.monotonic() - t0 < 1.0 + interrupt.GRACE_S + 5
    assert "Traceback" not in err


def test_interrupt_in_a_callback_prints_no_traceback(tmp_path):
    """A Ctrl-C landing in a garbage-collection callback (jax registers one) cannot propagate; Python
    would print it as an ignored exception with a traceback. It ends the process quietly instead."""
    script = tmp_path / "in_gc.py"
    script.write_text(textwrap.dedent(f"""
        import gc, os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from common import interrupt

        def body():
            def callback(phase, info):
                if phase == "start":
                    gc.callbacks.remove(callback)
                    os.kill(os.getpid(), signal.SIGINT)  # delivered inside the callback
                    for _ in range(10 ** 6):
                        pass
            gc.callbacks.append(callback)
            gc.collect()
            print("went on", flush=True)
            time.sleep(30)
        interrupt.main(body)
        """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == interrupt.EXIT_INTERRUPTED, p.stderr
    assert "Traceback" not in p.stderr and "interrupted" in p.stderr


def test_interrupt_while_a_module_imports(tmp_path):
    """A Ctrl-C while an entry module's imports run (outside any try, once install() ran) ends with
    130 and one line, not Python's traceback and death by SIGINT."""
    script = tmp_path / "importing.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from common import interrupt
        interrupt.install()
        print("before the import", flush=False)
        raise KeyboardInterrupt  # where a Ctrl-C during `import numpy` surfaces
        """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == interrupt.EXIT_INTERRUPTED, p.stderr
    assert p.stdout == "before the import\n" and "interrupted" in p.stderr and "Traceback" not in p.stderr


def test_interrupt_inside_an_import_is_not_raised_there(tmp_path):
    """A Ctrl-C while a module's body runs under import (as jaxlib's initialization, where a
    KeyboardInterrupt has ended the process by SIGABRT) is not raised into it: the import goes on,
    and the watchdog ends the process with 130 and one line after GRACE_S."""
    (tmp_path / "slow_module.py").write_text(textwrap.dedent("""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGINT)
        print("the import went on", flush=True)
        time.sleep(60)
        """))
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(tmp_path)!r})
        from common import interrupt
        interrupt.install()
        import slow_module
        """))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == interrupt.EXIT_INTERRUPTED, p.stderr
    assert p.stdout == "the import went on\n" and "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 50, "the watchdog ended the process, not the module's sleep"


def test_entry_modules_install_the_handler_before_heavy_imports():
    """What runs before interrupt.install() cannot exit 130 on a Ctrl-C: the entry modules import
    only the standard library and common.interrupt at module level (numpy alone takes a second to
    import on a busy machine)."""
    code = ("import sys\n"
            "import jax_impl.generate, torch_impl.generate, jax_impl.tune, torch_impl.tune, bench.__main__, bench.isolate\n"
            "print(sorted(m for m in ('numpy', 'jax', 'torch', 'tokenizers', 'safetensors', 'ml_dtypes') if m in sys.modules))")
    p = _run("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"imported before the Ctrl-C handler: {p.stdout.strip()}"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.0, 2.0, 3.0, 4.5, 6.0])
def test_ctrl_c_at_any_moment_of_jax_generate(delay):
    """While importing, loading, compiling (the moment that used to end in a segfault) or decoding."""
    rc, out, err = _interrupt_after(delay, "-m", "jax_impl.generate", "--prompt", "def main():",
                                    "--max-new-tokens", "1900", "--ignore-eos")
    assert rc == 130, f"status {rc}; stderr: {err[-500:]}"
    assert "Traceback" not in err and "interrupted" in err


@pytest.mark.parametrize("module", ["common.parity", "bench"])
def test_ctrl_c_in_parity_and_bench(module, tmp_path):
    args = ["--model", str(MODEL), "--runners", "reference,hf"] if module == "common.parity" else \
        ["decode", "--smoke", "--out", str(tmp_path / "b"), "--no-plots"]
    rc, _, err = _interrupt_after(2.0, "-m", module, *args)
    assert rc == 130, f"status {rc}; stderr: {err[-500:]}"
    assert "Traceback" not in err


# ----- eos ids of generation_config.json (Qwen3 lists two) ------------------------------------------

CFG = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-0.6B"), layers=1, width=16, vocab=1024),
                          dtype="float32", max_position_embeddings=256)


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("eos") / "ckpt", CFG, seed=3, tokenizer=True,
                            embed_std=1.0)


def _load(twin: str, d):
    if twin == "jax":
        pytest.importorskip("jax")
        import jax_impl

        return jax_impl.load(d, dtype="float32", fused=False)
    pytest.importorskip("torch")
    import torch_impl

    return torch_impl.load(d, dtype="float32", fused=False)


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_generation_stops_at_each_eos_id_of_generation_config(twin, eos_dir, tmp_path):
    runner = _load(twin, eos_dir)
    tok = load_tokenizer(eos_dir)
    prompt = tok.encode("The quick brown").ids
    free = runner.generate([prompt], 12)[0]  # no eos: the whole budget
    assert len(free) == 12
    # Two eos ids as Qwen3 lists them; the run must stop at whichever comes first, kept as last token.
    for pos, slot in ((6, 1), (3, 0)):
        first = next(i for i, t in enumerate(free) if t == free[pos])  # earliest occurrence of that token
        other = next(t for t in range(CFG.vocab_size) if t not in free)
        ids = [other, free[pos]] if slot == 1 else [free[pos], other]
        (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "do_sample": False}))
        eos = eos_token_ids(eos_dir, tok)
        assert eos == ids
        assert runner.generate([prompt], 12, eos_token_id=eos)[0] == free[:first + 1]
        streamed = [t for chunk in runner.generate_stream(prompt, 12, eos_token_id=eos) for t in chunk]
        assert streamed == free[:first + 1]


# ----- the CPU thread count -------------------------------------------------------------------------

def test_torch_uses_half_the_cores_unless_told(monkeypatch):
    torch = pytest.importorskip("torch")
    from torch_impl import building

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
        assert building.cpu_threads() == 3
        building.use_cpu_threads()
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert building.cpu_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(5)
        building.use_cpu_threads()
        assert torch.get_num_threads() == 5  # the user's setting stands
    finally:
        torch.set_num_threads(before)
