"""`python -m jax_impl.tune`: time the Pallas kernels' candidate tiles (and the plain XLA op) at a model's
shapes on this GPU and write the winners to your tile table (measure/tune.py has the flags)."""

from common import interrupt


def _main() -> int:
    from measure.tune import main  # after interrupt.install(): a Ctrl-C while the imports run exits 130

    return main("jax")


if __name__ == "__main__":
    interrupt.main(_main)
