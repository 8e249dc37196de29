"""`python -m torch_impl.tune`: time the Triton kernels' candidate tiles (and the plain torch op) at a model's
shapes on this GPU and write the winners to your tile table (common/tune.py has the flags)."""

from common import interrupt
from common.tune import main

if __name__ == "__main__":
    interrupt.main(lambda: main("torch"))
