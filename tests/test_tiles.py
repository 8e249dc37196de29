"""common.tiles: the one lookup (user table -> shipped table -> default rule), the default rule on
faked devices, and bad tables reported once and skipped."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from common import tile_rules, tiles
from common.config import PRESETS
from common.tiles import AttentionTiles, Device, MatmulTiles, PrefillTiles

FAKES = [Device("fake A", 108, 164 * 1024, (8, 0)), Device("fake H", 132, 227 * 1024, (9, 0)),
         Device("fake H200-like", 142, 227 * 1024, (9, 0)), Device("fake small smem", 132, 100 * 1024, (8, 6))]
H100 = Device("NVIDIA H100 80GB HBM3", 132, 227 * 1024, (9, 0))


pytestmark = pytest.mark.usefixtures("fresh_tiles")  # no user table; the lookup's cache cleared


def _shapes(cfg):
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    for m in (1, 3, 16, 32, 67, 512):
        yield "rmsnorm_qkv", dict(m=m, n=cfg.qkv_size, k=h, head_dim=d)
        yield "mlp_gate_up", dict(m=m, n=2 * i, k=h)
        yield "linear_residual", dict(m=m, n=h, k=cfg.q_size)
        yield "linear_residual", dict(m=m, n=h, k=i)
    for b in (1, 16, 128):
        for c in (256, 4096, 40960):
            yield "decode_attention", dict(batch=b, num_kv_heads=cfg.num_key_value_heads, max_context=c,
                                           one_block=False)
    yield "prefill_attention", dict(max_seqlen_q=700, head_dim=d)


@pytest.mark.parametrize("device", FAKES, ids=lambda d: d.name)
@pytest.mark.parametrize("framework", tiles.FRAMEWORKS)
def test_default_rule_fits_every_preset_shape(device, framework):
    for cfg in PRESETS.values():
        for kernel, shape in _shapes(cfg):
            choice = tiles.lookup(kernel, framework, device, dtype="bfloat16", **shape)
            assert choice.source == "default" and choice.path in ("fused", "plain")
            assert isinstance(choice.tiles, tiles.KERNEL_TILES[kernel]), (kernel, shape)
            assert tile_rules.misfit(kernel, framework, choice.tiles, shape) is None, (kernel, shape, choice)
            t = choice.tiles
            if isinstance(t, MatmulTiles) and t.block_m >= tile_rules.DOT_MIN_M:
                assert t.num_stages * (t.block_m + t.block_n) * t.block_k * 2 <= device.smem_per_block, (kernel, t)


def test_default_rule_reads_properties_not_names():
    twin = dataclasses.replace(FAKES[1], name="some other GPU")
    for kernel, shape in _shapes(PRESETS["Qwen3-8B"]):
        for fw in tiles.FRAMEWORKS:
            a = tiles.lookup(kernel, fw, FAKES[1], dtype="bfloat16", **shape)
            b = tiles.lookup(kernel, fw, twin, dtype="bfloat16", **shape)
            assert (a.path, a.tiles) == (b.path, b.tiles)


def test_decode_attention_splits_follow_the_sm_count():
    shape = dict(batch=1, num_kv_heads=8, max_context=32768, one_block=True)
    splits = [tiles.lookup("decode_attention", "torch", d, dtype="bfloat16", **shape).tiles.num_splits
              for d in sorted(FAKES[:3], key=lambda d: d.sm_count)]
    assert splits == sorted(splits) and splits[0] * 8 >= 108 and splits[-1] * 8 >= 142
    short = tiles.lookup("decode_attention", "torch", FAKES[2], dtype="bfloat16",
                         **dict(shape, max_context=511)).tiles.num_splits
    assert short == 1  # each split keeps >= 256 positions of the capacity


def test_default_split_k_follows_the_sm_count():
    """torch_impl at 32 tokens: the reduction split until the programs are twice the SMs, each part
    keeping >= 512 of K; Qwen3-0.6B on an H100 gets its tuned tiles (o_proj / down: 16 columns in
    4 parts; qkv, gate/up: 32 in 2 parts); Qwen3-8B's gate/up (768 tiles) is not split."""
    cfg = PRESETS["Qwen3-0.6B"]
    h, i = cfg.hidden_size, cfg.intermediate_size
    rule = lambda kernel, n, k, dev=H100, m=32: tile_rules.default_tiles(  # noqa: E731
        kernel, "torch", dev, "bfloat16", dict(m=m, n=n, k=k, head_dim=cfg.head_dim))
    assert rule("linear_residual", h, cfg.q_size) == MatmulTiles(32, 16, 128, num_stages=3, split_k=4)
    assert rule("linear_residual", h, i) == MatmulTiles(32, 16, 128, num_stages=3, split_k=4)
    assert rule("rmsnorm_qkv", cfg.qkv_size, h) == MatmulTiles(32, 32, 128, num_stages=3, split_k=2)
    assert rule("mlp_gate_up", 2 * i, h) == MatmulTiles(32, 32, 128, num_stages=3, split_k=2)
    big = PRESETS["Qwen3-8B"]
    assert rule("mlp_gate_up", 2 * big.intermediate_size, big.hidden_size).split_k == 1
    few = Device("fake 16 SMs", 16, 227 * 1024, (9, 0))
    assert rule("linear_residual", h, i, few).split_k == 1  # 64 programs already cover 2 x 16 SMs
    for n, k in ((h, cfg.q_size), (h, i), (big.hidden_size, big.intermediate_size), (1024, 1000)):
        splits = [rule("linear_residual", n, k, d).split_k for d in sorted(FAKES, key=lambda d: d.sm_count)]
        assert splits == sorted(splits), (n, k, splits)
        assert all(k // s >= tile_rules.MIN_SPLIT_K or s == 1 for s in splits), (n, k, splits)
    assert rule("linear_residual", h, i, m=16).split_k == rule("linear_residual", h, i, m=64).split_k == 1


def test_stages_are_cut_to_the_shared_memory():
    big = MatmulTiles(64, 64, 256, num_stages=4)  # 64 KB per stage in bf16
    assert tile_rules.fit_stages(big, FAKES[3], 2).num_stages == 1
    assert tile_rules.fit_stages(big, FAKES[1], 2).num_stages == 3
    gemv = MatmulTiles(1, 4, 4096, num_stages=2)  # multiply and reduce: no shared-memory staging
    assert tile_rules.fit_stages(gemv, FAKES[3], 2) == gemv


def test_jax_default_path_keeps_xla_where_it_measured_faster():
    d = FAKES[1]
    path = lambda kernel, **s: tiles.lookup(kernel, "jax", d, dtype="bfloat16", **s).path  # noqa: E731
    assert path("decode_attention", batch=16, num_kv_heads=8, max_context=4096, one_block=True) == "fused"
    assert path("mlp_gate_up", m=1, n=24576, k=4096) == "fused" and path("mlp_gate_up", m=4, n=6144, k=1024) == "plain"
    assert path("rmsnorm_qkv", m=4, n=4096, k=1024, head_dim=128) == "fused"
    assert path("rmsnorm_qkv", m=16, n=6144, k=4096, head_dim=128) == "plain"
    assert path("rms_norm", m=1, n=1024) == "plain"
    assert tiles.lookup("mlp_gate_up", "torch", d, dtype="bfloat16", m=4, n=6144, k=1024).path == "fused"


def test_quantized_weights_have_their_own_keys_and_fp8_needs_sm89():
    """Projections on int8/fp8 weights look up "<dtype>-<format>" rows; fp8 runs plain where the
    compilers cannot convert e4m3 (compute capability < 8.9), in both twins."""
    key = tiles.lookup("linear_residual", "torch", FAKES[1], dtype="bfloat16-int8", m=1, n=1024, k=2048).key
    assert key.endswith("/bfloat16-int8")
    shape = dict(m=1, n=1024, k=2048)
    for fw in tiles.FRAMEWORKS:
        assert tiles.lookup("linear_residual", fw, FAKES[0], dtype="bfloat16-fp8", **shape).path == "plain"
        assert tiles.lookup("linear_residual", fw, FAKES[0], dtype="bfloat16-int8", **shape).path == "fused"
        assert tiles.lookup("linear_residual", fw, FAKES[1], dtype="bfloat16-fp8", **shape).path == "fused"


def test_torch_one_byte_gemv_rule_gives_the_tuned_8b_tiles():
    """torch_impl's decode GEMV on int8 / fp8 weights at Qwen3-8B's shapes: the H100's tuned tiles
    (shipped table rows) from the default rule, on any device; bf16, small K and the lm_head as before."""
    cfg = PRESETS["Qwen3-8B"]
    h, i = cfg.hidden_size, cfg.intermediate_size
    table = json.loads((tiles.SHIPPED_DIR / "torch" / "NVIDIA_H100_80GB_HBM3.json").read_text())["entries"]
    shapes = {"linear_residual": [dict(m=1, n=h, k=i), dict(m=1, n=h, k=cfg.q_size)],
              "rmsnorm_qkv": [dict(m=1, n=cfg.qkv_size, k=h, head_dim=cfg.head_dim)],
              "mlp_gate_up": [dict(m=1, n=2 * i, k=h)]}
    for kernel, kernel_shapes in shapes.items():
        for shape in kernel_shapes:
            key = tiles.shape_key(kernel, "bfloat16-int8", shape)
            want = MatmulTiles(**table[key]["tiles"])
            for dev in FAKES:
                got = tile_rules.default_tiles(kernel, "torch", dev, "bfloat16-int8", shape)
                assert got == want, (key, dev.name)
                assert tile_rules.default_tiles(kernel, "torch", dev, "bfloat16-fp8", shape) == want
                assert tile_rules.default_tiles(kernel, "torch", dev, "bfloat16", shape) == \
                    tile_rules.default_tiles(kernel, "jax", dev, "bfloat16", shape)
    lm_head = dict(m=1, n=cfg.vocab_size, k=h)
    small = dict(m=1, n=1024, k=3072)  # 0.6B's down projection
    for shape in (lm_head, small):
        assert tile_rules.default_tiles("linear_residual", "torch", FAKES[1], "bfloat16-int8", shape) == \
            tile_rules.default_tiles("linear_residual", "torch", FAKES[1], "bfloat16", shape)


# ----- tables ---------------------------------------------------------------------------------------

def _write(path, entries, **doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "framework": "torch", "entries": entries} | doc))
    tiles.clear_cache()


