"""`python -m jax_impl.tune`: time the Pallas kernels' candidate tiles (and the plain XLA op) at a model's
shapes on this GPU and write the winners to your tile table (common/tune.py has the flags)."""

from common import interrupt
from common.tune import main

if __name__ == "__main__":
    interrupt.main(lambda: main("jax"))
