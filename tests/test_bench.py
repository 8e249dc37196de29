"""The benchmark suite stays alive on CPU: the --smoke run writes its results, compare flags
regressions, and without a GPU (and without --smoke) the suite refuses to run. Each job runs in a
process of its own: one that crashes or overruns the budget becomes error rows and the suite goes on."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from bench import compare, report
from bench.__main__ import main
from common.ops import TILED_OPS

pytest.importorskip("jax")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    rc = main(["all", "--smoke", "--out", str(out)])
    return rc, out, json.loads((out / report.JSON_NAME).read_text())


KERNEL_OPS = TILED_OPS  # every op of common.ops but the final norm


def _rows(doc, **match):
    return [r for r in doc["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_smoke_writes_env_ceilings_and_files(smoke):
    rc, out, doc = smoke
    assert rc == 0
    run = doc["runs"][0]
    env = run["env"]
    for key in ("date", "commit", "versions", "gpu"):
        assert env.get(key), f"env lacks {key}: {env}"
    assert "jax" in env["versions"] and "numpy" in env["versions"]
    assert run["ceilings"]["copy_GBps"] > 0 and run["ceilings"]["matmul_TFLOPs"] > 0, run["ceilings"]
    assert set(run["ceilings"]["by_framework"]) == {"torch", "jax"}, run["ceilings"]
    assert run["settings"]["isolation"] == "process per job"
    md = (out / report.MD_NAME).read_text()
    assert "| model | implementation |" in md and "| framework | op |" in md
    # on CPU the report says so: no "on none", no GPU ceilings rounded to 0
    assert " on CPU (" in md and "CPU ceilings measured in the run (no GPU)" in md and " on none" not in md, md
    assert " 0 TFLOP/s" not in md and " 0 GB/s" not in md, md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "decode.png").stat().st_size > 0 and (out / "kernels_bw.png").stat().st_size > 0


def test_smoke_kernel_rows(smoke):
    _, _, doc = smoke
    for op in KERNEL_OPS:
        plain = _rows(doc, kind="kernel", framework="jax", impl="plain", op=op)
        assert plain, f"no jax plain {op} rows"
        for r in plain:
            assert r.get("median_s", 0) > 0 and r["bytes"] > 0 and r["flops"] > 0, r
            assert r["GBps"] > 0 and r["pct_copy_bw"] > 0 and r["n_layers"] >= 2, r
    # --smoke skips no kernel by design: every row of both frameworks, fused (in the interpreters)
    # and plain, ran, so every one carries its figures and no error.
    for fw in ("jax", "torch"):
        for impl in ("fused", "plain"):
            assert {r["op"] for r in _rows(doc, kind="kernel", framework=fw, impl=impl)} == set(KERNEL_OPS), (fw, impl)
    # the fused rows ran in the kernel interpreters: the rows and the table say so
    assert {r["kernels"] for r in _rows(doc, kind="kernel", impl="fused")} == {"interpreter"}
    assert {r["kernels"] for r in _rows(doc, kind="kernel", impl="plain")} == {None}
    md = (smoke[1] / report.MD_NAME).read_text()
    assert "| jax (fused: interpreter) | mlp |" in md and "| torch (fused: interpreter) | mlp |" in md, md
    assert "| 0 (" not in md and "| 0.0 (" not in md, md  # a CPU's small GB/s and TFLOP/s keep their digits
    for r in _rows(doc, kind="kernel"):
        assert "error" not in r, f"kernel row failed: {r}"
        assert r.get("median_s", 0) > 0 and r.get("GBps", 0) > 0, f"kernel row without figures: {r}"
    for r in _rows(doc, kind="kernel", impl="fused"):
        assert _rows(doc, kind="kernel", impl="plain", framework=r["framework"], op=r["op"], tokens=r["tokens"]), r
        assert r.get("speedup_vs_plain", 0) > 0, r


def test_smoke_prefill_attention_has_the_sdpa_peer(smoke):
    """torch's job times scaled_dot_product_attention beside prefill_attention on the same case: its
    rows carry figures, torch's fused row its speedup over it, the table a column of it."""
    _, out, doc = smoke
    sdpa = _rows(doc, kind="kernel", impl="sdpa")
    assert sdpa and {(r["framework"], r["op"]) for r in sdpa} == {("torch", "prefill_attention")}, sdpa
    for r in sdpa:
        assert "error" not in r and r["median_s"] > 0 and r["TFLOPs"] > 0 and r["kernels"] is None, r
        assert r["flops"] == _rows(doc, kind="kernel", impl="fused", framework="jax", op=r["op"],
                                   tokens=r["tokens"])[0]["flops"], r
    fused = _rows(doc, kind="kernel", impl="fused", framework="torch", op="prefill_attention")
    assert fused and all(r["speedup_vs_sdpa"] > 0 for r in fused), fused
    assert "| SDPA us, TFLOP/s (fused speedup) |" in (out / report.MD_NAME).read_text()