SHAPE = dict(m=1, n=4096, k=1024, head_dim=128)
KEY = tiles.matmul_key("rmsnorm_qkv", 1, 4096, 1024, "bfloat16")


def test_user_table_then_shipped_then_default(tmp_path, monkeypatch):
    monkeypatch.setattr(tiles, "SHIPPED_DIR", tmp_path / "shipped")
    dev = FAKES[1]
    assert tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE).source == "default"
    _write(tiles.table_path("torch", dev, user=False), {KEY: {"path": "fused", "tiles": dict(block_m=1, block_n=8,
                                                                                              block_k=256)}})
    c = tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE)
    assert (c.source, c.tiles) == ("shipped", MatmulTiles(1, 8, 256))
    written = tiles.write_entry("torch", dev, KEY, "fused", MatmulTiles(1, 2, 1024, num_warps=8), us=4.5)
    assert written == tiles.table_path("torch", dev, user=True) and written.is_file()
    c = tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE)
    assert (c.source, c.tiles) == ("user", MatmulTiles(1, 2, 1024, num_warps=8))
    assert json.loads(written.read_text())["entries"][KEY]["us"] == 4.5
    # a second entry keeps the first and the table's own note
    doc = json.loads(written.read_text())
    written.write_text(json.dumps({**doc, "note": "tuned by hand"}))
    tiles.write_entry("torch", dev, "rmsnorm_qkv/m2/n1/k1/bfloat16", "plain", None)
    doc = json.loads(written.read_text())
    assert doc["note"] == "tuned by hand" and set(doc["entries"]) == {KEY, "rmsnorm_qkv/m2/n1/k1/bfloat16"}
    # other shapes and dtypes still fall through
    assert tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="float32", **SHAPE).source == "default"
    assert tiles.lookup("rmsnorm_qkv", "jax", dev, dtype="bfloat16", **SHAPE).source == "default"
    # the CPU never reads tables (interpreter runs)
    assert tiles.lookup("rmsnorm_qkv", "torch", Device.cpu(), dtype="bfloat16", **SHAPE).source == "default"


