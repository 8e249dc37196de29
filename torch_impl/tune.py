"""`python -m torch_impl.tune`: time the Triton kernels' candidate tiles (and the plain torch op) at a model's
shapes on this GPU and write the winners to your tile table (measure/tune.py has the flags)."""

from common import interrupt


def _main() -> int:
    from measure.tune import main  # after interrupt.install(): a Ctrl-C while the imports run exits 130

    return main("torch")


if __name__ == "__main__":
    interrupt.main(_main)
