"""Tiles and the fused-or-plain choice as data, behind one lookup.

    choice = tiles.lookup("rmsnorm_qkv", "torch", device, dtype="bfloat16", m=1, n=4096, k=1024)
    choice.path   # "fused" | "plain"
    choice.tiles  # MatmulTiles(...) for the fused kernel
    choice.source # "user" | "shipped" | "default"
    choice.plain_form  # "reduce" | "dot": how the plain path writes a one-token projection

Every tile choice and every fused-or-plain choice of both twins goes through `lookup`, which
reads, in order:
1. the user's table, `$XDG_CACHE_HOME/qwen3-fused/tiles/<framework>/<gpu>.json` (else
   `~/.cache/qwen3-fused/...`), written by the twins' `tune` commands;
2. the table shipped in the package, `common/tile_tables/<framework>/<gpu>.json`;
3. the default rule (common.tile_rules), which reads the device's properties (SM count, shared
   memory per block, compute capability) - never a constant of one GPU.
QWEN3_TILE_TABLES=off skips both tables (the default rule alone: what a GPU without a table gets;
benchmarks' "untuned" rows).
A table is JSON: {"format": 1, "framework": ..., "device": ..., "entries": {KEY: {"path": "fused" |
"plain", "tiles": {field: value}[, "plain_form": "reduce" | "dot"]}}}; KEY names the kernel, the
shape bucket and the dtype (`matmul_key`, `attention_key`, `prefill_key`). A table that cannot be read, or an entry with
unknown fields or tiles that do not fit its shape, is reported once (a warning naming the file and
key) and skipped - the next source answers. All block sizes are powers of two (the Triton
lowering needs them; ragged edges are masked).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from common import formats, tile_rules
from common.ops import COMPOSITE_KERNELS, KERNEL_TILES, PROJECTIONS
from common.tile_types import TILE_TYPES, AttentionTiles, Device, LayerTiles, MatmulTiles, PrefillTiles, next_pow2

log = logging.getLogger("common.tiles")

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "tile_tables"
FRAMEWORKS = ("jax", "torch")
PATHS = ("fused", "plain")
PLAIN_FORMS = ("reduce", "dot")  # a one-token projection of the plain path: multiply-and-reduce, or the dot


# ----- the device (Device: common.tile_types) -----------------------------------------------------

# Shared memory per block by compute capability (the CUDA programming guide's table), for
# frameworks that do not report it (jax).
SMEM_BY_CAPABILITY = {(7, 0): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99, (9, 0): 227,
                      (10, 0): 227, (10, 3): 227, (12, 0): 99}


def smem_for(capability: tuple[int, int]) -> int:
    kb = SMEM_BY_CAPABILITY.get(tuple(capability)) or SMEM_BY_CAPABILITY.get((capability[0], 0)) or 99
    return kb * 1024


# ----- keys ---------------------------------------------------------------------------------------

def m_bucket(m: int) -> int:
    """Token-count buckets: powers of two up to 128 (1 = one token per step: the decode GEMV)."""
    return min(128, next_pow2(max(1, m)))


def matmul_key(kernel: str, m: int, n: int, k: int, dtype: str) -> str:
    """A projection kernel at m tokens: n output rows of its weight, k input features."""
    return f"{kernel}/m{m_bucket(m)}/n{n}/k{k}/{dtype}"


def attention_key(batch: int, num_kv_heads: int, max_context: int, one_block: bool, dtype: str) -> str:
    """Decode attention: the batch bucket, kv heads, the cache capacity (power-of-two bucket) and
    whether each sequence's keys lie in one cache block (no table to follow)."""
    layout = "one-block" if one_block else "paged"
    return f"decode_attention/b{m_bucket(batch)}/h{num_kv_heads}/c{next_pow2(max_context)}/{layout}/{dtype}"


PREFILL_KEY_CAP = 32768  # prefill_key's largest bucket: 8k and 32k prompts are tuned apart, longer ones as 32k


def prefill_key(max_seqlen_q: int, head_dim: int, dtype: str) -> str:
    return f"prefill_attention/q{min(PREFILL_KEY_CAP, next_pow2(max_seqlen_q))}/d{head_dim}/{dtype}"


def rms_norm_key(m: int, n: int, dtype: str) -> str:
    return f"rms_norm/m{m_bucket(m)}/n{n}/{dtype}"


