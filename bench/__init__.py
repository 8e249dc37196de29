"""Benchmark suite: `python -m bench {kernels,decode,all,compare}` (see bench/__main__.py)."""
