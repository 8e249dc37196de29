"""Each measurement job in a Python process of its own, so that no job's state reaches another's timings.

Measured on an H100: jax_impl fused Qwen3-0.6B batch-1 decode ran at 1,199 tok/s in a fresh process,
1,209 after torch had created its CUDA context, and 1,110 after torch had allocated, copied and freed
two 2 GiB buffers in the same process. The suite used to measure the ceilings (torch, then jax)
before the first decode row in its own process, which is why it reported 1,113 where a process of
its own gives about 1,200. GPU heat does not explain it: 1,182-1,192 after 8 s of 8192^3 matmuls.
So `python -m bench` runs the ceilings of each framework, every decode job (one implementation on
one model) and the kernel rows of each framework in a child process; `--in-process` runs the same
jobs in the suite's own process (debugging, and the old behaviour).

A job is a JSON document: {"kind": "ceilings" | "kernels" | "stages" | "decode", ...} (see `execute`). The
child, `python -m bench.isolate JOB.json ROWS.jsonl`, inherits the environment (the settings
`python -m bench` makes before the first jax / triton import), writes one JSON line per result row
to ROWS.jsonl, and its progress lines to stderr, which the parent copies to its own stderr. The
parent hands each row on as soon as it is written. A child that crashes (non-zero exit, a signal,
the out-of-memory killer) or overruns the --budget-s deadline by KILL_MARGIN_S turns into error
rows, naming the exit code and the last lines the child printed, for the rows it did not report;
the suite goes on with the next job.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = ("-m", "bench.isolate")  # arguments after sys.executable that start a child
KILL_MARGIN_S = 300.0  # a child still running this long after the deadline is killed
TAIL_LINES = 5  # last lines of a crashed child's output quoted in its error rows
POLL_S = 0.2


# ----- the child ---------------------------------------------------------------------------------

def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _monotonic_deadline(deadline_unix: float | None) -> float | None:
    """A wall-clock deadline (comparable across processes) as this process's time.monotonic()."""
    return None if deadline_unix is None else time.monotonic() + (deadline_unix - time.time())


def execute(job: dict, emit, progress=_progress) -> None:
    """Run `job` here, calling emit(row) for every result row (for "ceilings": the ceilings dict)."""
    from bench import decode, env, kernels
    from measure.timing import TimingPlan
    from common.config import Qwen3Config

    kind = job.get("kind")
    deadline = _monotonic_deadline(job.get("deadline_unix"))
    if kind == "ceilings":
        emit(env.measure_ceilings(smoke=job["smoke"], quick=job["quick"], frameworks=(job["framework"],),
                                  log=progress))
    elif kind == "kernels":
        models = {m: Qwen3Config(**d) for m, d in job["models"].items()}
        cases = kernels.make_cases(models, job["ops"], job["batches"], job["prefill"], job["ctx"])
        st = dict(job["settings"])
        s = kernels.Settings(TimingPlan(**st.pop("plan")), **st, deadline=deadline)
        kernels.run(cases, [job["framework"]], s, job["ceilings"], torch_device=job["torch_device"],
                    emit=emit, progress=progress)
    elif kind == "stages":
        from bench import stages

        models = {m: Qwen3Config(**d) for m, d in job["models"].items()}
        todo = [stages.Stage(s["model"], models[s["model"]], s["stage"], s["fmt"], s["ctx"]) for s in job["stages"]]
        st = dict(job["settings"])
        s = stages.Settings(TimingPlan(**st.pop("plan")), **st, deadline=deadline)
        stages.run(todo, [job["framework"]], s, job["ceilings"], torch_device=job["torch_device"], emit=emit,
                   progress=progress)
    elif kind == "decode":
        decode.measure(job["impl"], job["model"], Qwen3Config(**job["cfg"]),
                       None if job["path"] is None else Path(job["path"]), job["batches"],
                       prompt_len=job["prompt_len"], new_tokens=job["new_tokens"], runs=job["runs"],
                       warmup=job["warmup"], torch_device=job["torch_device"], ceilings=job["ceilings"],
                       emit=emit, progress=progress, deadline=deadline,
                       tensor_parallel_size=job.get("tensor_parallel_size", 1), tiles=job.get("tiles", "tuned"),
                       sampling=job.get("sampling"))
    else:
        raise ValueError(f"job kind {kind!r}: expected 'ceilings', 'kernels', 'stages' or 'decode'")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.isolate JOB.json ROWS.jsonl (started by python -m bench)", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    with open(argv[1], "a", encoding="utf-8") as rows:
        def emit(row: dict) -> None:
            rows.write(json.dumps(row, default=str) + "\n")
            rows.flush()

        execute(job, emit)
    return 0


