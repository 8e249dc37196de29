"""common.fused's one decision and common.tile_rules' capability gates, without a framework: each
outcome and its message, for a device of each kind a twin can report."""

from __future__ import annotations

import pytest

from common import formats
from common.fused import Decision, FusedUnavailable, Here, Twin, check_weight_format, decide, log_once
from common.tile_rules import CAPABILITY, capable, format_min_capability

TWIN = Twin(name="twin_impl", kernels="K kernels", plain="plain P path", plain_where="in P", no_gpu="no CUDA GPU")
CPU = Here(None, interpreter="in the interpreter on cpu")


def _decide(fused, here, *, imports=True):
    loaded = []

    def load():
        if not imports:
            raise ImportError("no module named k")
        loaded.append(True)

    decision = decide(TWIN, fused, here, load=load, describe=lambda: "fused='auto' -> per shape on GPU X")
    return decision, bool(loaded)


def test_capability_gates():
    assert CAPABILITY == {"kernels": (8, 0), "pdl": (9, 0)}  # a weight format's own gate: its registry entry
    assert capable("kernels", (8, 0)) and not capable("kernels", (7, 5)) and not capable("kernels", None)
    assert capable("pdl", (10, 0)) and not capable("pdl", (8, 9)) and capable((8, 9), (9, 0))
    assert format_min_capability("fp8") == (8, 9) == formats.get("fp8").min_capability
    assert format_min_capability("int8") is None and format_min_capability("bf16") is None


def test_plain_without_kernels():
    for here in (CPU, Here((9, 0))):
        assert _decide(False, here) == (Decision("plain", "twin_impl: plain P path (fused=False)"), False)
        assert _decide("off", here)[0].path == "plain"
    assert _decide("auto", CPU) == (Decision("plain", "twin_impl: plain P path (fused='auto': no CUDA GPU)"), False)
    assert _decide("auto", Here((7, 5))) == (
        Decision("plain", "twin_impl: plain P path (fused='auto': compute capability 7.5 < 8.0)"), False)
    assert _decide("auto", Here((9, 0)), imports=False) == (
        Decision("plain", "twin_impl: plain P path (fused='auto': K kernels unavailable: no module named k)"), False)
    with pytest.raises(ValueError, match="fused='sometimes'"):
        _decide("sometimes", CPU)


def test_kernels_everywhere_or_per_shape():
    assert _decide(True, CPU) == (Decision("fused", "twin_impl: fused K kernels in the interpreter on cpu "
                                                    "(fused=True)"), True)
    assert _decide("on", Here((8, 0))) == (Decision("fused", "twin_impl: fused K kernels on the GPU (fused=True)"),
                                           True)
    assert _decide("auto", Here((8, 0))) == (Decision("per-shape", "twin_impl: fused='auto' -> per shape on GPU X"),
                                             True)


def test_fused_true_where_the_kernels_cannot_run_raises():
    with pytest.raises(FusedUnavailable, match="^set the interpreter on$"):
        _decide(True, Here(None, unusable="set the interpreter on"))
    with pytest.raises(FusedUnavailable, match=r"^fused=True: the K kernels need compute capability >= 8\.0 "
                                               r"\(bfloat16 tensor cores\), this GPU has 7\.5$"):
        _decide(True, Here((7, 5)))
    with pytest.raises(FusedUnavailable, match=r"^fused=True: the K kernels cannot be imported here "
                                               r"\(no module named k\)$"):
        _decide(True, CPU, imports=False)
    assert issubclass(FusedUnavailable, RuntimeError)  # common.harness.check_runner catches RuntimeError


def test_weight_format_gate(caplog):
    """fp8 on the GPUs where the kernels run but cannot convert e4m3 (8.0-8.8): fused=True raises,
    "auto" logs once; elsewhere (other formats, newer or older GPUs, no GPU, fused=False) nothing."""
    for fused, fmt, cc in [(True, "int8", (8, 0)), (True, "bf16", (8, 6)), (True, "fp8", (8, 9)),
                           (True, "fp8", (7, 5)), (True, "fp8", None), (False, "fp8", (8, 0))]:
        check_weight_format(TWIN, fused, fmt, cc)
    with pytest.raises(FusedUnavailable) as e:
        check_weight_format(TWIN, "on", "fp8", (8, 6))
    assert str(e.value) == ("fused=True (--fused on) with fp8 weights: the fused kernels convert e4m3 only on "
                            "compute capability >= 8.9, this GPU has 8.6; use fused='auto' (--fused auto: the fp8 "
                            "projections then dequantize in P) or int8 weights (quantization='int8' on the bf16 "
                            "checkpoint)")
    log_once.cache_clear()
    caplog.set_level("INFO", logger="twin_impl")
    check_weight_format(TWIN, "auto", "fp8", (8, 0))
    check_weight_format(TWIN, "auto", "fp8", (8, 0))
    assert [r.getMessage() for r in caplog.records if r.name == "twin_impl"] == [
        "twin_impl: fp8 projections dequantize in P (fused='auto'; fp8 weights: the fused kernels convert e4m3 "
        "only on compute capability >= 8.9, this GPU has 8.0)"]
