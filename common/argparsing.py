"""The project's command lines parse with argparse; a usage error is one line, as every other bad
input is (README, Quality):

    error: argument --fused: invalid choice: 'sometimes' (choose from auto, on, off); see python -m jax_impl.generate --help

instead of argparse's usage block followed by the message. Exit status 2, as argparse's.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors are one `error:` line naming the flag and --help."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())}; see {self.prog} --help\n")

