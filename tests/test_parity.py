"""python -m common.parity: the reference and transformers agree on a checkpoint written by
common.checkpoint; the comparison maths; errors for unknown runners and missing models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from common import parity
from common.checkpoint import write_checkpoint
from common.config import Qwen3Config, shrink
from common.harness import load_reference

pytest.importorskip("transformers")

CFG = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-4B"), layers=2, width=16, vocab=1000), dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # embed_std 1.0 gives peaked logits, so greedy generation has clear winners to agree on.
    return write_checkpoint(tmp_path_factory.mktemp("parity") / "ckpt", CFG, seed=11, embed_std=1.0)


@pytest.mark.parametrize("dtype, bound", [("float64", 1e-5), ("float32", 1e-5)])
def test_reference_and_transformers_agree(model_dir, tmp_path, capsys, dtype, bound):
    out = tmp_path / "parity.json"
    rc = parity.main(["--model", str(model_dir), "--runners", "reference,hf", "--dtype", dtype,
                      "--json", str(out), "--batch", "2", "--prompt-len", "12", "--new-tokens", "6"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "| runner | dtype | max abs err | max rel err | argmax agree |" in stdout
    assert f"| hf | {dtype} |" in stdout and "| reference | float64 |" in stdout
    report = json.loads(out.read_text())
    assert report["baseline"] == "reference" and report["dtype"] == dtype
    assert np.array(report["token_ids"]).shape == (2, 12)
    rows = {r["runner"]: r for r in report["rows"]}
    assert set(rows) == {"reference", "hf"}
    assert rows["reference"]["max_abs_err"] == 0.0
    hf = rows["hf"]
    assert 0 < hf["max_rel_err"] < bound, hf["max_rel_err"]
    assert hf["argmax_agree"] == 1.0
    assert hf["greedy_identical"] and hf["greedy_match"] == [6, 6] and hf["greedy_total"] == 12
    assert hf["generated"] == rows["reference"]["generated"]
    # the table shows the same numbers as the JSON
    assert f"{hf['max_rel_err']:.3g}" in stdout


def test_max_rel_err_gate_fails(model_dir, capsys):
    rc = parity.main(["--model", str(model_dir), "--runners", "hf", "--new-tokens", "2", "--max-rel-err", "1e-12"])
    assert rc == 1
    assert "exceeds --max-rel-err" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--runners", "reference,nosuch"], "unknown runner 'nosuch'"),
    (["--runners", "reference", "--baseline", "nosuch"], "unknown runner 'nosuch'"),
    (["--runners", " , "], "--runners"),
])
def test_unknown_runner_is_a_one_line_error(model_dir, capsys, argv, needle):
    rc = parity.main(["--model", str(model_dir), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_or_bad_model(tmp_path, capsys):
    assert parity.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "--model: directory" in capsys.readouterr().err
    assert parity.main(["--model", str(tmp_path)]) == 2  # a directory without config.json
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --model is required
        parity.main([])
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


# ----- everything is checked before any runner runs ----------------------------------------------

def _one_error_line(err: str) -> str:
    """stderr of a command refused before anything ran: one error line (no runner's progress line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("runners", ["reference,jax", "reference,hf,torch:off"])
def test_a_dtype_a_runner_cannot_compute_in_is_refused_up_front(model_dir, capsys, runners):
    rc = parity.main(["--model", str(model_dir), "--runners", runners, "--dtype", "float64"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    twin = runners.rsplit(",", 1)[-1]
    assert f"--dtype float64: runner '{twin}'" in line and "float32, bfloat16, float16" in line


def test_help_says_which_runners_take_float64(capsys):
    with pytest.raises(SystemExit):
        parity.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "float64 for hf only" in out


def test_a_prompt_past_the_context_is_refused_up_front(model_dir, capsys):
    rc = parity.main(["--model", str(model_dir), "--prompt-len", "100000"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "--prompt-len 100000 + --new-tokens 8 exceeds the model's max_position_embeddings 4096" in line


def test_a_prompt_past_this_machines_memory_is_refused_up_front(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(parity, "host_memory_bytes", lambda: 2 ** 20)  # a machine of 1 MiB
    rc = parity.main(["--model", str(model_dir), "--prompt-len", "16"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "--prompt-len 16: comparing 2 prompts of that length takes at least" in line
    assert "this machine has 1.0 MiB" in line and "--batch" in line


def test_memory_lower_bound_of_a_real_model():
    cfg = Qwen3Config.preset("Qwen3-0.6B")
    need = parity.min_host_bytes(cfg, ["reference", "hf"], reference_dtype="float64", batch=2, prompt_len=100_000)
    assert need > 2 * 2 ** 40  # scores of 16 heads x 100000^2 in float64, twice: 2.3 TiB
    small = parity.min_host_bytes(cfg, ["reference", "hf"], reference_dtype="float64", batch=2, prompt_len=16)
    assert small < 5 * 2 ** 30  # the weights in float64: the default comparison is not refused
    assert parity.min_host_bytes(cfg, ["hf", "jax"], reference_dtype="float64", batch=2, prompt_len=16) < 2 ** 30


def test_a_runner_that_cannot_run_here_is_refused_before_the_others_run(model_dir, capsys, monkeypatch):
    torch_ops = pytest.importorskip("torch_impl.ops")
    from common import harness

    if torch_ops.gpu_capability() is not None:
        pytest.skip("a GPU: torch's fused kernels run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # on CPU they run only in Triton's interpreter
    rc = parity.main(["--model", str(model_dir), "--runners", "reference,hf,torch:on"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith("error: runner 'torch:on': ") and "TRITON_INTERPRET=1" in line
    monkeypatch.setitem(harness.RUNNER_PACKAGES, "hf", ("no_such_package_here",))
    rc = parity.main(["--model", str(model_dir), "--runners", "reference,hf"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "runner 'hf' is not available: no_such_package_here not installed" in line


def test_a_runner_failing_midway_keeps_the_finished_rows(model_dir, tmp_path, capsys, monkeypatch):
    from common import hf_runner

    def fails(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 1.16 TiB for an array")

    monkeypatch.setattr(hf_runner.HFRunner, "generate", fails)
    out = tmp_path / "parity.json"
    rc = parity.main(["--model", str(model_dir), "--runners", "reference,hf", "--prompt-len", "4",
                      "--new-tokens", "2", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "| reference | float64 | 0 | 0 | 100.0% |" in captured.out and "| hf |" not in captured.out
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: runner 'hf' failed: MemoryError: Unable to allocate 1.16 TiB for an array"]
    assert "Traceback" not in captured.err
    report = json.loads(out.read_text())
    assert [r["runner"] for r in report["rows"]] == ["reference"]
    assert report["failed"] == [{"runner": "hf", "error": "MemoryError: Unable to allocate 1.16 TiB for an array"}]


def test_json_never_overwrites(model_dir, tmp_path, capsys):
    out = tmp_path / "parity.json"
    out.write_text("mine")
    rc = parity.main(["--model", str(model_dir), "--json", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--json {out}" in line and out.read_text() == "mine"


# ----- the comparison maths ----------------------------------------------------------------------

def test_compare_logits():
    base = np.array([[[1.0, -4.0, 2.0], [0.5, 0.0, 0.1]]])
    other = base.copy()
    other[0, 1, 1] = 0.6  # changes the argmax of position 1 and the max abs error to 0.6
    r = parity.compare_logits(other, base)
    assert r["max_abs_err"] == pytest.approx(0.6)
    assert r["max_rel_err"] == pytest.approx(0.6 / 4.0)
    assert r["argmax_agree"] == 0.5 and r["finite"]
    nan = other.copy()
    nan[0, 0, 0] = np.nan
    r = parity.compare_logits(nan, base)
    assert r["max_abs_err"] == float("inf") and not r["finite"]
    with pytest.raises(ValueError, match="shape"):
        parity.compare_logits(base[:, :1], base)


def test_compare_generations():
    r = parity.compare_generations([[1, 2, 3, 4], [5, 6], [7]], [[1, 2, 9, 4], [5, 6], [8]])
    assert r["greedy_match"] == [2, 2, 0] and r["greedy_matched"] == 4 and r["greedy_total"] == 7
    assert not r["greedy_identical"]
    assert parity.compare_generations([[1, 2]], [[1, 2]])["greedy_identical"]
    assert parity.compare_generations([[1]], [[1, 2]])["greedy_match"] == [1]  # stopped early
    with pytest.raises(ValueError):
        parity.compare_generations([[1]], [[1], [2]])


class _Skewed:
    """A runner that is the reference with a bug: logits scaled by 1.01, generation diverges at token 3."""

    def __init__(self, model_dir, dtype="float32"):
        self._ref = load_reference(model_dir)
        self.config = self._ref.config

    def logits(self, ids):
        return self._ref.logits(ids) * 1.01

    def generate(self, prompts, max_new_tokens, **kw):
        out = self._ref.generate(prompts, max_new_tokens, **kw)
        return [g[:3] + [(t + 1) % self.config.vocab_size for t in g[3:]] for g in out]


def test_run_parity_detects_a_wrong_runner(model_dir):
    report = parity.run_parity(model_dir, ["reference", "skewed"], loaders={"skewed": _Skewed},
                               prompt_len=8, batch=2, new_tokens=5)
    row = {r["runner"]: r for r in report["rows"]}["skewed"]
    assert row["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert row["greedy_match"] == [3, 3] and not row["greedy_identical"]
    assert "| skewed | float32 |" in parity.markdown_table(report)


# ----- the transformers runner itself ------------------------------------------------------------

@pytest.fixture(scope="module")
def hf(model_dir):
    from common.hf_runner import load

    return load(model_dir, dtype="float64")


def test_hf_runner_stops_at_eos_like_the_reference(model_dir, hf):
    ref = load_reference(model_dir)
    prompt = [[5, 17, 300, 42]]
    free = ref.generate(prompt, 6)[0]
    assert hf.generate(prompt, 6) == [free]
    eos = free[2]
    cut = free[:free.index(eos) + 1]  # eos included, nothing after it
    assert ref.generate(prompt, 6, eos_token_id=eos) == [cut]
    assert hf.generate(prompt, 6, eos_token_id=[999, eos]) == [cut]


def test_hf_runner_sampling(hf):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = hf.generate(prompts, 6, temperature=1.0, top_k=50, top_p=0.9, seed=5)
    assert a == hf.generate(prompts, 6, temperature=1.0, top_k=50, top_p=0.9, seed=5)
    assert [len(g) for g in a] == [6, 6]
    # top_k=1 leaves one token to draw: greedy
    assert hf.generate(prompts, 6, temperature=0.8, top_k=1, seed=9) == hf.generate(prompts, 6)


def test_hf_runner_bad_arguments(model_dir, hf):
    from common.hf_runner import load
    from common.sampling import GenerationArgsError

    with pytest.raises(ValueError, match="dtype='int8'"):
        load(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="fused='sometimes'"):
        load(model_dir, fused="sometimes")
    with pytest.raises(GenerationArgsError, match="top_p=0"):
        hf.generate([[1]], 2, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="token_ids"):
        hf.logits([[CFG.vocab_size]])


def test_runner_spec_carries_the_fused_flag(model_dir):
    seen = []

    def load(d, *, dtype, fused="auto"):
        seen.append((dtype, fused))
        return load_reference(d)

    report = parity.run_parity(model_dir, ["reference", "x:on", "x:off", "x"], loaders={"x": load},
                               prompt_len=4, batch=1, new_tokens=2)
    assert seen == [("float32", True), ("float32", False), ("float32", "auto")]
    assert [r["runner"] for r in report["rows"]] == ["reference", "x:on", "x:off", "x"]
    with pytest.raises(ValueError, match="must be auto, on or off"):
        parity.parse_runner("jax:maybe")
