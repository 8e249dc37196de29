"""The processes of a tensor-parallel TorchRunner and how rank 0 drives them.

Standalone (`torch_impl.load(..., tensor_parallel_size=N)` in an ordinary process): the caller is
rank 0. It validates everything first (the size against the model, the GPUs: enough of them, one
kind), then starts ranks 1..N-1 with torch.multiprocessing's spawn context (a script doing so needs
the usual `if __name__ == "__main__":` guard). Every rank builds only its shard on cuda:rank (NCCL)
or the CPU (gloo) and reads the checkpoint itself: nothing but the call's arguments (a path, a
config, dtype and flags) and the runner class (pickled by name: this module never imports the
runner) crosses into a worker. The workers then serve rank 0's commands until `close()`: int64
tensors broadcast over a gloo group (a header [op, n] and n values: token ids, sizes, float64 bits
of temperature and top_p), never pickled objects; during generation one flag per chunk of decode
steps says whether rank 0's consumer wants more (a stream may stop early).

Under torchrun (WORLD_SIZE > 1 in the environment) or with a default process group already
initialized, every rank is a process of the user's: each calls load and generate with the same
arguments; rank 0's command is broadcast all the same and every rank checks it against its own.

Failures: rank 0 watches its workers' processes; when one ends, a blocked gloo collective fails at
once (the peer's connection closes) and an NCCL one is aborted by the watcher, and the call raises
RankFailed naming the rank, its exit status or signal and the error it reported; the runner then
ends the other workers and is closed. A worker whose parent dies exits. A rank alive but stuck is
ended by the process-group timeout (QWEN3_TP_TIMEOUT_S, default 300 s; NCCL's watchdog aborts the
collective without ending the caller's process). Under torchrun, torchrun ends the other ranks.
Every process keeps NVLink multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1, set before any process group or worker exists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import logging
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import torch

from common.sharding import TensorParallelError, check_tensor_parallel
from torch_impl.commands import EXIT
from torch_impl.parallel import TPGroup, _all_gather

log = logging.getLogger("torch_impl")

ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Standalone: NCCL's watchdog aborts a timed-out collective but leaves the caller's process alive.
STANDALONE_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
IDLE = datetime.timedelta(days=7)  # how long workers wait for rank 0's next command


def timeout_s() -> float:
    return float(os.environ.get("QWEN3_TP_TIMEOUT_S", "300"))


class RankFailed(RuntimeError):
    """A tensor-parallel rank died or failed; the runner is closed."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every rank builds: kind "load" (source: a checkpoint directory) or "random" (source: a
    Qwen3Config), with the runner's other arguments as plain values; `runner` is the class that
    builds it (torch_impl.runner's TorchRunner: `runner(source, **kwargs)` or `runner.random(...)`)."""

    kind: str
    source: Any
    kwargs: dict
    runner: type


_WORKER: "Session | None" = None  # in a spawned worker: its session (start() returns it)
_OWNER: "Session | None" = None  # the session that made this process's group (standalone rank 0, or torchrun's)


def start(cfg, size, device, fmt: str, spec: Spec) -> "Session | None":
    """The session of a runner of tensor_parallel_size `size` (None at size 1), after every check."""
    if _WORKER is not None:
        return _WORKER
    if check_tensor_parallel(cfg, size) == 1:  # the value's type and range; size 1: nothing more to check
        return None
    check_tensor_parallel(cfg, size, fmt)
    dev_type = _device_type(device, size)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    dist = _dist()
    if dist.is_initialized() and _OWNER is not None:
        raise TensorParallelError("another tensor-parallel runner of this process holds its process group: "
                                  "close() it first")
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _join(size, dev_type)
    return _spawn(size, dev_type, spec)


def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        raise TensorParallelError("tensor_parallel_size > 1: this torch build has no torch.distributed")
    return dist


def _device_type(device, size: int) -> str:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type not in ("cuda", "cpu") or (dev.type == "cuda" and dev.index is not None):
        raise TensorParallelError(f"device={str(dev)!r} with tensor_parallel_size={size}: rank r runs on cuda:r "
                                  f"(or the CPU); pass device='cuda', 'cpu' or None")
    return dev.type


def _check_count(size: int, what: str) -> None:
    """At least `size` CUDA devices visible (`what` names the need)."""
    count = torch.cuda.device_count()
    if count < size:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise TensorParallelError(f"{what}: only {count} CUDA device(s) visible"
                                  f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}")


def _check_kinds(names: list[str]) -> None:
    if len(set(names)) > 1:
        raise TensorParallelError(f"tensor_parallel_size={len(names)}: the GPUs differ ("
                                  + ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
                                  + "); every rank must run on the same kind (choose them with CUDA_VISIBLE_DEVICES)")


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# ----- process start ------------------------------------------------------------------------------

def _spawn(size: int, dev_type: str, spec: Spec) -> "Session":
    global _OWNER
    dist = _dist()
    if dev_type == "cuda":
        _check_count(size, f"tensor_parallel_size={size}")
        _check_kinds([torch.cuda.get_device_name(i) for i in range(size)])
    for k, v in STANDALONE_ENV.items():
        os.environ.setdefault(k, v)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s()))
    ctx = torch.multiprocessing.get_context("spawn")
    session = Session(size, 0, dev_type, store=store)
    try:
        for rank in range(1, size):
            p = ctx.Process(target=_worker_main, args=(rank, size, store.port, dev_type, spec),
                            name=f"qwen3-tp-rank{rank}", daemon=True)
            p.start()
            session.procs.append(p)
        session.await_ranks("joined", timeout_s())
        session.init_groups()
        session.watch()
    except BaseException:
        session.close(abort=True)
        raise
    _OWNER = session
    return session