def test_tables_off_leaves_the_default_rule(tmp_path, monkeypatch):
    """QWEN3_TILE_TABLES=off: what a GPU without a table gets, tables present or not (bench's untuned rows)."""
    monkeypatch.setattr(tiles, "SHIPPED_DIR", tmp_path / "shipped")
    dev = FAKES[1]
    _write(tiles.table_path("torch", dev, user=False), {KEY: {"path": "plain", "tiles": None}})
    tiles.write_entry("torch", dev, KEY, "fused", MatmulTiles(1, 2, 1024, num_warps=8))
    assert tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE).source == "user"
    monkeypatch.setenv(tiles.TABLES_ENV, "off")
    c = tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE)
    default = tile_rules.default_tiles("rmsnorm_qkv", "torch", dev, "bfloat16", SHAPE)
    assert (c.source, c.tiles) == ("default", default)
    assert "QWEN3_TILE_TABLES=off" in tiles.sources("torch", dev)
    monkeypatch.setenv(tiles.TABLES_ENV, "on")
    assert tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE).source == "user"
    monkeypatch.setenv(tiles.TABLES_ENV, "maybe")
    with pytest.raises(ValueError, match="QWEN3_TILE_TABLES='maybe': expected 'on'"):
        tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **SHAPE)
    # off a GPU no table is read, so the variable is not either (jax_impl's plain path looks up on the CPU)
    assert tiles.lookup("rmsnorm_qkv", "jax", Device.cpu(), dtype="bfloat16", **SHAPE).source == "default"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot be read"),
    (json.dumps({"entries": {}}), "expected"),
    (json.dumps({"format": 1, "framework": "jax", "entries": {}}), "written for 'jax'"),
    (json.dumps({"format": 1, "entries": {KEY: {"path": "fused", "tiles": {"block_m": 1, "block_n": 8,
                                                                             "block_k": 256, "blockk": 3}}}}),
     "unknown tile field"),
    (json.dumps({"format": 1, "entries": {KEY: {"path": "fused", "tiles": {"block_m": 1, "block_n": 6,
                                                                             "block_k": 256}}}}),
     "power of two"),
    (json.dumps({"format": 1, "entries": {KEY: {"path": "sometimes", "tiles": None}}}), "path='sometimes'"),
    (json.dumps({"format": 1, "entries": {KEY: {"path": "fused", "tiles": {"block_m": 16, "block_n": 8,
                                                                             "block_k": 256}}}}),
     "needs >= 16"),
    (json.dumps({"format": 1, "entries": {KEY: {"path": "fused", "colour": "blue", "tiles": None}}}),
     "unknown field"),
])
def test_bad_tables_are_reported_once_and_skipped(tmp_path, monkeypatch, caplog, content, needle):
    monkeypatch.setattr(tiles, "SHIPPED_DIR", tmp_path / "shipped")
    dev = FAKES[1]
    path = tiles.table_path("torch", dev, user=False)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    tiles.clear_cache()
    with caplog.at_level(logging.WARNING, logger="common.tiles"):
        for m in (1, 1, 1):
            c = tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **dict(SHAPE, m=m))
        tiles.lookup("rmsnorm_qkv", "torch", dev, dtype="bfloat16", **dict(SHAPE, n=2048))
    assert c.source == "default"
    warnings = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0], [r.getMessage() for r in caplog.records]


