"""The weight-format registry (common.formats): each entry's rules, and that the rest of the project
reads its formats from it rather than naming them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from common import formats
from common.formats import QuantError

ROOT = Path(__file__).resolve().parents[1]
NAMED = re.compile(r"\b(int8|fp8)\b|float8|e4m3", re.IGNORECASE)
MAX_NAMING_FILES = 18  # non-test Python files that may name a weight format (the registry, dequantization paths)


def test_registry_entries():
    assert formats.NAMES[0] == "bf16" and set(formats.QUANTIZED) == set(formats.NAMES) - {"bf16"}
    bf16 = formats.get(None)
    assert bf16 is formats.get("bf16") and not bf16.quantized and bf16.storage_bytes is None and bf16.row_block == 1
    for name in formats.QUANTIZED:
        fmt = formats.get(name)
        assert fmt.quantized and fmt.storage_bytes == 1 and fmt.max_value > 0 and fmt.head in formats.NAMES
        assert formats.get(fmt) is fmt and formats.of_tile_dtype(fmt.tile_dtype("bfloat16")) is fmt
    assert len({formats.get(n).code for n in formats.NAMES}) == len(formats.NAMES)  # the kernels' constants differ
    with pytest.raises(QuantError, match="weight format 'int4': expected one of bf16, int8, fp8"):
        formats.get("int4")
    with pytest.raises(QuantError, match="activations='int8'"):
        formats.get("int8").tile_dtype("bfloat16", activations="int8")  # W8A8: the axis exists, no entry yet


@pytest.mark.parametrize("name", formats.QUANTIZED)
def test_quantize_round_trip(name):
    """Every entry's numpy quantization: values within its limit, scales of its scale_shape, and the
    dequantized weight within half a step of each value (its scale / 2 for integers; e4m3's 3-bit
    mantissa: 1/16 relative, for floats)."""
    fmt = formats.get(name)
    w = np.random.default_rng(0).normal(0, 0.02, (300, 260)).astype(np.float32)
    q, scale = fmt.quantize(w)
    assert q.dtype == np.dtype(fmt.storage) and scale.dtype == np.float32 and scale.shape == fmt.scale_shape(w.shape)
    assert np.abs(q.astype(np.float32)).max() <= fmt.max_value
    back = fmt.dequantize(q, scale)
    full = scale[:, None] if fmt.per_row else np.repeat(np.repeat(scale, fmt.scale_block[0], 0),
                                                        fmt.scale_block[1], 1)[:300, :260]
    bound = full / 2 + 1e-12 if fmt.integer else np.abs(w) / 16 + full * 2.0 ** -9
    assert (np.abs(back - w) <= bound).all()


def test_resolve_and_checkpoint_layouts():
    fp8 = formats.get("fp8")
    stored = formats.parse_quantization_config(dict(fp8.checkpoint_config), "config.json")
    assert stored is fp8 and formats.resolve(None, stored, "ck") is fp8 and formats.resolve("fp8", stored, "ck") is fp8
    with pytest.raises(QuantError, match="quantized already"):
        formats.resolve("int8", stored, "ck")
    assert formats.resolve("int8", None, "ck").name == "int8" and formats.resolve("none", None, "ck").name == "bf16"
    with pytest.raises(QuantError, match="quant_method='awq'"):
        formats.parse_quantization_config({"quant_method": "awq"}, "config.json")


def test_cli_choices_come_from_the_registry():
    from common import cli
    from measure import tune

    for parser in (cli.build_parser(), tune.parser("python -m torch_impl.tune")):
        action = next(a for a in parser._actions if "--quantization" in a.option_strings)
        assert list(action.choices) == formats.cli_choices() == ["none", *formats.QUANTIZED]


def naming_files(root: Path = ROOT) -> list[str]:
    """The non-test Python files under `root` that name a weight format."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "tests" or any(p.startswith(".") for p in rel.parts):
            continue
        if NAMED.search(path.read_text()):
            out.append(rel.as_posix())
    return out


def test_few_files_name_a_format():
    """The formats are named in the registry and the paths that dequantize them, not everywhere:
    adding one is an entry plus a branch per path (common/formats.py's doc)."""
    files = naming_files()
    assert "common/formats.py" in files
    assert len(files) <= MAX_NAMING_FILES, f"{len(files)} files name a weight format: {files}"


def test_the_count_sees_naming_files(tmp_path):
    """The check above can fail: a file naming a format counts, test files and uint8 do not."""
    (tmp_path / "common").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "common" / "a.py").write_text('FMT = "fp8"\n')
    (tmp_path / "common" / "b.py").write_text("import numpy as np\nX = np.uint8\n")
    (tmp_path / "common" / "c.py").write_text("# an INT8 weight\n")
    (tmp_path / "tests" / "test_a.py").write_text('FMT = "int8"\n')
    assert naming_files(tmp_path) == ["common/a.py", "common/c.py"]
