"""Tolerances as data, and the comparison helpers every test of both twins uses.

TOLERANCES[dtype] = (atol, rtol) for comparing a result computed in `dtype` against the
float64/float32 reference. For low-precision kernels the stronger check is `assert_lowp_close`:
the kernel's error against the float reference may be at most FACTOR times the error of the
plain framework op computed in the same dtype (the rule that separates bugs from rounding).
"""

from __future__ import annotations

import numpy as np

TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 2e-4),
    "bfloat16": (2e-2, 2e-2),
    "float16": (2e-3, 2e-3),
}
FACTOR = 2.0  # a kernel's low-precision error may be at most this multiple of the framework's own
# Errors below this fraction of the reference's scale are rounding of the float32 accumulation
# itself, not a real difference between two bf16 paths; the 2x rule starts above it.
ERROR_FLOOR = 1e-3


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def describe_mismatch(actual, expected, atol: float, rtol: float) -> str:
    a, e = _np(actual), _np(expected)
    bad = ~(np.abs(a - e) <= atol + rtol * np.abs(e))
    n_nan = int(np.isnan(a).sum())
    n_inf = int(np.isinf(a).sum())
    idx = np.argwhere(bad)[:5].tolist()
    err = np.abs(a - e)
    worst = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape) if err.size else ()
    return (f"{int(bad.sum())} of {bad.size} elements differ beyond atol={atol:g}, rtol={rtol:g}; "
            f"first at {idx}; max abs error {np.nanmax(err) if err.size else 0:.3g} at {tuple(int(i) for i in worst)} "
            f"(actual {a[worst] if err.size else ''}, expected {e[worst] if err.size else ''}); "
            f"NaN: {n_nan}, inf: {n_inf}")


def assert_close(actual, expected, dtype: str = "float32", *, what: str = "result") -> None:
    """actual ~= expected within TOLERANCES[dtype]; NaN never passes; the message says where."""
    atol, rtol = TOLERANCES[dtype]
    a, e = _np(actual), _np(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    if np.isnan(a).any() or not np.allclose(a, e, atol=atol, rtol=rtol):
        raise AssertionError(f"{what} ({dtype}): " + describe_mismatch(a, e, atol, rtol))


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius); inf when actual has NaN."""
    a, e = _np(actual), _np(expected)
    if np.isnan(a).any():
        return float("inf")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def assert_lowp_close(kernel, framework, reference, *, factor: float = FACTOR, what: str = "kernel") -> None:
    """The low-precision rule: rel_error(kernel, ref) <= factor * max(rel_error(framework, ref), floor)."""
    k_err, f_err = rel_error(kernel, reference), rel_error(framework, reference)
    bound = factor * max(f_err, ERROR_FLOOR)
    if not k_err <= bound:
        raise AssertionError(f"{what}: relative error {k_err:.3g} against the float reference exceeds "
                             f"{factor:g} x the framework's own low-precision error ({f_err:.3g}, floor "
                             f"{ERROR_FLOOR:g}); " + describe_mismatch(kernel, reference, 0.0, 0.0)[:300])