def test_write_entry_refuses_bad_tiles():
    with pytest.raises(ValueError, match="unknown kernel"):
        tiles.write_entry("torch", FAKES[1], "lm_head/m1/n1/k1/bfloat16", "fused", MatmulTiles(1, 2, 4))


@pytest.mark.parametrize("framework", tiles.FRAMEWORKS)
def test_shipped_tables_are_whole(framework, caplog):
    """Every entry of every shipped table is usable (nothing is skipped with a warning)."""
    files = sorted((tiles.SHIPPED_DIR / framework).glob("*.json"))
    assert files, f"no shipped {framework} table"
    with caplog.at_level(logging.WARNING, logger="common.tiles"):
        for path in files:
            doc = json.loads(path.read_text())
            assert tiles._read_table(path, framework).keys() == doc["entries"].keys()
    assert not caplog.records


@pytest.mark.parametrize("framework", tiles.FRAMEWORKS)
def test_shipped_projection_tiles_fit_their_k(framework):
    """Every projection entry of the shipped tables fits its key's shape (tile_rules.misfit, which
    the lookup applies: with split_k, at most one part per chunk of K and every part with work)."""
    head_dims = {(c.qkv_size, c.hidden_size): c.head_dim for c in PRESETS.values()}
    seen, bad = 0, []
    for path in sorted((tiles.SHIPPED_DIR / framework).glob("*.json")):
        for key, entry in json.loads(path.read_text())["entries"].items():
            found = re.fullmatch(r"(rmsnorm_qkv|mlp_gate_up|linear_residual)/m(\d+)/n(\d+)/k(\d+)/.+", key)
            if found is None or entry.get("tiles") is None:
                continue
            kernel, m, n, k = found[1], *map(int, found.groups()[1:])
            shape = dict(m=m, n=n, k=k) | ({"head_dim": head_dims[n, k]} if kernel == "rmsnorm_qkv" else {})
            problem = tile_rules.misfit(kernel, framework, MatmulTiles(**entry["tiles"]), shape)
            seen += 1
            if problem:
                bad.append(f"{path.name}: {key}: {problem}")
    assert seen and not bad, "\n".join(bad)


