"""The tuners (`python -m jax_impl.tune`, `python -m torch_impl.tune`): --smoke on CPU writes a table
the lookup accepts (from a plain shell too), a rerun resumes, an interrupted or budget-stopped sweep
leaves a valid table, a run that measured nothing fails, bad input and no GPU are one `error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import measure.tune
from common import tiles
from measure.tune import main

ROOT = Path(__file__).resolve().parents[1]
WRITE_ENTRY = tiles.write_entry
# four shapes (o_proj and down at batch 1 and 2), fast to set up on CPU
FOUR_SHAPES = ["--smoke", "--preset", "Qwen3-0.6B", "--kernels", "linear_residual", "--batch", "1,2"]


def _fake_timing(monkeypatch, us: float, interrupt_after: int | None = None, on_write=None) -> list[str]:
    """Time every candidate as `us` microseconds without running it (a KeyboardInterrupt once
    `interrupt_after` entries are written); the keys written, in order."""
    written: list[str] = []

    def write_entry(*args, **kwargs):
        path = WRITE_ENTRY(*args, **kwargs)
        written.append(args[2])
        if on_write:
            on_write()
        return path

    def time_chain(*args):
        if interrupt_after is not None and len(written) >= interrupt_after:
            raise KeyboardInterrupt
        return {"median_s": us * 1e-6}

    monkeypatch.setattr(tiles, "write_entry", write_entry)
    monkeypatch.setattr(measure.tune, "time_chain", time_chain)
    return written


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


def test_budget_stops_between_measurements_leaving_a_valid_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "table.json"
    now = [0.0]  # the clock jumps past the budget once the first entry is written

    def jump():
        now[0] += 100.0

    monkeypatch.setattr(measure.tune, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    written = _fake_timing(monkeypatch, us=1.0, on_write=jump)
    assert main("torch", FOUR_SHAPES + ["--budget-s", "10", "--out", str(out)]) == 0
    assert "budget spent (--budget-s 10): 3 of 4 shapes left" in capsys.readouterr().err
    entries = tiles._read_table(out, "torch")
    assert list(entries) == written and len(written) == 1
    assert entries == json.loads(out.read_text())["entries"]


def test_budget_spent_before_any_entry_is_nothing_measured(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(measure.tune, "time", types.SimpleNamespace(monotonic=iter(range(0, 10**6, 100)).__next__))
    _fake_timing(monkeypatch, us=1.0)
    out = tmp_path / "table.json"
    assert main("torch", FOUR_SHAPES + ["--budget-s", "10", "--out", str(out)]) == 1
    assert "nothing measured: the budget ran out" in capsys.readouterr().err and not out.exists()


def test_interrupted_sweep_leaves_a_valid_table_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "table.json"
    first = _fake_timing(monkeypatch, us=1.0, interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        main("torch", FOUR_SHAPES + ["--out", str(out)])
    entries = tiles._read_table(out, "torch")
    assert sorted(entries) == sorted(first) and len(first) == 2
    assert entries == json.loads(out.read_text())["entries"]
    assert not list(tmp_path.glob("*.tmp")), list(tmp_path.iterdir())
    capsys.readouterr()
    second = _fake_timing(monkeypatch, us=2.0)
    assert main("torch", FOUR_SHAPES + ["--out", str(out)]) == 0
    assert "2 shapes to tune (2 in" in capsys.readouterr().err
    assert len(second) == 2 and not set(second) & set(first)
    after = tiles._read_table(out, "torch")
    assert {k: after[k] for k in first} == entries  # the earlier entries were not measured again
    assert sorted(after) == sorted(first + second)


def test_a_write_interrupted_before_the_rename_keeps_the_table(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    tiles.write_entry("torch", tiles.Device.cpu(), "rms_norm/m1/n16/bfloat16", "plain", None, table=out)
    before = out.read_text()

    def interrupted(self, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiles.write_entry("torch", tiles.Device.cpu(), "rms_norm/m2/n16/bfloat16", "plain", None, table=out)
    monkeypatch.undo()
    assert out.read_text() == before and not list(tmp_path.glob("*.tmp")), list(tmp_path.iterdir())


def test_nothing_measured_says_so_and_fails(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")

    def broken(*args):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(measure.tune, "time_chain", broken)
    out = tmp_path / "table.json"
    assert main("torch", FOUR_SHAPES + ["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "error: python -m torch_impl.tune: nothing measured: no candidate ran at any of the 4 shapes" in captured.err
    assert str(out) in captured.err and captured.out == "" and not out.exists()


def test_torch_smoke_runs_from_a_plain_shell(tmp_path):
    """No TRITON_INTERPRET in the environment: --smoke turns Triton's interpreter on itself."""
    pytest.importorskip("torch")
    out = tmp_path / "table.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "torch_impl.tune", "--smoke", "--preset", "Qwen3-0.6B", "--batch", "1",
                        "--kernels", "linear_residual", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(out) and out.is_file(), p.stderr[-2000:]
    assert len(tiles._read_table(out, "torch")) == 2  # o_proj and down