def decode_layer_key(batch: int, hidden: int, intermediate: int, heads: int, kv_heads: int, dtype: str) -> str:
    return f"decode_layer/b{batch}/h{hidden}/i{intermediate}/q{heads}/kv{kv_heads}/{dtype}"


# Everything the lookup answers for: the ops' kernels and the composite ones (common.ops).
LOOKUP_TILES: dict[str, type | None] = {**KERNEL_TILES, **COMPOSITE_KERNELS}


# ----- tables -------------------------------------------------------------------------------------

def user_dir() -> Path:
    """The user's tile tables: $XDG_CACHE_HOME/qwen3-fused/tiles, else ~/.cache/qwen3-fused/tiles."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen3-fused" / "tiles"


def table_path(framework: str, device: Device, *, user: bool) -> Path:
    return (user_dir() if user else SHIPPED_DIR) / framework / f"{device.slug}.json"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def _entry_problem(key: str, entry: Any) -> str | None:
    """Why a table entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return "expected an object with 'path' and 'tiles'"
    unknown = set(entry) - {"path", "tiles", "plain_form", "us", "note"}
    if unknown:
        return f"unknown field(s) {', '.join(sorted(unknown))}"
    if entry.get("path", "fused") not in PATHS:
        return f"path={entry.get('path')!r}, expected 'fused' or 'plain'"
    if entry.get("plain_form", "dot") not in PLAIN_FORMS:
        return f"plain_form={entry.get('plain_form')!r}, expected 'reduce' or 'dot'"
    kind = LOOKUP_TILES.get(key.split("/", 1)[0], "unknown")
    if kind == "unknown":
        return f"unknown kernel {key.split('/', 1)[0]!r}"
    tiles = entry.get("tiles")
    if tiles is None:
        return None if entry.get("path") == "plain" or kind is None else "no tiles for a fused entry"
    if kind is None or not isinstance(tiles, dict):
        return f"tiles={tiles!r}: expected {'no tiles' if kind is None else 'an object of ' + kind.__name__ + ' fields'}"
    names = {f.name for f in dataclasses.fields(kind)}
    if set(tiles) - names:
        return f"unknown tile field(s) {', '.join(sorted(set(tiles) - names))} for {kind.__name__}"
    try:
        kind(**tiles)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def _read_table(path: Path, framework: str) -> dict[str, dict]:
    """The usable entries of one table file ({} when absent or unreadable, each problem warned once)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _warn_once(f"tile table {path}: cannot be read ({e}); skipped")
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        _warn_once(f"tile table {path}: expected {{\"format\": {FORMAT}, \"entries\": {{...}}}}; skipped")
        return {}
    if doc.get("framework", framework) != framework:
        _warn_once(f"tile table {path}: written for {doc.get('framework')!r}, not {framework!r}; skipped")
        return {}
    good = {}
    for key, entry in doc["entries"].items():
        problem = _entry_problem(key, entry)
        if problem:
            _warn_once(f"tile table {path}: entry {key!r}: {problem}; skipped")
        else:
            good[key] = entry
    return good


TABLES_ENV = "QWEN3_TILE_TABLES"


def tables_on() -> bool:
    """False when QWEN3_TILE_TABLES=off: the default rule alone answers (tables are read otherwise)."""
    value = os.environ.get(TABLES_ENV, "on").strip().lower()
    if value not in ("on", "off", ""):
        raise ValueError(f"{TABLES_ENV}={os.environ[TABLES_ENV]!r}: expected 'on' (the default) or 'off' "
                         f"(the default rule alone, no tile table)")
    return value != "off"


def sources(framework: str, device: Device) -> str:
    """Where this device's choices come from, for the one log line of a twin's selection."""
    if not tables_on():
        return f"the default rule ({TABLES_ENV}=off)"
    found = [s for s, user in (("your tuned table", True), ("the shipped table", False))
             if table_path(framework, device, user=user).is_file()]
    return " and ".join(found) or "the default rule: no table for this GPU"


def clear_cache() -> None:
    """Forget the tables read so far (after a tuner wrote one, or in tests)."""
    _read_table.cache_clear()
    _warn_once.cache_clear()
    _lookup.cache_clear()


# ----- the lookup -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    path: str  # "fused" | "plain"
    tiles: Any  # the kernel's tiles (None for "plain" and for kernels without tiles)
    source: str  # "user" | "shipped" | "default"
    key: str
    # How the plain path writes this projection at one token per step (read at m == 1 only, and by
    # jax_impl alone): "reduce" multiplies and sums over K, "dot" is the framework's product.
    plain_form: str = "dot"


def shape_key(kernel: str, dtype: str, shape: dict) -> str:
    if kernel in PROJECTIONS:
        return matmul_key(kernel, shape["m"], shape["n"], shape["k"], dtype)
    if kernel == "decode_attention":
        return attention_key(shape["batch"], shape["num_kv_heads"], shape["max_context"], shape["one_block"], dtype)
    if kernel == "prefill_attention":
        return prefill_key(shape["max_seqlen_q"], shape["head_dim"], dtype)
    if kernel == "rms_norm":
        return rms_norm_key(shape["m"], shape["n"], dtype)
    if kernel == "decode_layer":
        return decode_layer_key(shape["batch"], shape["hidden"], shape["intermediate"], shape["heads"],
                                shape["kv_heads"], dtype)
    raise ValueError(f"tiles.lookup: unknown kernel {kernel!r}; expected one of {', '.join(LOOKUP_TILES)}")


def lookup(kernel: str, framework: str, device: Device, *, dtype: str, **shape) -> Choice:
    """The path and tiles of `kernel` at this shape on this device (see the module doc)."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"tiles.lookup: framework={framework!r}, expected one of {', '.join(FRAMEWORKS)}")
    tables = device.is_gpu and tables_on()  # tables are per GPU: off a GPU the variable is not read
    return _lookup(kernel, framework, device, str(dtype), tuple(sorted(shape.items())), tables)


