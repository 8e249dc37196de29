"""The GPU suite in parts: recorded test durations, a deterministic split, and the merge command.

    python -m pytest -m gpu --gpu-part 1/3 --record-durations /tmp/gpu-1.jsonl   # then 2/3, 3/3
    python -m tests.gpu_durations merge /tmp/gpu-*.jsonl --out tests/gpu_durations.json

`--gpu-part I/N` (tests/conftest.py) keeps the I-th of N parts of the tests the run selected,
split by the seconds tests/gpu_durations.json records for each test id: longest first, each to the
part with the least seconds so far (ties: the lower test id, the lower part), so one selection
splits the same way in every run. A test the file does not hold counts the median of those it
does (DEFAULT_S with no file or an empty one). `--record-durations PATH` appends one JSON line per
test as it ends ({"nodeid", "seconds" (setup and call), "outcome"}): a run stopped part-way
leaves what ran. `merge` folds such records into the file (the latest record of a test wins;
skipped tests are left out; the file's other tests are kept).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DURATIONS_FILE = Path(__file__).resolve().with_name("gpu_durations.json")
DEFAULT_S = 2.0  # the estimate of every test while no durations are recorded


class DurationsError(ValueError):
    """A bad --gpu-part value or a durations file or record that cannot be read."""


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 1 <= I <= N."""
    i, sep, n = str(text).partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and 1 <= int(i) <= int(n)):
        raise DurationsError(f"--gpu-part={text}: expected I/N, two integers with 1 <= I <= N (e.g. 1/3)")
    return int(i), int(n)


def load(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """{test id: seconds} of a durations file; {} when it does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DurationsError(f"{path}: cannot read the test durations ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and _seconds(v) for k, v in doc.items()):
        raise DurationsError(f"{path}: expected a JSON object of test id -> seconds (a number >= 0)")
    return {k: float(v) for k, v in doc.items()}


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")


def estimates(nodeids, durations: dict[str, float]) -> dict[str, float]:
    """Each test's seconds: recorded, else the median of the recorded ones (DEFAULT_S if none)."""
    default = statistics.median(durations.values()) if durations else DEFAULT_S
    return {t: durations.get(t, default) for t in nodeids}


def split(nodeids, durations: dict[str, float], parts: int) -> list[list[str]]:
    """The tests in `parts` parts of about equal seconds (greedy, longest first), each part in
    the order given."""
    seconds = estimates(nodeids, durations)
    loads = [0.0] * parts
    part_of = {}
    for t in sorted(seconds, key=lambda t: (-seconds[t], t)):
        p = min(range(parts), key=lambda p: (loads[p], p))
        part_of[t] = p
        loads[p] += seconds[t]
    out = [[] for _ in range(parts)]
    for t in nodeids:
        out[part_of[t]].append(t)
    return out


def record_line(nodeid: str, seconds: float, outcome: str) -> str:
    return json.dumps({"nodeid": nodeid, "seconds": round(seconds, 3), "outcome": outcome}) + "\n"


def merge(records: list[Path], out: Path) -> dict[str, float]:
    """`out`'s durations (if it exists) updated from the JSON-line records (later lines win;
    skipped tests left out), written back to `out`."""
    durations = load(out)
    for path in records:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DurationsError(f"{path}: cannot read the records ({getattr(e, 'strerror', None) or e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("nodeid"), str) and _seconds(rec.get("seconds"))
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise DurationsError(f"{path}:{n}: expected a JSON line with \"nodeid\" and \"seconds\" "
                                     f"(written by --record-durations)")
            if rec.get("outcome") != "skipped":
                durations[rec["nodeid"]] = round(float(rec["seconds"]), 2)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(dict(sorted(durations.items())), indent=1) + "\n")
        tmp.replace(out)  # whole or not at all
    except OSError as e:
        raise DurationsError(f"{out}: cannot write the test durations ({e.strerror})") from None
    return durations


def main(argv: list[str] | None = None) -> int:
    from common import argparsing  # noqa: PLC0415 - the conftest imports this module without it

    parser = argparsing.ArgumentParser(prog="python -m tests.gpu_durations",
                                       description="Fold --record-durations records into the durations file.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="records (JSON lines) into the durations file")
    m.add_argument("records", nargs="+", type=Path, help="files written by pytest --record-durations")
    m.add_argument("--out", type=Path, default=DURATIONS_FILE,
                   help="the durations file to update (default: tests/gpu_durations.json)")
    args = parser.parse_args(argv)
    try:
        durations = merge(args.records, args.out)
    except DurationsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(durations)} tests, {sum(durations.values()) / 60:.1f} minutes in all")
    return 0


if __name__ == "__main__":
    from common import interrupt

    interrupt.main(main)
