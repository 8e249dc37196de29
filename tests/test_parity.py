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