@functools.lru_cache(maxsize=4096)
def _lookup(kernel: str, framework: str, device: Device, dtype: str, shape_items: tuple, tables: bool) -> Choice:
    shape = dict(shape_items)
    key = shape_key(kernel, dtype, shape)
    if tables:
        for source, user in (("user", True), ("shipped", False)):
            path = table_path(framework, device, user=user)
            entry = _read_table(path, framework).get(key)
            if entry is None:
                continue
            kind = LOOKUP_TILES[kernel]
            tiles = kind(**entry["tiles"]) if kind is not None and entry.get("tiles") is not None else None
            problem = tile_rules.misfit(kernel, framework, tiles, shape) if tiles is not None else None
            if problem:
                _warn_once(f"tile table {path}: entry {key!r}: {problem}; skipped")
                continue
            chosen_path = entry.get("path", "fused")
            if tiles is None and kind is not None:  # a "plain" entry: the kernel's tiles when it is forced
                tiles = tile_rules.default_tiles(kernel, framework, device, dtype, shape)
            form = entry.get("plain_form") or tile_rules.default_plain_form(kernel, framework, device, shape)
            return Choice(chosen_path, tiles, source, key, form)
    path = tile_rules.default_path(kernel, framework, device, shape, dtype)
    tiles = tile_rules.default_tiles(kernel, framework, device, dtype, shape) if LOOKUP_TILES[kernel] else None
    return Choice(path, tiles, "default", key, tile_rules.default_plain_form(kernel, framework, device, shape))


# ----- the launchers' side: each twin's kernels/_lib.py reads its device and dtype, then asks these --

def choose(kernel: str, framework: str, device: Device, dtype: str, fmt: str | None = None, **shape) -> Choice:
    """`lookup` for activations of dtype name `dtype` and weights in format `fmt` (common.formats)."""
    return lookup(kernel, framework, device, dtype=formats.get(fmt).tile_dtype(dtype), **shape)


def launch_tiles(op: str, tiles, tile_type: type, chosen: Callable[[], Choice]):
    """The tiles a launcher runs: the caller's, else the lookup's (`chosen()`); checked to be `tile_type`."""
    tiles = tiles or chosen().tiles
    if not isinstance(tiles, tile_type):
        raise ValueError(f"{op}: tiles={tiles!r}, expected a common.tiles.{tile_type.__name__}")
    return tiles


def check_qweight(where: str, w, storage: Callable, capability, kernels: str, fallback: str) -> formats.WeightFormat:
    """The format of a kernel's QWeight `w`: its values of the framework's `storage(format)` dtype, on a
    GPU (`capability`; None off a GPU) its kernels (`kernels`, else the plain path `fallback`) run it on."""
    fmt = formats.FORMATS.get(w.fmt)
    if fmt is None or not fmt.quantized or w.q.dtype != storage(fmt):
        raise ValueError(f"{where} is a {w.fmt!r} QWeight of {w.q.dtype} values")
    need = tile_rules.format_min_capability(w.fmt)
    if need is not None and capability is not None and not tile_rules.capable(need, capability):
        raise ValueError(f"{where}: {w.fmt} weights need compute capability >= {tile_rules.dotted(need)} for the "
                         f"{kernels} kernels, this GPU has {tile_rules.dotted(capability)} (fused='auto' runs these "
                         f"projections {fallback})")
    return fmt


