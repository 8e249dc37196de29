"""`python -m torch_impl.generate`: generate text with the torch model (flags: --help)."""

from common.cli import main


def _load(model_dir, *, dtype, fused, **kwargs):
    from torch_impl import load

    return load(model_dir, dtype=dtype, fused=fused, **kwargs)


if __name__ == "__main__":
    main(_load, prog="python -m torch_impl.generate")
