"""The safetensors files of a checkpoint: the directory's files, each header parsed and checked.

Headers are read as the format defines them (an 8-byte length, then JSON): no tensor data is read,
and a truncated or corrupt file is one WeightsError naming it. common.weights reads the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


class WeightsError(ValueError):
    """A checkpoint directory or tensor that does not match the config."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: BF16, F32, ...
    start: int = 0  # byte offset of its data in the file

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 0)
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise WeightsError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape, dtype = tuple(int(s) for s in meta["shape"]), str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if end > data_size or start > end:
            raise WeightsError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                               f"section, which holds only {data_size} bytes")
        out[name] = TensorInfo(name, path, shape, dtype, base + int(start))
    return out


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{index}: not a valid shard index (invalid JSON: {e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightsError(f"{index}: not a valid shard index (expected a JSON object whose "
                               f"\"weight_map\" maps tensor names to shard file names)")
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            path = model_dir / fname
            if not path.is_file():
                raise WeightsError(f"{index}: names shard {fname!r}, which does not exist in {model_dir}")
            files.append(path)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise WeightsError(f"{model_dir}: only pickle checkpoints (*.bin/*.pt) found; they are never "
                           f"loaded - convert to safetensors")
    raise WeightsError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
