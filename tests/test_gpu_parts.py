"""The suite's mechanics: the GPU suite in parts (--gpu-part, split by recorded durations),
--record-durations and its merge command, the per-test timeout, skip reasons shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_durations
from conftest import HAS_GPU
from gpu_durations import DurationsError, parse_part, split

ROOT = Path(__file__).resolve().parents[1]
# a cheap selection of real tests for the runs below: 8 tests, numpy only
SELECTION = ["tests/test_sampling.py", "-k", "valid_arguments"]


def _pytest(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}  # summary lines whole
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ids(n):
    return [f"tests/test_x.py::test_{i:03d}" for i in range(n)]


# ----- the split --------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_parts_are_disjoint_cover_all_and_keep_the_order(parts):
    ids = _ids(50)
    durations = {t: float((i * 37) % 23 + 1) for i, t in enumerate(ids)}
    got = split(ids, durations, parts)
    assert len(got) == parts
    flat = [t for p in got for t in p]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(ids)
    for p in got:
        assert p == [t for t in ids if t in set(p)]  # collection order within a part


def test_parts_are_balanced_by_the_recorded_seconds():
    """Greedy longest-first: no part exceeds the ideal share by more than the longest test; one
    long test goes alone while the short ones fill the other parts."""
    ids = _ids(40)
    durations = {t: float(1 + i % 9) for i, t in enumerate(ids)}
    durations[ids[5]] = 120.0
    got = split(ids, durations, 3)
    loads = [sum(durations[t] for t in p) for p in got]
    assert max(loads) - min(loads) <= max(durations.values())
    assert [ids[5]] in got  # the long test is a part of its own (the rest: 120 s < 2 x 120 s)
    # more even durations: the parts' seconds are within the longest test of each other
    even = {t: float(10 + i % 4) for i, t in enumerate(ids)}
    loads = [sum(even[t] for t in p) for p in split(ids, even, 4)]
    assert max(loads) - min(loads) <= 13


def test_split_is_deterministic_whatever_the_order_of_the_durations():
    ids = _ids(30)
    durations = {t: float(i % 5) for i, t in enumerate(ids)}  # many ties
    a = split(ids, durations, 4)
    assert split(ids, dict(reversed(list(durations.items()))), 4) == a
    assert split(list(ids), durations, 4) == a


def test_unrecorded_tests_count_the_median_or_the_default():
    ids = _ids(6)
    assert gpu_durations.estimates(ids, {}) == dict.fromkeys(ids, gpu_durations.DEFAULT_S)
    known = {ids[0]: 1.0, ids[1]: 3.0, ids[2]: 100.0, "tests/gone.py::test_old": 5.0}
    est = gpu_durations.estimates(ids, known)
    assert est[ids[2]] == 100.0 and est[ids[4]] == 4.0  # the median of 1, 3, 5, 100
    # no durations: every test counts the same, so the parts differ by at most one test
    assert sorted(len(p) for p in split(_ids(10), {}, 3)) == [3, 3, 4]


@pytest.mark.parametrize("text", ["0/3", "4/3", "1", "1/0", "a/b", "-1/3", "1/3/5", ""])
def test_bad_part_values_are_refused(text):
    with pytest.raises(DurationsError, match=r"--gpu-part=.*expected I/N"):
        parse_part(text)


def test_good_part_values():
    assert parse_part("1/3") == (1, 3) and parse_part("3/3") == (3, 3) and parse_part("1/1") == (1, 1)


def test_shipped_durations_file_is_readable():
    """tests/gpu_durations.json (empty until a GPU run records it) is what --gpu-part reads."""
    durations = gpu_durations.load()
    assert all(t.startswith("tests/") and "::" in t for t in durations)


# ----- the options, end to end ---------------------------------------------------------------------

def test_gpu_part_runs_select_disjoint_parts_covering_the_selection():
    def collected(*extra):
        r = _pytest(*SELECTION, "--collect-only", "-q", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        return [line for line in r.stdout.splitlines() if "::" in line]

    parts = [collected("--gpu-part", f"{i}/2") for i in (1, 2)]
    assert [len(p) for p in parts] == [4, 4]  # no durations recorded for these: 4 tests each
    everything = {t for p in parts for t in p}
    assert len(everything) == 8 and all(t.startswith("tests/test_sampling.py::test_valid_arguments") for t in everything)


def test_bad_gpu_part_is_one_error_line():
    r = _pytest(*SELECTION, "--gpu-part", "4/3")
    assert r.returncode == 4  # pytest's usage error
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert lines == ["ERROR: --gpu-part=4/3: expected I/N, two integers with 1 <= I <= N (e.g. 1/3)"]


def test_recorded_durations_merge_into_the_file(tmp_path):
    records = tmp_path / "gpu.jsonl"
    r = _pytest(*SELECTION, "-q", "--record-durations", str(records))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 8 and all(rec["outcome"] == "passed" and rec["seconds"] >= 0 for rec in lines)
    assert all(rec["nodeid"].startswith("tests/test_sampling.py::test_valid_arguments_pass[") for rec in lines)
    # a second file: a later record of the same test wins, a skipped one is left out; the existing
    # file's other tests are kept
    more = tmp_path / "more.jsonl"
    more.write_text(gpu_durations.record_line(lines[0]["nodeid"], 9.5, "passed")
                    + gpu_durations.record_line("tests/t.py::test_gpu_only", 0.01, "skipped"))
    out = tmp_path / "durations.json"
    out.write_text(json.dumps({"tests/old.py::test_kept": 3.0}))
    r = subprocess.run([sys.executable, "-m", "tests.gpu_durations", "merge", str(records), str(more), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    merged = gpu_durations.load(out)
    assert len(merged) == 9 and merged["tests/old.py::test_kept"] == 3.0 and merged[lines[0]["nodeid"]] == 9.5
    assert "tests/t.py::test_gpu_only" not in merged
    # a bad record: one error line naming the file and line, the durations file left as it was
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nodeid": "a::b", "seconds": 1}\nnot json\n')
    before = out.read_text()
    r = subprocess.run([sys.executable, "-m", "tests.gpu_durations", "merge", str(bad), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {bad}:2: expected a JSON line with \"nodeid\" and \"seconds\" (written by --record-durations)"]
    assert out.read_text() == before


# ----- the per-test timeout ---------------------------------------------------------------------------

HANG = '''
import threading


def test_quick():
    pass


def test_waits_forever():
    threading.Event().wait()
'''


def test_a_hanging_test_fails_by_name(tmp_path):
    """The project's pytest settings (pyproject.toml) with the limit cut to 2 s: the hang fails
    as its own test, named in the summary, and the run ends."""
    pytest.importorskip("pytest_timeout")
    (tmp_path / "test_planted_hang.py").write_text(HANG)
    r = _pytest("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-o", "timeout=2", "-q",
                str(tmp_path / "test_planted_hang.py"), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1 and "test_planted_hang.py::test_waits_forever - Failed: Timeout" in failed[0], r.stdout
    assert "1 failed, 1 passed" in r.stdout


def test_suite_has_a_timeout_and_tolerates_its_absence():
    """The limit is set (pyproject.toml); without pytest-timeout the settings and the timeout
    marker are known (no warning, no error) and the tests run."""
    r = _pytest(*SELECTION, "-q", "-p", "no:timeout", "-W", "error::pytest.PytestConfigWarning",
                "-W", "error::pytest.PytestUnknownMarkWarning", "--strict-markers")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 passed" in r.stdout and "warning" not in r.stdout.lower()


def test_timeout_is_configured(request):
    pytest.importorskip("pytest_timeout")
    assert float(request.config.getini("timeout")) >= 600
    assert request.config.getini("timeout_method") == "signal"


# ----- skip reasons ------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_GPU, reason="on a GPU the gpu tests run")
def test_skip_reasons_are_shown_once_per_file():
    """`python -m pytest -q` lists why tests were skipped (-rs in addopts), one line per file and
    reason, not one per test."""
    r = _pytest("tests/test_kernels.py", "-q", "-m", "gpu", "-k", "TestGPU and (test_mlp or test_rms_norm)")
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "needs a CUDA GPU" in skipped[0], r.stdout
    n = int(skipped[0].split("[", 1)[1].split("]", 1)[0])
    assert n > 50  # many tests, one line