def test_smoke_decode_rows(smoke):
    _, _, doc = smoke
    jax_plain = _rows(doc, kind="decode", impl="jax-plain")
    assert jax_plain and all(r.get("decode_tok_s", 0) > 0 for r in jax_plain), jax_plain
    for r in jax_plain:
        assert r["generated"] == r["batch"] * r["new_tokens"], r
        assert r["bw_floor_tok_s"] > 0 and r["pct_bw_floor"] > 0 and r["prefill_tok_s"] > 0, r
    impls = {r["impl"] for r in _rows(doc, kind="decode")}
    assert impls == {"jax-fused", "jax-plain", "torch-fused", "torch-plain", "hf-eager", "hf-compile", "jax-int8",
                     "jax-fp8", "torch-int8", "torch-fp8", "nanovllm"}, impls
    assert {r["weights"] for r in _rows(doc, kind="decode") if r["impl"].endswith("fp8")} == {"fp8"}
    assert {r["quantization"] for r in _rows(doc, kind="decode") if r["impl"].endswith("int8")} == {"int8"}
    assert {r["quantization"] for r in _rows(doc, kind="decode") if r["impl"].endswith("fused")} == {None}
    # the shrunk model is named as what it is, in every row and in the report
    from bench.__main__ import model_label

    shrunk = model_label("Qwen3-0.6B", smoke=True)
    assert shrunk.startswith("Qwen3-0.6B shrunk (2 layers") and shrunk != "Qwen3-0.6B"
    assert {r["model"] for r in doc["rows"]} == {shrunk}
    assert f"| {shrunk} |" in (smoke[1] / report.MD_NAME).read_text()
    # the twins' fused rows ran in the kernel interpreters; plain rows are the frameworks' own ops
    for r in _rows(doc, kind="decode"):
        fused = r["impl"].startswith(("jax-", "torch-")) and not r["impl"].endswith("plain")
        assert r["kernels"] == ("interpreter" if fused else None), r
        assert ("interpreter" in r["label"]) == fused, r
        if fused:
            assert f"{'Pallas' if r['impl'].startswith('jax') else 'Triton'} interpreter on CPU" in r["label"], r
    for r in _rows(doc, kind="decode"):
        if r["impl"].startswith(("jax", "torch")) and "error" not in r:
            assert r["weights_GB"] > 0, r
    # The impls --smoke skips by design (SMOKE_SKIP) say so; every other row ran: figures, no error.
    from bench.__main__ import SMOKE_SKIP

    for r in _rows(doc, kind="decode"):
        if r["impl"] in SMOKE_SKIP:
            assert r.get("error", "").startswith("skipped in --smoke"), r
            assert not r.get("decode_tok_s"), r
        else:
            assert "error" not in r, f"decode row {r['impl']} failed: {r}"
            assert r.get("decode_tok_s", 0) > 0 and r.get("prefill_tok_s", 0) > 0, r
            assert r["generated"] == r["batch"] * r["new_tokens"], r
            # generate()'s own wall time gives the end-to-end figure, beside decode tok/s
            assert r["end_to_end_tok_s"] > 0 and r["end_to_end_tok_s"] == max(r["end_to_end_tok_s_runs"]), r
    assert {r["impl"] for r in _rows(doc, kind="decode") if "error" not in r} == impls - set(SMOKE_SKIP)
    # The twins' rows keep their first call apart (bench.decode: last_stats' compile_s and
    # first_token_s of the first warm-up run); a fresh jax runner's first call compiles its programs.
    for r in _rows(doc, kind="decode"):
        if r["impl"].startswith(("jax-", "torch-")) and "error" not in r:
            assert r["first_call_compile_s"] >= 0 and r["first_call_first_token_s"] > 0, r
            assert r["warmup_s"] >= r["first_call_first_token_s"], r
            if r["impl"].startswith("jax-"):
                assert r["first_call_compile_s"] > 0, r


def _doc(kernel_us: float, decode_tok_s: float, error: str | None = None) -> dict:
    k = dict(kind="kernel", framework="jax", impl="fused", op="mlp", model="Qwen3-8B", phase="decode",
             tokens=1, ctx=None, median_s=kernel_us * 1e-6)
    d = dict(kind="decode", impl="jax-fused", model="Qwen3-8B", batch=1, prompt_len=16, new_tokens=256,
             decode_tok_s=decode_tok_s, prefill_tok_s=1000.0)
    if error:
        d = dict(d, decode_tok_s=None, error=error)
    return dict(schema=1, runs=[], rows=[k, d])


def test_quantization_flag_picks_the_fused_rows_formats():
    from bench.decode import with_quantization

    assert with_quantization(["jax-fused", "torch-fused", "hf-compile", "jax-fp8"], ["none", "int8"]) == \
        ["jax-fused", "jax-int8", "torch-fused", "torch-int8", "hf-compile"]
    assert with_quantization(["jax-fused", "jax-plain"], ["fp8"]) == ["jax-fp8", "jax-plain"]
    assert with_quantization(["torch-fused", "nanovllm"], ["int8"]) == ["torch-int8", "nanovllm"]  # no "-" in it


@pytest.mark.parametrize("new, expected", [
    (_doc(110.0, 150.0), 1),    # kernel 10% slower
    (_doc(100.0, 135.0), 1),    # decode 10% fewer tok/s
    (_doc(102.0, 147.0), 0),    # 2% either way: noise, passes
    (_doc(90.0, 160.0), 0),     # faster
    (_doc(100.0, 150.0, error="RuntimeError: boom"), 1),  # measured before, fails now
])
def test_compare_flags_regressions_over_5_percent(tmp_path, new, expected):
    old_p, new_p = tmp_path / "old.json", tmp_path / "new.json"
    old_p.write_text(json.dumps(_doc(100.0, 150.0)))
    new_p.write_text(json.dumps(new))
    assert main(["compare", str(old_p), str(new_p)]) == expected


def test_compare_and_merge_on_the_smoke_results(smoke, tmp_path):
    _, out, doc = smoke
    assert main(["compare", str(out), str(out)]) == 0
    worse = copy.deepcopy(doc)
    r = next(r for r in worse["rows"] if r.get("kind") == "decode" and r.get("decode_tok_s"))
    r["decode_tok_s"] *= 0.9
    findings, _ = compare.compare(doc, worse)
    assert [f["key"] for f in findings if f["regression"]] == [" ".join(
        str(v) for v in compare.row_key(r) if v is not None)]
    merged = report.merge([doc, worse])
    assert len(merged["rows"]) == len(doc["rows"]) and len(merged["runs"]) == 2
    assert main(["report", str(out), "--out", str(tmp_path / "merged"), "--no-plots"]) == 0
    assert (tmp_path / "merged" / report.JSON_NAME).is_file()