# ----- the parent --------------------------------------------------------------------------------

def run_job(job: dict, *, emit, expected=(), in_process: bool = False, progress=_progress) -> str | None:
    """Run `job` in a child process (or here with in_process), emit(row) for each row as it comes,
    then an error row for each row of `expected` (rows without figures) that the job did not report.
    Returns None when the job ran to its end, else why not."""
    from bench.report import row_key

    if job.get("deadline_unix") is not None and time.time() > job["deadline_unix"]:
        failure = "skipped: time budget (--budget-s) spent"  # not worth a process start
        for row in expected:
            emit(dict(row, error=failure))
        return failure
    seen = set()

    def tracked(row: dict) -> None:
        seen.add(row_key(row))
        emit(row)

    if in_process:
        try:
            execute(job, tracked, progress)
            failure = None
        except Exception as e:  # noqa: BLE001 - the job's rows say why; the suite goes on
            progress(traceback.format_exc())
            failure = f"{type(e).__name__}: {str(e)[:400]}"
    else:
        failure = _run_child(job, tracked)
    for row in expected:
        if row_key(row) not in seen:
            emit(dict(row, error=failure or "the job ended without reporting this row"))
    return failure


def _run_child(job: dict, emit) -> str | None:
    env = dict(os.environ)  # the settings python -m bench made before importing jax / triton
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    deadline_unix = job.get("deadline_unix")
    kill_at = None if deadline_unix is None else deadline_unix + KILL_MARGIN_S
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        job_path, rows_path = Path(tmp) / "job.json", Path(tmp) / "rows.jsonl"
        job_path.write_text(json.dumps(job))
        rows_path.touch()
        # a session of its own: a kill reaches the child's own children too (say torch.compile's workers)
        proc = subprocess.Popen([sys.executable, *WORKER, str(job_path), str(rows_path)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace", start_new_session=True)
        tee = threading.Thread(target=_tee, args=(proc.stdout, tail), daemon=True)
        tee.start()
        try:
            killed = _follow(proc, rows_path, emit, tail, kill_at)
        except BaseException:  # Ctrl-C or a failing emit: leave no child running
            _kill(proc)
            raise
        tee.join(timeout=10)
    if proc.returncode == 0:
        return None
    if killed:
        how = f"killed: still running {KILL_MARGIN_S:.0f} s after the --budget-s deadline"
    elif proc.returncode < 0:
        how = f"child process killed by signal {_signal_name(-proc.returncode)}"
    else:
        how = f"child process exited with code {proc.returncode}"
    return f"{how}; its last output: " + (" | ".join(line[:300] for line in tail) or "(none)")


def _follow(proc, rows_path: Path, emit, tail, kill_at: float | None) -> bool:
    """emit the child's rows as it writes them until it exits; kill it past `kill_at`. True if killed."""
    killed, pending = False, ""
    with open(rows_path, encoding="utf-8") as rows:
        while True:
            try:
                proc.wait(timeout=POLL_S)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            pending = _emit_lines(pending + rows.read(), emit)
            if done:
                break
            if kill_at is not None and time.time() > kill_at and not killed:
                _kill(proc)
                killed = True
    if pending.strip():
        tail.append(f"(unfinished row dropped: {pending[:200]!r})")
    return killed


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _emit_lines(text: str, emit) -> str:
    """emit each complete JSON line of `text`; return the unfinished rest."""
    *lines, rest = text.split("\n")
    for line in lines:
        if line.strip():
            emit(json.loads(line))
    return rest


def _tee(stream, tail) -> None:
    from common.progress import note

    for line in stream:
        note(line.rstrip("\n"))
        if line.strip():
            tail.append(line.rstrip())


def _signal_name(num: int) -> str:
    try:
        name = signal.Signals(num).name
    except ValueError:
        return str(num)
    return name + (" (the out-of-memory killer sends it, among others)" if num == signal.SIGKILL else "")


if __name__ == "__main__":
    from common import interrupt

    interrupt.main(lambda: main(sys.argv[1:]))