@pytest.mark.parametrize("args, expected", [
    (["--batch", "abc"], "argument --batch: 'abc': expected comma-separated positive integers"),
    (["--batch", "0"], "argument --batch: '0': expected comma-separated positive integers"),
    (["--batch", "-1"], "argument --batch: '-1': expected comma-separated positive integers"),
    (["--budget-s", "0"], "argument --budget-s: '0': expected a positive number of seconds"),
    (["--model", "/nonexistent"], "argument --model: /nonexistent: model directory does not exist"),
    (["--model", "EMPTY_DIR"], "argument --model: EMPTY_DIR/config.json: missing config.json"),
    (["--preset", "Qwen3-9B"], "argument --preset: 'Qwen3-9B': unknown preset; expected one of Qwen3-0.6B"),
    (["--kernels", "lm_head"], "argument --kernels: 'lm_head': unknown; expected some of rmsnorm_qkv"),
    (["--kernels", "prefill_attention"], "--kernels prefill_attention needs --prefill LENGTHS"),
    (["--kernels", "rms_norm", "--quantization", "int8"], "--quantization int8 tunes only linear_residual"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_is_one_error_line(args, expected, tmp_path, capsys):
    args = [a.replace("EMPTY_DIR", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        main("torch", ["--preset", "Qwen3-0.6B", "--out", str(tmp_path / "t.json")] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: " + expected.replace("EMPTY_DIR", str(tmp_path))), err
    assert err.rstrip().endswith("see python -m torch_impl.tune --help"), err


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_bad_model_from_the_shell_is_one_error_line(framework):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", f"{framework}_impl.tune", "--model", "/nonexistent"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.startswith("error: argument --model: /nonexistent: ") and p.stderr.count("\n") == 1, p.stderr


def test_a_table_of_the_other_framework_is_refused(tmp_path, capsys):
    out = tmp_path / "jax.json"
    tiles.write_entry("jax", tiles.Device.cpu(), "rms_norm/m1/n16/bfloat16", "plain", None, table=out)
    before = out.read_text()
    with pytest.raises(ValueError) as e:
        tiles.write_entry("torch", tiles.Device.cpu(), "rms_norm/m2/n16/bfloat16", "plain", None, table=out)
    assert str(out) in str(e.value) and "'jax'" in str(e.value) and "'torch'" in str(e.value), e.value
    assert out.read_text() == before
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as e:
        main("torch", FOUR_SHAPES + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --out: tile table {out}: its framework is 'jax'"), err
    assert out.read_text() == before


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


def test_smoke_needs_out(capsys):
    with pytest.raises(SystemExit) as e:
        main("torch", ["--smoke", "--preset", "Qwen3-0.6B"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --smoke writes to --out FILE")


@pytest.mark.timeout(1800)  # torch: about 5 minutes on two busy CPU cores, the suite's slowest
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_smoke_tunes_quantized_projections_in_their_own_rows(framework, tmp_path):
    pytest.importorskip(framework)
    out = tmp_path / "table.json"
    assert main(framework, ["--smoke", "--preset", "Qwen3-0.6B", "--batch", "1", "--quantization", "int8",
                            "--kernels", "linear_residual,mlp_gate_up,decode_attention", "--out", str(out)]) == 0
    entries = tiles._read_table(out, framework)
    assert len(entries) == 3 and all(key.endswith("/bfloat16-int8") for key in entries), entries.keys()


def _not_a_table_of(framework: str):
    other = "jax" if framework == "torch" else "torch"
    return {
        "other JSON": lambda p: p.write_text('{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024}\n'),
        "JSON with entries but no format": lambda p: p.write_text('{"entries": {}}\n'),
        "text": lambda p: p.write_text("notes I keep\n"),
        "bytes": lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
        "the other framework's table": lambda p: tiles.write_entry(other, tiles.Device.cpu(),
                                                                   "rms_norm/m1/n16/bfloat16", "plain", None, table=p),
    }


def _refused(framework, out, monkeypatch, capsys) -> str:
    """main with --out `out`: exit 2 before anything is timed, one `error: --out: <out>` line; that line."""
    timed = []
    monkeypatch.setattr(measure.tune, "time_chain", lambda *args: timed.append(args) or {"median_s": 1e-6})
    with pytest.raises(SystemExit) as e:
        main(framework, FOUR_SHAPES + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and not timed, err
    assert err.startswith("error: --out: ") and f"{out}: " in err and "expected" in err, err
    assert err.rstrip().endswith(f"see python -m {framework}_impl.tune --help"), err
    return err


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("kind", list(_not_a_table_of("torch")))
def test_out_naming_a_file_that_is_not_a_table_of_this_framework_is_refused_untouched(framework, kind, tmp_path,
                                                                                       monkeypatch, capsys):
    pytest.importorskip(framework)
    out = tmp_path / "config.json"
    _not_a_table_of(framework)[kind](out)
    before = out.read_bytes()
    _refused(framework, out, monkeypatch, capsys)
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_out_naming_a_directory_or_an_unwritable_place_is_refused_before_measuring(framework, tmp_path, monkeypatch,
                                                                                    capsys):
    pytest.importorskip(framework)
    (tmp_path / "outdir").mkdir()
    assert "a directory" in _refused(framework, tmp_path / "outdir", monkeypatch, capsys)
    assert "does not exist" in _refused(framework, tmp_path / "missing" / "t.json", monkeypatch, capsys)
    (tmp_path / "file").write_text("x\n")
    assert "is not a folder" in _refused(framework, tmp_path / "file" / "t.json", monkeypatch, capsys)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "outdir")  # root writes anywhere
    assert "is not writable" in _refused(framework, tmp_path / "outdir" / "t.json", monkeypatch, capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "outdir"]


def test_default_table_folders_are_made_but_an_unwritable_one_is_refused(tmp_path, monkeypatch, capsys):
    """Without --out the user's table folders are made as needed; the nearest existing one must be writable."""
    pytest.importorskip("torch")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = measure.tune.parser("tune")
    a = p.parse_args(["--preset", "Qwen3-0.6B"])
    assert measure.tune._out(p, a, "torch", tiles.Device.cpu()) == tiles.table_path("torch", tiles.Device.cpu(),
                                                                                   user=True)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as e:
        measure.tune._out(p, a, "torch", tiles.Device.cpu())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: your tile table: ") and f"{tmp_path} is not writable" in err


# --smoke's plan with no other flags, at every preset: a bound on what it times (not on how long it takes)
SMOKE_MAX_SHAPES, SMOKE_MAX_RUNS, SMOKE_MAX_CANDIDATES, SMOKE_MAX_DIM, SMOKE_MAX_STEPS = 8, 24, 2, 256, 256


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_smoke_plan_is_small(framework, tmp_path):
    pytest.importorskip(framework)
    from common import tile_rules
    from common.config import PRESETS

    for preset in PRESETS:
        plan = measure.tune.plan(framework, ["--smoke", "--preset", preset, "--out", str(tmp_path / "t.json")])
        rows = [(j.kernel, j.shape, j.case.tokens, j.case.ctx if j.kernel == "decode_attention" else None,
                 j.candidates) for j in plan]
        assert {r[0] for r in rows} == {"linear_residual", "rmsnorm_qkv", "mlp_gate_up", "rms_norm",
                                        "decode_attention"}, rows
        assert len(rows) <= SMOKE_MAX_SHAPES and sum(1 + len(r[4]) for r in rows) <= SMOKE_MAX_RUNS, rows
        assert {r[2] for r in rows} == {1} and {r[3] for r in rows} - {None} == {64}, rows
        assert all(1 <= len(r[4]) <= SMOKE_MAX_CANDIDATES for r in rows), rows
        assert all(v <= SMOKE_MAX_DIM for r in rows for k, v in r[1].items() if k in ("n", "k")), rows
        assert sum(tile_rules._steps(t, r[1]) for r in rows for t in r[4]) <= SMOKE_MAX_STEPS, rows
        keys = [tiles.shape_key(r[0], "bfloat16", r[1]) for r in rows]
        assert len(set(keys)) == len(keys), keys


def test_smoke_takes_the_flags_sizes_and_measures_each_shape_once(tmp_path):
    """--batch/--contexts name more than smoke's one each; a model given twice is measured once."""
    pytest.importorskip("torch")
    plan = measure.tune.plan("torch", ["--smoke", "--preset", "Qwen3-0.6B", "--preset", "Qwen3-0.6B", "--batch", "1,8",
                                      "--contexts", "64,128", "--kernels", "decode_attention",
                                      "--out", str(tmp_path / "t.json")])
    assert sorted((j.case.tokens, j.case.ctx) for j in plan) == [(b, c) for b in (1, 8) for c in (64, 64, 128, 128)]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_help_states_each_default_once(framework):
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="400")
    h = subprocess.run([sys.executable, "-m", f"{framework}_impl.tune", "--help"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
    assert h.returncode == 0, h.stderr
    options = {line.split()[0]: line for line in h.stdout.splitlines() if line.lstrip().startswith("--")}
    for bad in ("(default: [])", "(default: None)", "(default: )", "(default: False)"):
        assert bad not in h.stdout, h.stdout
    assert all(line.count("default") <= 1 for line in options.values()), h.stdout
    assert "(default: 1,8,32,128; with --smoke: 1)" in options["--batch"], h.stdout
    assert "(default: 512,4096; with --smoke: 64)" in options["--contexts"], h.stdout
    assert "(default: your table for this GPU)" in options["--out"], h.stdout
    assert "(default: no limit)" in options["--budget-s"], h.stdout


def test_out_naming_a_pipe_is_refused_without_reading_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "fifo"
    os.mkfifo(out)
    assert "not a regular file" in _refused("torch", out, monkeypatch, capsys)
