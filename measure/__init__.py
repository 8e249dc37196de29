"""Measurement, beside bench: chains of one op over distinct per-layer buffers (op_chains), their
timing in each framework's way (timing), and the tuners' engine (tune). It takes a twin as a
backend (common.backend); jax and torch are imported inside functions."""
