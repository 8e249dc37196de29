"""The op contract of common.ops, enforced: every twin's kernel and plain implementation of every op
has the spec's signature (common.ops.signature_drift), the reference takes the op's arguments, and
the lists derived from OPS (tiles, tuners, benchmarks) follow it. Signatures only: nothing runs."""

from __future__ import annotations

import importlib
import inspect

import pytest

from common import ops, reference, tiles
from common.ops import KERNEL_EXTRAS, OPS, signature, signature_drift
from common.tile_types import MatmulTiles

IMPLS = [(fw, kind) for fw in ("jax", "torch") for kind in ("kernels", "plain")]


def _module(fw: str, kind: str):
    pytest.importorskip(fw)
    if fw == "torch":
        pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 on CPU before triton's import
    return importlib.import_module(f"{fw}_impl.{kind}")


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("fw, kind", IMPLS, ids=[f"{fw}-{kind}" for fw, kind in IMPLS])
def test_every_implementation_has_the_spec_signature(fw, kind, name):
    fn = getattr(_module(fw, kind), name)
    extras = KERNEL_EXTRAS[fw] if kind == "kernels" else ()
    assert signature_drift(name, fn, extras=extras) == []


@pytest.mark.parametrize("name", list(OPS))
def test_kernel_and_plain_defaults_agree(name):
    """Per twin, what a caller may leave out has the same default in the kernel and the plain op."""
    for fw in ("jax", "torch"):
        params = [{p.name: p.default for p in inspect.signature(getattr(_module(fw, kind), name)).parameters.values()
                   if p.name not in KERNEL_EXTRAS[fw]} for kind in ("kernels", "plain")]
        assert params[0] == params[1], f"{fw} {name}: kernel {params[0]} vs plain {params[1]}"


@pytest.mark.parametrize("name", list(OPS))
def test_the_reference_takes_the_ops_arguments(name):
    """OPS[name].reference(*args, **kwargs) with the op's arguments (no tiles; its own dtype=)."""
    assert OPS[name].reference is getattr(reference, name)
    assert signature_drift(name, OPS[name].reference, extras=("dtype",), tiles=False) == []


# ----- the checker can fail ---------------------------------------------------------------------

def _mlp(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None, down_tiles=None):
    """mlp's signature as the spec has it."""


def test_the_checker_passes_the_spec_and_reports_each_drift():
    assert signature_drift("mlp", _mlp) == []

    def swapped(x, w_gate_up, norm_w, w_down, residual, *, eps, tiles=None, down_tiles=None): ...
    def no_down_tiles(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None): ...
    def eps_positional(x, norm_w, w_gate_up, w_down, residual, eps, *, tiles=None, down_tiles=None): ...
    def eps_default(x, norm_w, w_gate_up, w_down, residual, *, eps=1e-6, tiles=None, down_tiles=None): ...
    def residual_default(x, norm_w, w_gate_up, w_down, residual=None, *, eps, tiles=None, down_tiles=None): ...
    def tiles_default(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=MatmulTiles(16, 16, 16),
                      down_tiles=None): ...
    def extra_kwarg(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None, down_tiles=None, name="mlp"): ...
    def var_kwargs(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None, down_tiles=None, **kw): ...
    def required_extra(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None, down_tiles=None, interpret): ...

    expect = {swapped: "positional arguments (x, w_gate_up, norm_w, w_down, residual), expected "
                       "(x, norm_w, w_gate_up, w_down, residual)",
              no_down_tiles: "keyword-only arguments (eps, tiles), expected (eps, tiles, down_tiles)",
              eps_positional: "positional arguments (x, norm_w, w_gate_up, w_down, residual, eps)",
              eps_default: "keyword eps has a default (1e-06), expected none",
              residual_default: "positional argument residual has a default (None), expected none",
              tiles_default: "keyword tiles defaults to MatmulTiles(",
              extra_kwarg: "keyword-only arguments (eps, tiles, down_tiles, name), expected (eps, tiles, down_tiles)",
              var_kwargs: "takes **kw"}
    for fn, problem in expect.items():
        drift = signature_drift("mlp", fn)
        assert any(problem in d for d in drift), f"{fn.__name__}: {drift}"
        assert all(d.startswith("mlp: ") and d.endswith(f"the op is {signature('mlp')}") for d in drift), drift
    assert signature_drift("mlp", extra_kwarg, extras=("name",)) == []  # a twin's own keyword, declared
    assert "has no default" in signature_drift("mlp", required_extra, extras=("interpret",))[0]


def test_a_drifted_twin_is_caught(monkeypatch):
    """A kernel module whose op lost a keyword fails the contract test's check."""
    plain = _module("jax", "plain")
    monkeypatch.setattr(plain, "mlp", lambda x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None: None)
    assert signature_drift("mlp", plain.mlp) == [
        f"mlp: keyword-only arguments (eps, tiles), expected (eps, tiles, down_tiles); the op is {signature('mlp')}"]


def test_signature_text():
    assert signature("mlp") == ("mlp(x, norm_w, w_gate_up, w_down, residual, *, eps, tiles=None, down_tiles=None)"
                                " -> [T, hidden]")
    assert signature("rms_norm") == "rms_norm(x, weight, *, eps) -> [T, hidden]"
    assert signature("decode_attention") == "decode_attention(q, k_cache, v_cache, meta, *, tiles=None) -> [B, Hq, D]"


# ----- the lists derived from OPS ---------------------------------------------------------------

def test_the_kernel_lists_follow_ops():
    assert list(tiles.KERNEL_TILES) == ["rmsnorm_qkv", "mlp_gate_up", "linear_residual", "decode_attention",
                                        "prefill_attention", "rms_norm"]
    assert tiles.KERNEL_TILES is ops.KERNEL_TILES and tiles.MatmulTiles is MatmulTiles
    tune = importlib.import_module("measure.tune")
    assert tune.KERNEL_OP == {"rmsnorm_qkv": "rmsnorm_qkv", "mlp_gate_up": "mlp", "linear_residual": "linear_residual",
                              "decode_attention": "decode_attention", "prefill_attention": "prefill_attention",
                              "rms_norm": "rms_norm"}
    assert set(tune.QUANTIZED_KERNELS) == set(tiles.PROJECTIONS) == {"rmsnorm_qkv", "mlp_gate_up", "linear_residual"}
    for name, spec in OPS.items():
        assert tune.KERNEL_OP[spec.kernels[0]] == name
        assert all(tiles.KERNEL_TILES[k] is spec.tiles for k in spec.kernels)
    bench_kernels = importlib.import_module("bench.kernels")
    assert bench_kernels.OPS == ops.TILED_OPS == ("rmsnorm_qkv", "mlp", "linear_residual", "decode_attention",
                                                  "prefill_attention")


def test_a_spec_needs_a_tile_keyword_per_kernel():
    spec = OPS["mlp"]
    with pytest.raises(ValueError, match="tile_kwargs=\\('tiles',\\), expected 2"):
        ops.OpSpec(spec.name, spec.args, spec.kwargs, spec.returns, spec.reference, spec.kernels, spec.tiles,
                   ("tiles",), spec.doc)
