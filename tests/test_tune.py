"""The tuners (`python -m jax_impl.tune`, `python -m torch_impl.tune`): --smoke on CPU writes a table
the lookup accepts, a rerun resumes, no GPU is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import tiles
from common.tune import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_smoke_writes_a_valid_table_and_resumes(framework, tmp_path, capsys):
    pytest.importorskip(framework)
    out = tmp_path / "table.json"
    args = ["--smoke", "--preset", "Qwen3-0.6B", "--batch", "1", "--contexts", "64",
            "--kernels", "linear_residual,decode_attention", "--out", str(out)]
    assert main(framework, args) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == tiles.FORMAT and doc["framework"] == framework
    entries = tiles._read_table(out, framework)
    assert entries.keys() == doc["entries"].keys()  # every entry passes the lookup's checks
    layouts = 1 if framework == "jax" else 2
    assert len(entries) == 2 + layouts  # o_proj and down; decode attention per layout
    for key, entry in entries.items():
        assert entry["path"] in ("fused", "plain") and entry["us"] > 0 and entry["tiles"], key
    capsys.readouterr()
    assert main(framework, args) == 0  # a rerun finds everything done
    assert "0 shapes to tune" in capsys.readouterr().err
    assert json.loads(out.read_text()) == doc


def test_budget_stops_between_measurements_leaving_a_valid_table(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "table.json"
    assert main("torch", ["--smoke", "--preset", "Qwen3-0.6B", "--batch", "1,2", "--kernels", "linear_residual",
                          "--budget-s", "0.000001", "--out", str(out)]) == 0
    assert not out.exists() or tiles._read_table(out, "torch") == json.loads(out.read_text())["entries"]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_no_gpu_is_refused_and_help_lists_the_flags(framework):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", f"{framework}_impl.tune", "--preset", "Qwen3-0.6B"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    if "no CUDA GPU" not in p.stderr:
        pytest.skip("a GPU is here")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    h = subprocess.run([sys.executable, "-m", f"{framework}_impl.tune", "--help"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
    for flag in ("--model", "--preset", "--batch", "--budget-s", "--out", "--smoke"):
        assert flag in h.stdout


def test_smoke_needs_out():
    with pytest.raises(SystemExit, match="--out"):
        main("torch", ["--smoke", "--preset", "Qwen3-0.6B"])


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_smoke_tunes_quantized_projections_in_their_own_rows(framework, tmp_path):
    pytest.importorskip(framework)
    out = tmp_path / "table.json"
    assert main(framework, ["--smoke", "--preset", "Qwen3-0.6B", "--batch", "1", "--quantization", "int8",
                            "--kernels", "linear_residual,mlp_gate_up,decode_attention", "--out", str(out)]) == 0
    entries = tiles._read_table(out, framework)
    assert len(entries) == 3 and all(key.endswith("/bfloat16-int8") for key in entries), entries.keys()