def _doc_to_extend(framework: str, device: Device, target: Path) -> dict:
    """The table document write_entry adds to: `target`'s own (its "note" kept), else a new one.
    Refuses (ValueError) any existing `target` but a tile table of `framework`: a directory, a file
    that is not JSON, other JSON, the other framework's table (read by neither twin) - never
    overwritten."""
    doc = {"format": FORMAT, "framework": framework, "device": device.name, "entries": {}}
    if not os.path.lexists(target):
        return doc
    expected = f"expected a tile table of {framework} ({{\"format\": {FORMAT}, \"framework\": \"{framework}\", " \
               f"\"entries\": {{...}}}}) or a new file; refusing to overwrite it"
    if target.is_dir():
        raise ValueError(f"{target}: a directory; expected a tile table file of {framework}")
    if not target.is_file():  # a pipe or a device: reading it may never end
        raise ValueError(f"{target}: not a regular file; {expected}")
    try:
        old = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{target}: cannot be read as JSON ({type(e).__name__}: {e}); {expected}") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("entries"), dict):
        raise ValueError(f"{target}: not a tile table; {expected}")
    if old.get("framework", framework) != framework:
        raise ValueError(f"tile table {target}: its framework is {old['framework']!r}, not {framework!r}; "
                         f"refusing to add {framework} entries to it (expected a tile table of {framework} or a "
                         f"new file)")
    return {**old, **{k: doc[k] for k in ("format", "framework", "device")}}


def check_writable(framework: str, target: Path, *, make_folders: bool = False) -> None:
    """Raise ValueError where writing `target` would fail or destroy something (before a sweep
    starts): an existing path that is not a tile table of `framework` (`_doc_to_extend`), a folder
    that is missing (`make_folders`: write_entry makes them; the nearest existing one is checked)
    or not writable."""
    _doc_to_extend(framework, Device.cpu(), target)
    folder = target.parent
    while make_folders and not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.lexists(folder):
        raise ValueError(f"{target}: its folder {folder} does not exist; expected a file in an existing, "
                         f"writable folder")
    if not folder.is_dir():
        raise ValueError(f"{target}: {folder} is not a folder; expected a file in a writable folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{target}: its folder {folder} is not writable; expected a file in a writable folder")


def write_entry(framework: str, device: Device, key: str, path: str, tiles, *, us: float | None = None,
                note: str | None = None, table: Path | None = None) -> Path:
    """Add or replace one entry of the user's table (what the tuners call after each measurement).

    The file is replaced whole (a temporary file renamed over it): an interrupted write leaves the
    previous table, and no temporary file."""
    target = table or table_path(framework, device, user=True)
    doc = _doc_to_extend(framework, device, target)
    entry: dict = {"path": path, "tiles": dataclasses.asdict(tiles) if tiles is not None else None}
    if us is not None:
        entry["us"] = round(float(us), 3)
    if note:
        entry["note"] = note
    problem = _entry_problem(key, entry)
    if problem:
        raise ValueError(f"tile table {target}: entry {key!r}: {problem}")
    doc["entries"][key] = entry
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)  # a write interrupted before the rename
    clear_cache()
    return target


# The re-exports (common.ops, common.tile_types) are the usual import of their names.
__all__ = ["FORMAT", "SHIPPED_DIR", "FRAMEWORKS", "PATHS", "PLAIN_FORMS", "TABLES_ENV", "KERNEL_TILES", "LOOKUP_TILES",
           "COMPOSITE_KERNELS", "LayerTiles", "decode_layer_key", "PROJECTIONS",
           "TILE_TYPES", "AttentionTiles", "MatmulTiles", "PrefillTiles", "Device", "next_pow2", "SMEM_BY_CAPABILITY",
           "smem_for", "m_bucket", "matmul_key", "attention_key", "prefill_key", "rms_norm_key", "user_dir",
           "table_path", "tables_on", "sources", "clear_cache", "Choice", "shape_key", "lookup", "check_writable",
           "write_entry"]
