"""What the command-line tools show of logging: the project's own loggers, nothing else.

The twins log their one fused-or-plain choice (and other once-only notes) at INFO on the loggers
below. A command shows those on stderr; the root logger is left alone, so other libraries' INFO
lines (jax probing for a TPU backend, say) stay hidden.
"""

from __future__ import annotations

import logging
from typing import TextIO

PROJECT_LOGGERS = ("common", "jax_impl", "torch_impl", "bench")
_HANDLER_NAME = "qwen3-fused-cli"


def show_project_logs(stream: TextIO, level: int = logging.INFO) -> None:
    """Print the project's log records at `level` and above to `stream` as bare messages."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(h)
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