def test_compare_bad_file_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.json"), str(tmp_path)]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_without_gpu_and_without_smoke_exits_nonzero(tmp_path, capsys):
    from bench.env import has_gpu

    if has_gpu()[0]:
        pytest.skip("checks the refusal on a machine without a GPU")
    assert main(["kernels", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--smoke" in err
    assert not (tmp_path / report.JSON_NAME).exists()


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="^error: --models.*unknown preset.*Qwen3-9B"):
        main(["kernels", "--smoke", "--models", "Qwen3-9B", "--out", str(tmp_path)])


def test_jax_kernel_chain_lowers_for_cuda():
    """The timed jax chain (barriers, per-layer buffers, fori_loop) lowers through Triton for CUDA
    on CPU at a real preset's shapes: what the GPU run will compile."""
    import functools
    import types

    import jax
    import jax.numpy as jnp

    from bench import kernels
    from measure import op_chains
    from measure.timing import TimingPlan, jax_chain
    from common.config import PRESETS

    K = pytest.importorskip("jax_impl.kernels")
    fused = types.SimpleNamespace(mlp=functools.partial(K.mlp, interpret=False))
    c = kernels.Case("Qwen3-0.6B", PRESETS["Qwen3-0.6B"], "mlp", "decode", 1, 1024)
    s = kernels.Settings(TimingPlan(), min_bytes=0, max_layers=2)
    n = kernels.num_layers(c, s)
    carry, layers, shared, body_for = op_chains.setup(c, n, "jax", None)
    spec = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    text = jax_chain(body_for(fused), n).trace(spec(carry), spec(layers), spec(shared),
                                               jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    # each kernel is lowered once (jax_impl.kernels._lib.pallas_call) and called once per layer
    assert text.count("xla.gpu.triton") == 2, "expected the two MLP kernels as Triton calls"
    calls = text.count("call @mlp_norm_gate_up(") + text.count("call @mlp_down(")
    assert calls == 2 * n, f"expected the two MLP kernels called in each of {n} layers, found {calls} calls"
    assert "optimization_barrier" in text


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_decode_profile_smoke(tmp_path, framework):
    """The decode-step profiler runs the real generation programs (tiny shapes on CPU) and writes JSON;
    off a GPU it skips the kernel breakdown (--no-profile)."""
    from bench import profile

    out = tmp_path / "profile.json"
    assert profile.main(["--framework", framework, "--smoke", "--presets", "Qwen3-0.6B", "--fused", "plain",
                         "--steps", "4", "--json", str(out)]
                        + (["--no-profile"] if framework == "torch" else ["--trace", str(tmp_path / "trace")])) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["preset"] == "Qwen3-0.6B" and row["fused"] == "plain" and row["batch"] == 1
    assert row["tok_s"] > 0 and row["us_per_step"] > 0 and ("kernels" in row or framework == "torch")
    if framework == "jax":  # no GPU kernels here: an empty trace
        assert json.loads((tmp_path / "trace" / "jax-Qwen3-0.6B-plain-b1.json").read_text()) == []
    assert row["sampling"] is None
    assert profile.main(["--framework", framework, "--smoke", "--presets", "Qwen3-0.6B", "--fused", "plain",
                         "--steps", "4", "--json", str(out), "--no-profile", "--sampling", "0.7,40,0.95"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["sampling"] == dict(temperature=0.7, top_k=40, top_p=0.95) and row["tok_s"] > 0
    with pytest.raises(SystemExit, match="--sampling"):
        profile.main(["--framework", framework, "--smoke", "--sampling", "0.7,40"])


def test_decode_profile_counts_idle_time_before_each_kernel(tmp_path):
    """Idle before a launch runs from the latest end of the kernels before it; overlapping kernels
    (programmatic dependent launch) count none; the trace keeps every kernel from the first start."""
    from bench import profile

    events = [(1000.0, 500.0, "a_1"), (1600.0, 300.0, "b"), (1800.0, 400.0, "a_2"), (2700.0, 100.0, "b"),
              (2750.0, 50.0, "c")]  # ns; a_2 overlaps b by 100 ns; c starts inside the second b
    prof = profile.per_step(events, steps=1)
    assert prof["a"] == (0.9, 2, 0.0) and prof["b"] == pytest.approx((0.4, 2, 0.1 + 0.5)) and prof["c"][2] == 0.0
    assert list(prof) == ["a", "b", "c"]  # the longest first
    profile.write_trace(tmp_path / "t.json", events[::-1])
    rows = json.loads((tmp_path / "t.json").read_text())
    assert rows[0] == [0.0, 500.0, "a_1"] and rows[-1] == [1750.0, 50.0, "c"]


# ----- every job in a process of its own (bench/isolate.py) ---------------------------------------

FAKE_WORKER = '''
import json, os, signal, sys, time
job, rows = json.load(open(sys.argv[1])), sys.argv[2]
def row(**r):
    with open(rows, "a") as f:
        f.write(json.dumps(r) + "\\n")
if job["kind"] == "ceilings":
    row(by_framework={job["framework"]: dict(copy_GBps=10.0, matmul_TFLOPs=1.0)})
elif job.get("impl") == "jax-plain" or job["kind"] == "test":
    row(kind="decode", impl="jax-plain", model=job.get("model", "Qwen3-0.6B"), batch=1, prompt_len=8, new_tokens=4,
        decode_tok_s=123.0)
    print("boom: a simulated crash", file=sys.stderr, flush=True)
    if job.get("how") == "sleep":
        time.sleep(60)
    if job.get("how") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(3)
else:
    from bench import isolate
    sys.exit(isolate.main(sys.argv[1:]))
'''


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    from bench import isolate

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(isolate, "WORKER", (str(script),))
    return isolate


def test_crashing_child_becomes_error_rows_and_the_suite_goes_on(fake_worker, tmp_path):
    out = tmp_path / "out"
    assert main(["decode", "--smoke", "--impls", "jax-plain,torch-plain", "--batch", "1,2", "--out", str(out),
                 "--no-plots"]) == 0
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert doc["runs"][0]["ceilings"]["copy_GBps"] == 10.0
    (done,), (lost,) = _rows(doc, impl="jax-plain", batch=1), _rows(doc, impl="jax-plain", batch=2)
    assert done["decode_tok_s"] == 123.0 and "error" not in done, done
    assert "exited with code 3" in lost["error"] and "boom: a simulated crash" in lost["error"], lost
    torch_rows = _rows(doc, impl="torch-plain")
    assert [r["batch"] for r in torch_rows] == [1, 2], torch_rows
    assert all(r.get("decode_tok_s", 0) > 0 for r in torch_rows), torch_rows
    assert "torch_impl, plain torch ops" in (out / report.MD_NAME).read_text()


@pytest.mark.parametrize("how, expected", [
    ("exit", "child process exited with code 3"),
    ("kill", "child process killed by signal SIGKILL"),
    ("sleep", "after the --budget-s deadline"),
])
def test_child_failures_name_the_cause(fake_worker, monkeypatch, how, expected):
    monkeypatch.setattr(fake_worker, "KILL_MARGIN_S", 0.5)
    expected_rows = [dict(kind="decode", impl="jax-plain", model="Qwen3-0.6B", batch=b, prompt_len=8, new_tokens=4)
                     for b in (1, 2, 3)]
    got = []
    failure = fake_worker.run_job(dict(kind="test", how=how, deadline_unix=time.time() + 1), emit=got.append,
                                  expected=expected_rows)
    assert expected in failure and "boom" in failure, failure
    assert [r["batch"] for r in got] == [1, 2, 3] and got[0]["decode_tok_s"] == 123.0, got
    assert all(r["error"] == failure for r in got[1:]), got


def test_jobs_past_the_budget_and_in_process_failures_become_rows(fake_worker):
    row = dict(kind="decode", impl="jax-plain", model="Qwen3-0.6B", batch=1, prompt_len=8, new_tokens=4)
    got = []
    fake_worker.run_job(dict(kind="test", deadline_unix=time.time() - 1), emit=got.append, expected=[row])
    assert got == [dict(row, error="skipped: time budget (--budget-s) spent")]  # no child started
    got.clear()
    failure = fake_worker.run_job(dict(kind="nope"), emit=got.append, expected=[row], in_process=True)
    assert got == [dict(row, error=failure)] and "job kind 'nope'" in failure, got


def test_in_process_runs_the_same_jobs(tmp_path):
    out = tmp_path / "out"
    assert main(["decode", "--smoke", "--in-process", "--impls", "jax-plain", "--out", str(out), "--no-plots"]) == 0
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert doc["runs"][0]["settings"]["isolation"] == "in-process"
    assert doc["runs"][0]["ceilings"]["copy_GBps"] > 0
    (row,) = _rows(doc, kind="decode")
    assert row["impl"] == "jax-plain" and row.get("decode_tok_s", 0) > 0, row


def test_device_seconds_are_cut_into_identical_runs():
    """jax rows on a GPU: the profiler's kernel events of R identical runs, split per run in start order."""
    from measure.timing import _device_seconds_per_run

    ev = [(t, d, "k") for t, d in enumerate([1_000, 2_000, 3_000, 1_500, 2_000, 3_000])]
    assert _device_seconds_per_run(ev, 2) == [6e-6, 6.5e-6]
    assert _device_seconds_per_run(ev[:5], 2) == [4.75e-6, 4.75e-6]  # uneven: the mean for each
    with pytest.raises(RuntimeError, match="no GPU kernels"):
        _device_seconds_per_run([], 3)


def test_decode_with_random_weights_needs_no_checkpoint(tmp_path):
    """--random-weights: the twins' load_random and transformers from its config, no files written."""
    out = tmp_path / "r"
    assert main(["decode", "--smoke", "--random-weights", "--impls", "torch-plain,hf-eager", "--out", str(out),
                 "--no-plots"]) == 0
    doc = json.loads((out / report.JSON_NAME).read_text())
    rows = [r for r in doc["rows"] if r["kind"] == "decode"]
    assert {r["impl"] for r in rows} == {"torch-plain", "hf-eager"}
    for r in rows:
        assert "error" not in r and r["decode_tok_s"] > 0, r
    assert doc["runs"][0]["settings"]["random_weights"] is True


def test_untuned_rows_run_without_the_tile_tables(tmp_path, monkeypatch):
    """--tiles tuned,untuned: each twin's fused row twice, the untuned one under QWEN3_TILE_TABLES=off
    (the default rule alone) and labelled so; plain rows once; the setting is restored after each job."""
    from bench import decode
    from common.tiles import TABLES_ENV

    seen = []

    def fake(impl, model, cfg, path, batches, base, **kw):
        seen.append((impl, base["tiles"], __import__("os").environ.get(TABLES_ENV)))
        kw["emit"](dict(base, batch=batches[0], decode_tok_s=1.0))

    monkeypatch.setattr(decode, "_measure", fake)
    monkeypatch.delenv(TABLES_ENV, raising=False)
    out = tmp_path / "t"
    assert main(["decode", "--smoke", "--in-process", "--impls", "torch-fused,torch-plain", "--tiles",
                 "tuned,untuned", "--out", str(out), "--no-plots"]) == 0
    assert seen == [("torch-fused", "tuned", None), ("torch-fused", "untuned", "off"), ("torch-plain", "tuned", None)]
    rows = _rows(json.loads((out / report.JSON_NAME).read_text()), kind="decode")
    assert [(r["impl"], r["tiles"]) for r in rows] == [("torch-fused", "tuned"), ("torch-fused", "untuned"),
                                                         ("torch-plain", "tuned")]
    assert "untuned" in rows[1]["label"] and "untuned" not in rows[0]["label"]
    md = (out / report.MD_NAME).read_text()
    assert md.count("torch_impl, fused Triton kernels") == 2, md  # the two rows stay apart in the table
    assert compare.row_key(rows[0]) != compare.row_key(rows[1])
    with pytest.raises(SystemExit, match="--tiles"):
        main(["decode", "--smoke", "--tiles", "tuned,sometimes", "--out", str(tmp_path / "x")])


def test_sampled_decode_rows(tmp_path):
    """--sampling T,K,P: the twins sample (no eos: every token generated), rows carry the settings,
    the report says so, and compare keeps sampled and greedy rows apart."""
    from bench.compare import row_key

    out = tmp_path / "sampled"
    assert main(["decode", "--smoke", "--impls", "jax-plain,torch-plain", "--sampling", "0.7,40,0.95",
                 "--out", str(out), "--no-plots"]) == 0
    doc = json.loads((out / report.JSON_NAME).read_text())
    rows = _rows(doc, kind="decode")
    assert {r["impl"] for r in rows} == {"jax-plain", "torch-plain"}
    for r in rows:
        assert "error" not in r, r
        assert r["sampling"] == dict(temperature=0.7, top_k=40, top_p=0.95), r
        assert r["generated"] == r["batch"] * r["new_tokens"] and r["decode_tok_s"] > 0, r
        assert row_key(r) != row_key(dict(r, sampling=None))
    assert "### Sampled decode (temperature 0.7, top-k 40, top-p 0.95;" in (out / "bench.md").read_text()


@pytest.mark.parametrize("value", ["0.7,40", "0,40,0.9", "0.7,x,0.9", "0.7,40,1.5"])
def test_bad_sampling_is_one_line(value, tmp_path):
    with pytest.raises(SystemExit, match="--sampling=.*expected TEMPERATURE,TOP_K,TOP_P"):
        main(["decode", "--smoke", "--impls", "jax-plain", "--sampling", value, "--out", str(tmp_path)])


def test_nanovllm_row_times_decode_as_the_difference_of_two_generates(tmp_path, monkeypatch):
    """The nano-vllm row: one engine for the largest batch, greedy as its smallest temperature, decode
    time = generating new_tokens less generating one (the prefill), the engine shut down after."""
    import importlib.machinery
    import sys
    import types

    import torch_impl.nanovllm as integration
    from bench import decode

    calls = []

    class FakeLLM:
        def __init__(self, path, **kw):
            calls.append(("init", path, kw))

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(("generate", len(prompts), params.max_tokens, params.temperature))
            time.sleep(0.02 * params.max_tokens)
            return [{"token_ids": [1] * params.max_tokens} for _ in prompts]

        def exit(self):
            calls.append(("exit",))

    class FakeParams:
        def __init__(self, temperature, max_tokens, ignore_eos):
            assert temperature > 1e-10 and ignore_eos
            self.temperature, self.max_tokens = temperature, max_tokens

    fake = types.ModuleType("nanovllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("nanovllm", None)
    monkeypatch.setitem(sys.modules, "nanovllm", fake)

    def install(**kw):  # nano-vllm imports only once installed (its flash_attn placeholder, when missing)
        calls.append(("install", kw))
        fake.LLM, fake.SamplingParams = FakeLLM, FakeParams

    monkeypatch.setattr(integration, "install", install)
    monkeypatch.setattr(integration, "uninstall", lambda: calls.append(("uninstall",)))
    monkeypatch.setattr(decode, "_sync", lambda device: None)
    cfg = decode.Qwen3Config.preset("Qwen3-0.6B")
    rows = []
    decode.measure("nanovllm", "Qwen3-0.6B", cfg, tmp_path, [1, 4], prompt_len=16, new_tokens=5, runs=1, warmup=0,
                   torch_device="cuda", ceilings={}, emit=rows.append, progress=lambda m: None)
    assert calls[0] == ("install", {"use_fused_kernels": "auto"})
    assert calls[1][0] == "init" and calls[1][2]["max_num_seqs"] == 4 and calls[1][2]["max_model_len"] == 256
    assert calls[-2:] == [("exit",), ("uninstall",)]
    gens = [c for c in calls if c[0] == "generate"]
    assert [(c[1], c[2]) for c in gens] == [(1, 5), (1, 1), (4, 5), (4, 1)]
    assert {c[3] for c in gens} == {decode.NANOVLLM_GREEDY_TEMPERATURE}
    assert [r["batch"] for r in rows] == [1, 4] and all("error" not in r for r in rows), rows
    for r in rows:
        assert r["generated"] == r["batch"] * 5 and "no greedy path" in r["note"], r
        assert 0.06 < r["decode_s"] < 0.5 and 0.015 < r["prefill_s"] < r["decode_s"], r
    rows.clear()
    decode.measure("nanovllm", "Qwen3-0.6B", cfg, None, [1], prompt_len=16, new_tokens=5, runs=1, warmup=0,
                   torch_device="cuda", ceilings={}, emit=rows.append, progress=lambda m: None)
    assert rows[0]["error"].startswith("unavailable") and "checkpoint directory" in rows[0]["error"], rows
    # an engine that fails to start leaves torch_impl's own context installed again
    calls.clear()
    rows.clear()

    def refuse(self, path, **kw):
        raise RuntimeError("no GPU memory left")

    monkeypatch.setattr(FakeLLM, "__init__", refuse)
    decode.measure("nanovllm", "Qwen3-0.6B", cfg, tmp_path, [1], prompt_len=16, new_tokens=5, runs=1, warmup=0,
                   torch_device="cuda", ceilings={}, emit=rows.append, progress=lambda m: None)
    assert calls[-1] == ("uninstall",) and "no GPU memory left" in rows[0]["error"], (calls, rows)


def test_profile_bytes_per_kernel_group():
    """bench.profile names the bytes a step must read through each twin's projection and attention
    kernels: the four projections of either twin add up to the projections' weights once per step
    (Qwen3Config.decode_bytes_per_token less the norms, embedding row and lm_head), attention to each
    sequence's K and V rows; kernels whose names say nothing (cuBLAS, XLA fusions) get none."""
    from bench import profile
    from common.config import PRESETS

    cfg = PRESETS["Qwen3-8B"]
    roles = profile.role_bytes(cfg, batch=4, context=100)
    h, l = cfg.hidden_size, cfg.num_hidden_layers
    projections = cfg.decode_bytes_per_token() - 2 * (l * (2 * h + 2 * cfg.head_dim) + h + cfg.vocab_size * h)
    twins = {"torch": ["_rmsnorm_qkv_kernel", "_linear_residual_kernel", "_norm_gate_up_kernel"],
             "jax": ["rmsnorm_qkv_linear", "linear_residual", "mlp_norm_gate_up", "mlp_down"]}
    for twin, names in twins.items():
        assert sum(profile.group_bytes(n, roles) for n in names) == projections, twin
    kv = l * 4 * 100 * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert profile.group_bytes("_decode_attention_kernel", roles) == profile.group_bytes("decode_attention", roles) == kv
    for other in ("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT", "loop_add_fusion", "_qk_epilogue_kernel",
                  "rmsnorm_qkv_epilogue", "input_reduce_fusion"):
        assert profile.group_bytes(other, roles) is None, other
    rows = profile.with_bandwidth({"mlp_down": (100.0, 36.0, 0.0), "loop_add_fusion": (1.0, 3.0, 0.5)}, roles)
    assert rows["mlp_down"] == (100.0, 36.0, 0.0, roles["down"], roles["down"] / 100.0 / 1e3)
    assert rows["loop_add_fusion"] == (1.0, 3.0, 0.5, None, None)


# ----- where results go, the prompt length, the presets ---------------------------------------------

def test_default_out_is_under_the_current_directory_and_never_overwritten(fake_worker, tmp_path, monkeypatch, capsys):
    """Without --out a run writes ./bench-results/<gpu-slug>/ under the current directory, not the
    source tree; a second run into a folder holding results is refused with one error line."""
    from bench.__main__ import REPO

    monkeypatch.chdir(tmp_path)
    argv = ["decode", "--smoke", "--impls", "jax-plain", "--batch", "1", "--no-plots"]
    assert main(argv) == 0
    out = tmp_path / "bench-results" / "cpu-smoke"
    first = (out / report.JSON_NAME).read_text()
    assert json.loads(first)["rows"] and not (REPO / "bench" / "results" / "cpu-smoke").exists()
    with pytest.raises(SystemExit, match=r"^error: --out .*cpu-smoke: already holds bench.json.*never overwritten"):
        main(argv)
    assert (out / report.JSON_NAME).read_text() == first
    with pytest.raises(SystemExit, match="^error: --out .*already holds bench.json"):
        main(["report", str(out), "--out", str(out)])


@pytest.mark.parametrize("value, why", [("0", "expected comma-separated positive integers"),
                                        ("x", "expected comma-separated positive integers"),
                                        ("5000", "more than the 4096 positions"),
                                        ("8,32", "decode takes one length (ttft takes a list)")])
def test_bad_prompt_len_is_one_error_line(value, why, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["decode", "--smoke", "--impls", "jax-plain", "--prompt-len", value, "--out", str(tmp_path / "o")])
    err = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert e.value.code == 2 or err.startswith("error: "), (e.value.code, err)
    assert "--prompt-len" in err and why in err and "\n" not in err.strip(), err
    assert not (tmp_path / "o").exists()


def test_prompt_len_and_every_preset_reach_the_decode_jobs(tmp_path, monkeypatch):
    """--prompt-len N is the prompt of every decode job and row; --models takes Qwen3-1.7B and Qwen3-4B
    (every preset of common.config)."""
    from bench import decode
    from bench.__main__ import model_label, parser
    from common.config import PRESETS

    seen = []

    def fake(impl, model, cfg, path, batches, base, **kw):
        seen.append((model, kw["prompt_len"], cfg.num_hidden_layers))
        kw["emit"](dict(base, batch=batches[0], decode_tok_s=1.0))

    monkeypatch.setattr(decode, "_measure", fake)
    out = tmp_path / "p"
    assert main(["decode", "--smoke", "--in-process", "--impls", "jax-plain", "--prompt-len", "12", "--models",
                 "Qwen3-1.7B,Qwen3-4B", "--out", str(out), "--no-plots"]) == 0
    assert seen == [(model_label("Qwen3-1.7B", True), 12, 2), (model_label("Qwen3-4B", True), 12, 2)]
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert {r["prompt_len"] for r in _rows(doc, kind="decode")} == {12} and doc["runs"][0]["settings"]["prompt_len"] == 12
    assert all(m in parser().format_help() for m in PRESETS)


def test_bench_and_tools_are_packaged():
    """pip install -e . makes python -m bench and python -m tools.* work from any directory; the
    measured results stay in the source tree."""
    import tomllib

    import setuptools

    from bench.__main__ import REPO

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    pkgs = set(setuptools.find_namespace_packages(str(REPO), include=find["include"], exclude=find.get("exclude", [])))
    assert {"bench", "measure", "tools", "common", "jax_impl", "torch_impl"} <= pkgs, pkgs
    assert not [p for p in pkgs if p.startswith(("bench.results", "tests"))], pkgs


# ----- decode tok/s and end-to-end tok/s --------------------------------------------------------------

def test_rows_carry_end_to_end_tok_s_beside_decode_tok_s():
    """end-to-end tok/s = all new tokens over generate()'s wall time (prefill and host overhead in);
    decode tok/s = batch * (new - 1) over the decode time. The table shows both, named."""
    from bench import decode

    cfg = decode.Qwen3Config.preset("Qwen3-0.6B")
    row = decode.base_row("torch-fused", "Qwen3-0.6B", prompt_len=16, new_tokens=256, ceilings={})
    row["batch"] = 1
    res = [dict(generated=256, wall_s=0.25, prefill_s=0.02, decode_s=0.2),
           dict(generated=256, wall_s=0.2, prefill_s=0.02, decode_s=0.17)]
    decode._fill(row, res, cfg, 1, 16, 256, {"copy_GBps": 3000.0, "matmul_TFLOPs": 700.0})
    assert row["decode_tok_s"] == pytest.approx(255 / 0.17) and row["end_to_end_tok_s"] == pytest.approx(256 / 0.2)
    assert row["end_to_end_tok_s_runs"] == [pytest.approx(1024.0), pytest.approx(1280.0)]
    md = report.markdown(dict(runs=[], rows=[row]))
    assert "batch 1: decode tok/s (% of floor) / end-to-end tok/s" in md
    assert f"{255 / 0.17:,.1f} ({row['pct_bw_floor']:.0f}%) / 1,280.0" in md and report.DECODE_NOTE in md
    # a slower generate() is a regression even when the decode time holds
    worse = dict(row, end_to_end_tok_s=1000.0)
    findings, _ = compare.compare(dict(rows=[row]), dict(rows=[worse]))
    assert [f["metric"] for f in findings if f["regression"]] == ["end_to_end_tok_s"]


# ----- python -m bench check --------------------------------------------------------------------------

def test_check_plan_names_the_jobs_and_where_results_go():
    from bench import check
    from bench.__main__ import REPO, parser

    plan = check.make_plan("NVIDIA H100 80GB HBM3", "abc1234")
    assert plan.out == REPO / "bench" / "results" / "nvidia-h100-80gb-hbm3" / "abc1234"
    assert plan.budget_s == 480 and plan.tests_budget_s < plan.budget_s
    cmd = list(plan.test_command)
    assert cmd[1:5] == ["-m", "pytest", "-m", "gpu"] and cmd[-1] == f"--junitxml={plan.out / 'tests.xml'}"
    assert all((REPO / f).is_file() for f in check.TEST_FILES)
    a = parser().parse_args(list(plan.bench_argv))  # flags python -m bench takes
    assert a.command == "decode" and a.models == "Qwen3-0.6B,Qwen3-8B" and a.batch == "1,32"
    assert a.impls == "jax-fused,torch-fused" and a.random_weights and a.quick and a.new_tokens == 256
    assert a.sampling is None and a.out == plan.out and a.budget_s is None  # the budget is added when run
    assert a.commit == "abc1234"  # the rows name the check's commit, not what a copied tree's .git says
    text = check.describe(plan)
    assert "budget: 8 minutes on an H100" in text and str(plan.out) in text and "-m gpu" in text
    assert check.make_plan(None, "abc1234").out.parent.name == check.NO_GPU_SLUG


def test_check_dry_run_prints_the_plan_and_without_a_gpu_refuses(tmp_path, capsys):
    from bench import check
    from bench.env import has_gpu

    assert main(["check", "--dry-run", "--commit", "abc1234", "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "commit abc1234" in text and f"results: {tmp_path / 'c'}/" in text and "budget: 8 minutes" in text
    assert "python -m bench decode --models Qwen3-0.6B,Qwen3-8B --batch 1,32" in text
    assert not (tmp_path / "c").exists()
    if has_gpu()[0]:
        pytest.skip("checks the refusal on a machine without a GPU")
    with pytest.raises(SystemExit, match="^error: python -m bench check needs a CUDA GPU .*--dry-run"):
        check.main(["--commit", "abc1234", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_check_test_selection_is_collected():
    """The listed GPU tests exist: pytest collects the 0.6B kernel cases of both twins, the quantized
    kernels and the model GPU tests (collection only: they run on a GPU)."""
    import subprocess

    from bench import check
    from bench.__main__ import REPO

    plan = check.make_plan("gpu", "abc1234")
    cmd = [c for c in plan.test_command if not c.startswith("--junitxml")] + ["--collect-only"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    assert 30 <= len(ids) <= 80, out[-2000:]
    for want in ("test_kernels.py::TestGPU::test_mlp[jax-Qwen3-0.6B-1-", "test_kernels.py::TestGPU::test_mlp[torch-"
                 "Qwen3-0.6B-32-", "test_kernels.py::TestGPU::test_decode_attention[torch-Qwen3-0.6B-",
                 "test_quant_kernels.py::TestGPU::test_mlp[jax-int8-Qwen3-0.6B-t1-",
                 "test_torch_model.py::test_sampling_inside_the_cuda_graph"):
        assert any(want in i for i in ids), (want, ids)
    assert not any("Float32" in i or "Qwen3-8B" in i for i in ids), ids


def test_check_runs_tests_then_decode_and_keeps_what_it_found(tmp_path, monkeypatch):
    """With a GPU: the tests, then decode with what is left of the budget, check.json; rerunning into
    the same folder is refused."""
    from bench import check, env

    monkeypatch.setattr(env, "has_gpu", lambda: (True, "NVIDIA H100 80GB HBM3"))
    calls = []

    def tests(plan, log):
        calls.append("tests")
        (plan.out / "tests.log").write_text("1 passed\n")
        return dict(returncode=0, stopped=False, seconds=1.0, tests=1, failures=0, errors=0, skipped=0)

    def decode(plan, budget_s):
        calls.append(("decode", budget_s <= plan.budget_s))
        (plan.out / "bench.json").write_text("{}")
        return dict(returncode=0, rows=8, measured=8, not_measured=[])

    monkeypatch.setattr(check, "run_tests", tests)
    monkeypatch.setattr(check, "run_decode", decode)
    out = tmp_path / "c"
    assert main(["check", "--commit", "abc1234", "--out", str(out)]) == 0
    assert calls == ["tests", ("decode", True)]
    summary = json.loads((out / "check.json").read_text())
    assert summary["ok"] and summary["gpu"] == "NVIDIA H100 80GB HBM3" and summary["commit"] == "abc1234"
    with pytest.raises(SystemExit, match="already holds bench.json, tests.log, check.json"):
        main(["check", "--commit", "abc1234", "--out", str(out)])


def test_junit_counts(tmp_path):
    from bench import check

    p = tmp_path / "t.xml"
    p.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert check.junit_counts(p) == dict(tests=5, failures=1, errors=0, skipped=2)
    assert check.junit_counts(tmp_path / "none.xml") == dict(junit="missing")


# ----- python -m bench headline -------------------------------------------------------------------------

def _check_doc() -> dict:
    rows = []
    for m, b, d, e in (("Qwen3-0.6B", 1, 1381.5, 1212.0), ("Qwen3-0.6B", 32, 19618.5, 15000.0),
                       ("Qwen3-8B", 1, 177.4, 170.2), ("Qwen3-8B", 32, 4065.1, 3900.0)):
        for impl in ("jax-fused", "torch-fused"):
            rows.append(dict(kind="decode", impl=impl, label=f"{impl} label", model=m, batch=b, prompt_len=16,
                             new_tokens=256, decode_tok_s=d, end_to_end_tok_s=e, pct_bw_floor=55.4,
                             tensor_parallel_size=1, tiles="tuned", sampling=None))
    rows.append(dict(rows[0], tiles="untuned", decode_tok_s=1.0))  # not in the headline
    env = dict(gpu="NVIDIA H100 80GB HBM3", commit="0123456789abcdef0123456789abcdef01234567",
               command="python -m bench decode --models Qwen3-0.6B,Qwen3-8B", smoke=False)
    return dict(schema=1, runs=[dict(env=env, ceilings=dict(copy_GBps=3012.0), settings=dict(runs=2))], rows=rows)


def test_headline_renders_one_run(tmp_path):
    from bench import headline

    text = headline.render(_check_doc(), "bench/results/x/0123456/bench.json")
    assert text.startswith("Measured on NVIDIA H100 80GB HBM3 (commit 0123456; `python -m bench decode --models")
    assert "`python -m bench headline bench/results/x/0123456/bench.json`" in text and "3,012 GB/s" in text
    assert "| model | implementation | batch 1 decode tok/s | batch 1 end-to-end tok/s | batch 32 decode tok/s |" in text
    assert "| Qwen3-0.6B | jax-fused label | 1,381.5 (55%) | 1,212.0 | 19,618.5 (55%) | 15,000.0 |" in text
    assert text.count("| Qwen3-") == 4  # the untuned row stays out
    with pytest.raises(headline.HeadlineError, match="--smoke"):
        doc = _check_doc()
        doc["runs"][0]["env"]["smoke"] = True
        headline.render(doc, "x")


def test_headline_rewrites_between_the_markers_and_checks(tmp_path, capsys):
    from bench import headline

    res = tmp_path / "results" / "bench.json"
    res.parent.mkdir()
    res.write_text(json.dumps(_check_doc()))
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\nbefore\n\n<!-- bench-headline:begin -->\nhand-written\n<!-- bench-headline:end -->\n\nafter\n")
    assert headline.parse(readme.read_text()) == (None, "hand-written\n")
    assert headline.check(readme.read_text(), tmp_path)  # not written by the command: a difference
    assert main(["headline", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# t\n\nbefore\n\n<!-- bench-headline:begin source=results/bench.json -->\nMeasured on")
    assert text.endswith("<!-- bench-headline:end -->\n\nafter\n") and "hand-written" not in text
    assert headline.check(text, tmp_path) == []
    assert main(["headline", str(res), "--readme", str(readme), "--check"]) == 0
    doc = _check_doc()
    doc["rows"][0]["decode_tok_s"] = 1400.0
    res.write_text(json.dumps(doc))
    diff = headline.check(text, tmp_path)
    assert len(diff) == 1 and "1,381.5" in diff[0] and "1,400.0" in diff[0], diff
    assert main(["headline", str(res), "--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == text  # --check rewrites nothing
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="^error: expected one '<!-- bench-headline:begin"):
        main(["headline", str(res), "--readme", str(readme)])


def test_readme_has_the_headline_markers():
    from bench import headline
    from bench.__main__ import REPO

    text = (REPO / "README.md").read_text()
    source, block = headline.parse(text)
    assert source is not None and (REPO / source).is_file(), "the README's headline names no committed bench.json"
    assert headline.check(text, REPO) == []  # the table is what `bench headline SOURCE` writes from that run


def test_decode_floor_counts_each_weights_bytes():
    """The floor reads every projection in its format's bytes and the lm_head in its own format's
    (int8 quantizes the head, one byte a weight; fp8 keeps it in bf16): Qwen3-8B batch 1."""
    from bench.decode import decode_floor_tok_s
    from common.config import Qwen3Config

    cfg = Qwen3Config.preset("Qwen3-8B")
    h, v, l = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    proj = l * (h * cfg.qkv_size + cfg.q_size * h + 3 * h * cfg.intermediate_size)
    bf16 = cfg.decode_bytes_per_token()
    assert cfg.decode_bytes_per_token(projection_bytes=1) == bf16 - proj
    assert cfg.decode_bytes_per_token(projection_bytes=1, head_bytes=1) == bf16 - proj - v * h

    def seconds(q):  # one step at one position of context: weights dominate
        return 1 / decode_floor_tok_s(cfg, 1, 0, 2, 1.0, q)

    kv = seconds(None) * 1e9 - bf16
    assert seconds("int8") * 1e9 - kv == pytest.approx(bf16 - proj - v * h)
    assert seconds("fp8") * 1e9 - kv == pytest.approx(bf16 - proj)


def test_stages_smoke(tmp_path):
    """python -m bench stages --smoke: each chosen stage of both twins, timed with its plain read, in a
    bench.json and a table (three stages, one format: the interpreters are slow)."""
    out = tmp_path / "stages"
    assert main(["stages", "--smoke", "--out", str(out), "--stages", "gate_up,lm_head,attention",
                 "--quantization", "int8", "--no-plots"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    rows = [r for r in doc["rows"] if r.get("kind") == "stage"]
    assert {(r["framework"], r["stage"], r["weights"]) for r in rows} == {
        (fw, s, w) for fw in ("jax", "torch") for s, w in (("gate_up", "int8"), ("lm_head", "int8"),
                                                           ("attention", "bf16"))}
    for r in rows:
        assert not r.get("error") and r["us"] > 0 and r["stream_us"] > 0, r
        assert r["GBps"] == pytest.approx(r["bytes"] / r["us"] / 1e3) and r["pct_of_stream"] > 0, r
        assert r["l2_us"] > 0, r  # small stages: also timed over one layer's buffers
    assert "Batch-1 decode stages" in (out / "bench.md").read_text()


def test_stage_bytes_count_each_format():
    """A stage's bytes: its weights in their format (values and float32 scales) plus its activations;
    the head in the head's format (int8 quantizes it, fp8 keeps it bf16)."""
    from bench.stages import Stage, stage_bytes, weight_bytes
    from common.config import Qwen3Config

    cfg = Qwen3Config.preset("Qwen3-8B")
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    assert weight_bytes((h, i), None) == 2 * h * i
    assert weight_bytes((h, i), "int8") == h * i + 4 * h
    assert weight_bytes((h, i), "fp8") == h * i + 4 * (h // 128) * (i // 128)
    down = Stage("8B", cfg, "down", "int8")
    assert stage_bytes(down) == weight_bytes((h, i), "int8") + 2 * (i + h + h)
    assert stage_bytes(Stage("8B", cfg, "lm_head", "fp8")) == 2 * v * h + 2 * h + 4 * v
    assert stage_bytes(Stage("8B", cfg, "lm_head", "int8")) == v * h + 4 * v + 2 * h + 4 * v
    att = Stage("8B", cfg, "attention", None, 8192)
    assert stage_bytes(att) == 2 * 2 * 8192 * cfg.num_key_value_heads * cfg.head_dim + 2 * 2 * cfg.num_attention_heads \
        * cfg.head_dim


def test_ttft_smoke(tmp_path):
    """python -m bench ttft --smoke: each twin's generate command in three processes (fresh caches, a
    second process, a warm-up at load), each row with its first text and the command's figures."""
    out = tmp_path / "ttft"
    assert main(["ttft", "--smoke", "--out", str(out), "--new-tokens", "4", "--no-plots"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    rows = [r for r in doc["rows"] if r.get("kind") == "ttft"]
    assert {(r["framework"], r["run"]) for r in rows} == {(fw, run) for fw in ("jax", "torch")
                                                          for run in ("fresh", "second", "warm")}
    for r in rows:
        assert not r.get("error"), r
        assert 0 < r["first_text_s"] <= r["wall_s"], r
        assert r["prompt_tokens"] > 0 and r["first_token_s"] >= r["prefill_s"] > 0, r
    jax_rows = {r["run"]: r for r in rows if r["framework"] == "jax"}
    assert jax_rows["fresh"]["compile_first_s"] > 0  # a fresh cache compiles the prefill program
    assert "Time to first token" in (out / "bench.md").read_text()


def test_ttft_measures_every_prompt_length_and_a_new_bucket(monkeypatch):
    """bench ttft's rows: each prompt length of the list, four runs; the new-bucket run warms a
    prompt bucket other than the call's, in caches of its own; the others share theirs."""
    from bench import ttft
    from common.buckets import prompt_bucket

    calls = []
    monkeypatch.setattr(ttft, "run_once", lambda cmd, env: calls.append((cmd, env["XDG_CACHE_HOME"])) or
                        dict(first_text_s=1.0, wall_s=2.0))
    rows = []
    for n in (8, 100):
        ttft.measure("jax", "m", Path("/ckpt"), n, 32, fused="auto", emit=rows.append, progress=lambda s: None)
    assert [(r["prompt_len"], r["run"]) for r in rows] == [(n, run) for n in (8, 100) for run in ttft.RUNS]
    assert rows == [dict(r, first_text_s=1.0, wall_s=2.0)
                    for r in ttft.expected_rows(["jax"], ["m"], [8, 100], 32, "auto")]
    for n, (cmd, cache), run in zip([8] * 4 + [100] * 4, calls, list(ttft.RUNS) * 2):
        warm = cmd[cmd.index("--warmup") + 1] if "--warmup" in cmd else None
        if run == "new-bucket":
            other = int(warm.split("x")[1])
            assert prompt_bucket(other, 4096) != prompt_bucket(n, 4096) and cache.endswith("own/xdg")
        else:
            assert cache.endswith("shared/xdg") and (warm is None) == (run != "warm")


def test_ttft_reads_the_commands_stderr_line():
    """The generate commands' stderr line (common.cli.report) with and without a compile part."""
    from bench.ttft import _STATS

    m = _STATS.search("jax_impl: ...\nprompt tokens: 7 | first token 1.844 s (compile 1.73 s, prefill 0.114 s) | "
                      "decode 31 tokens in 0.063 s = 490.8 tok/s (+ 5.03 s compile, not counted)\n")
    assert (m["prompt"], m["first"], m["compile"], m["prefill"]) == ("7", "1.844", "1.73", "0.114")
    m = _STATS.search("prompt tokens: 16 | first token 0.027 s (prefill 0.027 s) | decode 3 tokens in 0.1 s = 30 tok/s")
    assert (m["prompt"], m["compile"], m["prefill"]) == ("16", None, "0.027")


def test_decode_rows_carry_the_warm_prefill_and_transformers_sdpa():
    """prefill_s is the fastest run's prefill (as prefill_tok_s), shown in the table; transformers
    runs SDPA attention with the last token's logits only, and its rows say so."""
    from bench import decode
    from common.config import PRESETS, shrink

    cfg = decode.Qwen3Config.preset("Qwen3-0.6B")
    row = dict(decode.base_row("hf-eager", "Qwen3-0.6B", prompt_len=8192, new_tokens=16, ceilings={}), batch=1)
    assert "SDPA attention" in row["label"]
    res = [dict(generated=16, wall_s=0.5, prefill_s=0.3, decode_s=0.1),
           dict(generated=16, wall_s=0.4, prefill_s=0.25, decode_s=0.12)]
    decode._fill(row, res, cfg, 1, 8192, 16, {})
    assert row["prefill_s"] == 0.25 and row["prefill_s_runs"] == [0.3, 0.25]
    assert row["prefill_tok_s"] == pytest.approx(8192 / 0.25)
    assert "| 32,768 (batch 1, 0.25 s) |" in report.markdown(dict(runs=[], rows=[row]))
    model = decode.load_hf(None, "cpu", shrink(PRESETS["Qwen3-0.6B"], layers=1, vocab=64))
    assert decode.hf_fields(model) == dict(attention="sdpa", logits_to_keep=1)
