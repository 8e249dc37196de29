"""`python -m torch_impl.generate`: generate text with the torch model (flags: --help)."""

from common import interrupt


def _main() -> int:
    from common.cli import run  # after interrupt.install(): a Ctrl-C while numpy and the rest import exits 130
    from torch_impl import load

    return run(load, prog="python -m torch_impl.generate")


if __name__ == "__main__":
    interrupt.main(_main)
