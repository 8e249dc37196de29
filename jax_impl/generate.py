"""`python -m jax_impl.generate`: generate text with the jax model (flags: --help)."""

from common.cli import main


def _load(model_dir, *, dtype, fused, **kwargs):
    from jax_impl import load

    return load(model_dir, dtype=dtype, fused=fused, **kwargs)


if __name__ == "__main__":
    main(_load, prog="python -m jax_impl.generate")
