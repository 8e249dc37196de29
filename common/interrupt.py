"""Ctrl-C in the command-line entry points: exit status 130, what was printed kept, no traceback.

    from common import interrupt
    interrupt.main(lambda: run(argv))     # never returns

A KeyboardInterrupt raised in Python code unwinds as usual: the command prints what it produced
so far and returns EXIT_INTERRUPTED. Two cases Python alone gets wrong are handled here:

- A Ctrl-C while the main thread is inside a long native call (XLA compiling a program, Triton
  building a kernel) reaches Python's handler only when that call returns, seconds later. A
  watchdog thread wakes on the signal itself (`signal.set_wakeup_fd`) and, when the main thread
  has not ended the process within GRACE_S, flushes stdout and ends it with status 130.
- Interpreter shutdown while jax or torch native threads are still working has crashed with a
  segmentation fault (a Ctrl-C during jax's compile, then a normal unwind and exit: 9 times in
  10). `main` therefore leaves through `os._exit` after flushing, without running finalizers.
- A Ctrl-C that lands in a callback Python cannot raise from (a garbage-collection callback such
  as jax's, a __del__) is "ignored" with a traceback on stderr: the unraisable hook drops it
  quietly and the watchdog ends the process.
- A Ctrl-C while an entry module's own imports run, outside any try (numpy, jax and torch take
  a second or more to import on a busy machine): Python would print a traceback and end by
  SIGINT. After install() the uncaught KeyboardInterrupt ends the process with 130 instead, and
  the entry modules install before importing anything heavy (tests/test_first_run.py checks it).
- A Ctrl-C while a module is being imported is not raised there: a KeyboardInterrupt inside an
  extension module's initialization (jaxlib's) has ended the process by SIGABRT. The handler only
  notes it, and the watchdog ends the process with 130 after GRACE_S.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn

EXIT_INTERRUPTED = 130
GRACE_S = 1.0  # how long the main thread may take to unwind after a Ctrl-C

_state = {"interrupted": False, "installed": False}
_cleanups: list[Callable[[], None]] = []


def at_exit(fn: Callable[[], None]) -> None:
    """Run fn (pure Python: removing a temporary directory) when exit_now ends the process, which
    skips atexit's functions; also registered with atexit for a process that ends as usual."""
    import atexit

    _cleanups.append(fn)
    atexit.register(fn)


def _importing(frame) -> bool:
    """Whether the interrupted frame runs inside an import (importlib's frames on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame):
    if _state["interrupted"]:
        return  # a second Ctrl-C while unwinding: the watchdog ends the process if unwinding stalls
    _state["interrupted"] = True
    if _importing(frame):
        return  # never raised into a module's initialization: the watchdog ends the process
    raise KeyboardInterrupt


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe or a stream busy in another thread: nothing more to save
            pass


def _watchdog(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            time.sleep(GRACE_S)  # the main thread usually unwinds and exits within this
            _flush()
            try:
                os.write(2, b"\ninterrupted\n")
            except OSError:
                pass
            os._exit(EXIT_INTERRUPTED)


def _quiet_unraisable(previous):
    def hook(args):
        if args.exc_type is not None and issubclass(args.exc_type, KeyboardInterrupt):
            return  # our Ctrl-C, raised where it could not propagate: the watchdog ends the process
        previous(args)
    return hook


def _quiet_uncaught(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            _state["interrupted"] = True
            _flush()
            try:
                os.write(2, b"\ninterrupted\n")
            except OSError:
                pass
            exit_now(EXIT_INTERRUPTED)
        previous(exc_type, exc, tb)
    return hook


def install() -> None:
    """Route SIGINT to KeyboardInterrupt plus the watchdog. Call from the main thread, once."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return  # started with Ctrl-C ignored (nohup, a background job): keep it that way
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    sys.excepthook = _quiet_uncaught(sys.excepthook)
    threading.Thread(target=_watchdog, args=(read_fd,), name="sigint-watchdog", daemon=True).start()
    _state["installed"] = True


def interrupted() -> bool:
    """Whether a Ctrl-C arrived since install()."""
    return _state["interrupted"]


def exit_now(code: int) -> NoReturn:
    """Flush and end the process without interpreter shutdown; 130 if a Ctrl-C arrived."""
    _flush()
    for fn in _cleanups:
        try:
            fn()
        except Exception:  # a cleanup that fails leaves a temporary file behind, no more
            pass
    os._exit(EXIT_INTERRUPTED if _state["interrupted"] else int(code))


def main(fn: Callable[[], int | None]) -> NoReturn:
    """Run a command's body with install(); exit with its status (130 on Ctrl-C, never a traceback)."""
    install()
    try:
        code = fn()
    except KeyboardInterrupt:
        _flush()
        sys.stderr.write("\ninterrupted\n")
        code = EXIT_INTERRUPTED
    except SystemExit as e:  # argparse's usage errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code is not None and not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
    exit_now(0 if code is None else code)