def test_jax_h100_table_is_its_measured_rule():
    """The jax H100 table holds the choices jax_impl measured on an H100; on that device the
    lookup answers from it."""
    for kernel, shape in _shapes(PRESETS["Qwen3-0.6B"]):
        if kernel == "decode_attention":
            shape = dict(shape, one_block=True)
        c = tiles.lookup(kernel, "jax", H100, dtype="bfloat16", **shape)
        if shape.get("m", 1) <= 128 and kernel != "prefill_attention":
            assert c.source == "shipped", (kernel, shape)


def test_plain_form_of_one_token_projections_follows_the_device():
    """jax_impl's plain one-token projections: multiply-and-reduce on CUDA GPUs (by the default rule and
    through the shipped H100 table alike, as before), the dot on the CPU (where the reduction is the
    slow form) and at every other token count, for every weight format; torch_impl: the dot."""
    lm_head = dict(m=1, n=PRESETS["Qwen3-0.6B"].vocab_size, k=PRESETS["Qwen3-0.6B"].hidden_size)
    for dtype in ("bfloat16", "float32", "bfloat16-int8", "bfloat16-fp8"):
        for kernel, shape in [*_shapes(PRESETS["Qwen3-0.6B"]), ("linear_residual", lm_head)]:
            if kernel not in tile_rules.PROJECTIONS:
                continue
            for dev in [*FAKES, H100]:
                c = tiles.lookup(kernel, "jax", dev, dtype=dtype, **shape)
                assert c.plain_form == ("reduce" if shape["m"] == 1 else "dot"), (dev.name, kernel, shape, dtype, c)
                assert tiles.lookup(kernel, "torch", dev, dtype=dtype, **shape).plain_form == "dot"
            assert tiles.lookup(kernel, "jax", Device.cpu(), dtype=dtype, **shape).plain_form == "dot", (kernel, shape)
    assert tiles.lookup("linear_residual", "jax", H100, dtype="bfloat16", **lm_head).source == "default"
    assert tiles.lookup("linear_residual", "jax", H100, dtype="bfloat16", m=1, n=1024, k=2048).source == "shipped"


def test_table_entry_names_the_plain_form(tmp_path, monkeypatch, caplog):
    """A table entry may set plain_form ("reduce" | "dot"); any other value is reported once and skipped."""
    monkeypatch.setattr(tiles, "SHIPPED_DIR", tmp_path / "shipped")
    dev = FAKES[1]
    path = tiles.table_path("jax", dev, user=False)
    _write(path, {KEY: {"path": "fused", "tiles": dict(block_m=1, block_n=8, block_k=256), "plain_form": "dot"}},
           framework="jax")
    c = tiles.lookup("rmsnorm_qkv", "jax", dev, dtype="bfloat16", **SHAPE)
    assert (c.source, c.tiles, c.plain_form) == ("shipped", MatmulTiles(1, 8, 256), "dot")
    _write(path, {KEY: {"path": "fused", "tiles": dict(block_m=1, block_n=8, block_k=256)}}, framework="jax")
    assert tiles.lookup("rmsnorm_qkv", "jax", dev, dtype="bfloat16", **SHAPE).plain_form == "reduce"
    _write(path, {KEY: {"path": "fused", "tiles": None, "plain_form": "sideways"}}, framework="jax")
    with caplog.at_level(logging.WARNING, logger="common.tiles"):
        c = tiles.lookup("rmsnorm_qkv", "jax", dev, dtype="bfloat16", **SHAPE)
    assert (c.source, c.plain_form) == ("default", "reduce")
    assert [r.getMessage() for r in caplog.records if "plain_form='sideways'" in r.getMessage()]


def test_tile_dataclasses_check_their_fields():
    with pytest.raises(ValueError, match="power of two"):
        AttentionTiles(block_kv=48)
    with pytest.raises(ValueError, match=">= 16"):
        PrefillTiles(block_m=8)
    with pytest.raises(ValueError, match="positive integer"):
        MatmulTiles(1, 2, 0)