def _join(size: int, dev_type: str) -> "Session":
    """SPMD: this process is one rank of a group torchrun (or the caller) set up."""
    global _OWNER
    dist = _dist()
    if dist.is_initialized():
        world, rank, owns = dist.get_world_size(), dist.get_rank(), False
    else:
        world, rank, owns = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0")), True
    if world != size:
        raise TensorParallelError(f"tensor_parallel_size={size}, but this process is one of {world} ranks "
                                  f"(WORLD_SIZE / the initialized process group): they must be equal")
    local = int(os.environ.get("LOCAL_RANK", rank))
    if dev_type == "cuda":  # this rank's GPU; every rank's kind is compared below
        _check_count(local + 1, f"LOCAL_RANK={local}")
    session = Session(size, rank, dev_type, local=local, spmd=True, owns=owns)
    session.init_groups(init_method="env://" if owns else None)
    if owns:  # this runner made the group and destroys it at close(): no second runner may share it
        _OWNER = session
    if dev_type == "cuda":
        _check_kinds(session.gather_names(torch.cuda.get_device_name(session.device)))
    return session


def _worker_main(rank: int, size: int, port: int, dev_type: str, spec: Spec) -> None:
    """A spawned rank: join, build and load this rank's shard, serve rank 0's commands."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which ends the workers
    _exit_with_parent()
    dist = _dist()
    store = None
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s()))
        session = _WORKER = Session(size, rank, dev_type, store=store)
        store.set(f"tp/joined/{rank}", "1")
        session.init_groups()
        runner = (spec.runner(spec.source, **spec.kwargs) if spec.kind == "load"
                  else spec.runner.random(spec.source, **spec.kwargs))
        runner.serve()
        session.close()
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process ends
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(f"tp/error/{rank}", f"{type(e).__name__}: {e}"[:2000])
        log.error(f"torch_impl: tensor-parallel rank {rank} failed: {type(e).__name__}: {e}")
        os._exit(1)


def _exit_with_parent() -> None:
    import multiprocessing  # noqa: PLC0415

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="qwen3-tp-parent-watch", daemon=True).start()


def _describe_exit(code) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


# ----- the session: groups, commands, failures -----------------------------------------------------

class Session:
    """One rank's part in a tensor-parallel runner: its device, groups, and (rank 0, standalone) the
    worker processes it started."""

    def __init__(self, size: int, rank: int, dev_type: str, *, store=None, local: int | None = None,
                 spmd: bool = False, owns: bool = True):
        self.size, self.rank, self.spmd, self.owns = size, rank, spmd, owns
        local = rank if local is None else local
        self.device = torch.device("cuda", local) if dev_type == "cuda" else torch.device("cpu")
        self.store, self.procs = store, []
        self.tp: TPGroup | None = None
        self.cmd = None  # the gloo group commands travel on
        self.closed: str | None = None  # why, once closed
        self._stop = None

    # -- setup
    def init_groups(self, init_method: str | None = None) -> None:
        dist = _dist()
        timeout = datetime.timedelta(seconds=timeout_s())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.owns:
            kwargs = dict(store=self.store) if init_method is None else dict(init_method=init_method)
            if self.device.type == "cuda" and _accepts(dist.init_process_group, "device_id"):
                kwargs["device_id"] = self.device  # NCCL's communicator made now, not in the first step
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                    world_size=self.size, timeout=timeout, **kwargs)
        self.cmd = dist.new_group(backend="gloo", timeout=timeout if self.spmd else IDLE)
        self.tp = TPGroup(self.size, self.rank, None)

    def watch(self) -> None:
        """Rank 0: a thread that notices a worker's end at once and aborts NCCL's pending collectives."""
        r, w = os.pipe()
        self._stop = w
        sentinels = [p.sentinel for p in self.procs]

        def run():
            from multiprocessing.connection import wait  # noqa: PLC0415

            ready = wait([*sentinels, r])
            os.close(r)
            if r in ready or self.closed:
                return
            if self.device.type == "cuda":
                abort = getattr(_dist().distributed_c10d, "_abort_process_group", None)
                if abort is not None:
                    with contextlib.suppress(Exception):
                        abort()

        threading.Thread(target=run, name="qwen3-tp-watch", daemon=True).start()

    def await_ranks(self, stage: str, seconds: float) -> None:
        """Rank 0, standalone: wait until every worker reached `stage`, failing as soon as one ended."""
        keys = [f"tp/{stage}/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + seconds
        while not self.store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise RankFailed(f"tensor-parallel workers did not reach '{stage}' within {seconds:.0f} s "
                                 f"(QWEN3_TP_TIMEOUT_S)")
            time.sleep(0.02)

    def ready(self) -> None:
        """Every rank after building and loading its shard: returns when all have."""
        if self.spmd:
            _dist().barrier(group=self.cmd)
        elif self.rank == 0:
            self.await_ranks("loaded", timeout_s())
        else:
            self.store.set(f"tp/loaded/{self.rank}", "1")

    def gather_names(self, name: str) -> list[str]:
        """Every rank's `name` (the GPU's), as bytes in an int tensor over the command group."""
        raw = torch.zeros(256, dtype=torch.uint8)
        data = name.encode()[:256]
        raw[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = torch.empty(self.size * 256, dtype=torch.uint8)
        _all_gather(out, raw, self.cmd)
        return [bytes(out[i * 256:(i + 1) * 256].tolist()).rstrip(b"\0").decode() for i in range(self.size)]

    # -- failures
    def check(self) -> None:
        """Raise RankFailed when the session is closed or a worker has ended (rank 0, standalone)."""
        if self.closed:  # first: a closed session's workers were ended by it, not by a failure of theirs
            raise RankFailed(f"the tensor-parallel runner is closed ({self.closed})")
        msg = self.dead_rank()
        if msg:
            self.close(abort=True, why=msg)
            raise RankFailed(f"{msg}; the tensor-parallel runner is closed")

    def dead_rank(self, wait: float = 0.0) -> str | None:
        """A message naming the first worker that has ended, waiting up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            for rank, p in enumerate(self.procs, 1):
                if not p.is_alive():
                    key = f"tp/error/{rank}"
                    err = self.store.get(key).decode() if self.store.check([key]) else ""
                    return (f"tensor-parallel rank {rank} (pid {p.pid}) {_describe_exit(p.exitcode)}"
                            + (f": {err}" if err else ""))
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    @contextlib.contextmanager
    def command(self, op: int, payload: np.ndarray):
        """Rank 0 (every rank under torchrun): send a command, run its body; a failure inside names the
        rank that died, and leaves the runner closed."""
        self.check()
        try:
            self.send(op, payload)
            yield
        except (GeneratorExit, TensorParallelError):
            raise
        except BaseException as e:
            if self.spmd:
                raise
            msg = self.dead_rank(wait=3.0 if isinstance(e, RuntimeError) else 0.0)
            self.close(abort=True, why=msg or f"{type(e).__name__} on rank 0")
            if msg:
                raise RankFailed(f"{msg}; the tensor-parallel runner is closed") from e
            raise

    # -- commands
    def send(self, op: int, payload: np.ndarray) -> None:
        got_op, got = self._broadcast(op, payload)
        if not self.spmd:
            return
        bad = torch.zeros(self.size, dtype=torch.int64)
        bad[self.rank] = int(got_op != op or not np.array_equal(got, payload))
        _dist().all_reduce(bad, group=self.cmd)
        if bad.any():
            ranks = [r for r in range(self.size) if bad[r]]
            raise TensorParallelError(f"tensor-parallel rank(s) {ranks} were called with other arguments than rank 0: "
                                      f"every rank must make the same calls with the same arguments")

    def receive(self) -> tuple[int, np.ndarray]:
        """A worker: rank 0's next command."""
        return self._broadcast(0, None)

    def flag(self, value: int) -> int:
        """Rank 0's `value` on every rank (whether a generation goes on after a chunk)."""
        t = torch.tensor([value], dtype=torch.int64)
        _dist().broadcast(t, 0, group=self.cmd)
        return int(t[0])

    def _broadcast(self, op: int, payload) -> tuple[int, np.ndarray]:
        dist = _dist()
        head = torch.tensor([op, 0 if payload is None else len(payload)], dtype=torch.int64)
        dist.broadcast(head, 0, group=self.cmd)
        n = int(head[1])
        body = torch.from_numpy(np.ascontiguousarray(payload, np.int64)) if self.rank == 0 \
            else torch.empty(n, dtype=torch.int64)
        if n:
            dist.broadcast(body, 0, group=self.cmd)
        return int(head[0]), body.numpy()

    # -- end
    def close(self, *, abort: bool = False, why: str = "closed") -> None:
        """Rank 0: stop the workers (EXIT, else terminate); every rank: destroy the groups it made."""
        global _OWNER
        if self.closed:
            return
        self.closed = why
        if self._stop is not None:
            os.close(self._stop)
            self._stop = None
        if self.rank == 0 and self.procs and not abort and self.cmd is not None:
            try:
                self._broadcast(EXIT, np.zeros(0, np.int64))
            except Exception:  # noqa: BLE001 - a worker is gone: end the others below
                abort = True
        for p in self.procs:
            p.join(timeout=0 if abort else 30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        dist = _dist()
        if self.owns and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if _OWNER is self:
            _OWNER = None


__all__ = ["RankFailed", "Session", "Spec", "start", "EXIT"]