def test_split_k_is_torch_tensor_core_tiles_only(tmp_path, monkeypatch):
    """split_k fits torch_impl's tensor-core tiles (at most one part per chunk of K); jax_impl and
    the one-row GEMV take none; the tuner tries it where it fits; a table entry with it is read."""
    shape = dict(m=32, n=1024, k=2048)
    split = MatmulTiles(32, 64, 64, split_k=4)
    assert tile_rules.misfit("linear_residual", "torch", split, shape) is None
    assert "jax_impl" in tile_rules.misfit("linear_residual", "jax", split, shape)
    assert "tensor-core" in tile_rules.misfit("linear_residual", "torch", MatmulTiles(1, 4, 512, split_k=2),
                                              dict(shape, m=1))
    assert "one part per" in tile_rules.misfit("linear_residual", "torch", MatmulTiles(32, 64, 1024, split_k=4),
                                               shape)
    torch_pool = tile_rules.candidates("linear_residual", "torch", H100, shape)
    assert any(t.split_k > 1 for t in torch_pool)
    assert all(t.split_k * t.block_k <= shape["k"] for t in torch_pool)
    assert all(t.split_k == 1 for t in tile_rules.candidates("linear_residual", "jax", H100, shape))
    assert all(t.split_k == 1 for t in tile_rules.candidates("linear_residual", "torch", H100, dict(shape, m=1)))
    # the 128-token bucket also serves prefill: no split tiles there (the workspace grows with the tokens)
    assert all(t.split_k == 1 for t in tile_rules.candidates("linear_residual", "torch", H100, dict(shape, m=128)))
    assert "up to 64 tokens" in tile_rules.misfit("linear_residual", "torch", split, dict(shape, m=4096))
    for kernel, s in _shapes(PRESETS["Qwen3-8B"]):  # the default rule splits at 17-32 tokens only
        t = tile_rules.default_tiles(kernel, "torch", FAKES[1], "bfloat16", s)
        assert not isinstance(t, MatmulTiles) or t.split_k == 1 or 16 < s["m"] <= 32, (kernel, s, t)
    # every part sums some of K: K=128 in 4 chunks of 32 is 2 + 2 + 0 with split_k=3, in 8 of 16 3 + 3 + 2
    assert "empty" in tile_rules.misfit("linear_residual", "torch", MatmulTiles(16, 32, 32, split_k=3),
                                        dict(shape, k=128))
    assert tile_rules.misfit("linear_residual", "torch", MatmulTiles(16, 32, 16, split_k=3), dict(shape, k=128)) is None
    for kernel, s in _shapes(PRESETS["Qwen3-4B"]):  # K 2560: 20 chunks of 128 in 8 parts would leave one empty
        for t in tile_rules.candidates(kernel, "torch", H100, s):
            assert tile_rules.misfit(kernel, "torch", t, s) is None, (kernel, s, t)
    key = tiles.matmul_key("linear_residual", 32, 1024, 2048, "bfloat16")
    tiles.write_entry("torch", FAKES[1], key, "fused", split)
    tiles.clear_cache()
    assert tiles.lookup("linear_residual", "torch", FAKES[1], dtype="bfloat16", **shape).tiles == split


def test_long_prompts_have_their_own_prefill_buckets_and_candidates():
    """8k and 32k prompts are tuned apart (longer ones share the 32k entry); their candidates are
    the larger tiles, each within the device's shared memory, the default rule's first."""
    keys = [tiles.prefill_key(t, 128, "bfloat16") for t in (4096, 8192, 5000, 32768, 40960)]
    assert keys[1] == keys[2] != keys[0] and keys[3] == keys[4] != keys[1]
    small = Device("fake small", 46, 99 * 1024, (8, 6))
    for device in (H100, small):
        for t in (8192, 32768):
            shape = dict(max_seqlen_q=t, head_dim=128)
            pool = tile_rules.candidates("prefill_attention", "torch", device, shape)
            assert pool[0] == tile_rules.default_tiles("prefill_attention", "torch", device, "bfloat16", shape)
            assert all(tile_rules.prefill_smem(p, 128) <= device.smem_per_block for p in pool), (device, pool)
            assert all(min(p.block_m, p.block_n) >= 64 for p in pool[1:])
            if device is H100:
                assert any(p.block_m == 128 and p.num_warps == 8 and p.num_stages == 3 for p in pool), pool
