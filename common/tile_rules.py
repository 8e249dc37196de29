"""The default rule: tiles and the fused-or-plain choice for a device no table covers.

Its inputs are the kernel, the framework, the shape and the device's properties (SM count,
shared memory per block, compute capability), never the name of one GPU. The rules were measured
on an H100 (docs/MEASUREMENTS.md has each figure) and are written in terms of what they do:
- one-token projections (the decode GEMV) stream the weight once; they want many programs, each a
  few output rows wide, and long reduction chunks (one rule for both twins; torch_impl's kernels on
  one-byte weights take other widths at K >= 4096, `_torch_gemv_one_byte`);
- tensor-core tiles (16+ tokens) keep block_m x block_k + block_n x block_k per stage in shared
  memory: the stage count is cut until they fit the device's shared memory;
- decode attention splits the context (flash-decoding) until the (sequence, kv head) programs
  cover the device's SMs, as long as each split keeps >= 256 positions of the capacity;
- torch_impl's projections at 17-32 tokens split the reduction (split_k) until the programs are
  twice the SMs, as long as each part keeps >= 512 of K (`_torch_split`).
`misfit` says why a tile does not fit a shape (tables are checked with it). `default_plain_form`
says how jax_impl's plain path writes a one-token projection: multiply-and-reduce on CUDA GPUs,
the dot elsewhere. `CAPABILITY` is the one table of compute capability gates (the kernels run,
PDL), read with `capable`; `format_min_capability` says what a weight format needs (its registry entry).
"""

from __future__ import annotations

import dataclasses

from common import formats
from common.ops import PROJECTIONS
from common.tile_types import AttentionTiles, Device, LayerTiles, MatmulTiles, PrefillTiles, next_pow2

DOT_MIN_M = 16  # token rows from which projections use tensor-core dots
MIN_SPLIT_POSITIONS = 256  # decode attention: fewest cache positions per split
MAX_SPLIT_K = 16  # torch_impl projections: most programs sharing one output tile's reduction
SPLIT_MAX_M = 32  # the default rule splits K at 17-32 tokens (measured there; not above)
MAX_SPLIT_TOKENS = 64  # split_k tiles fit up to 64 tokens: the workspace grows with the tokens (prefill)
MIN_SPLIT_K = 512  # the default rule: fewest K elements per part
LONG_PROMPT = 1024  # prefill attention: prompts from this many tokens tune among larger tiles only
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----- fused or plain -----------------------------------------------------------------------------

# Compute capability gates: the least (major, minor) of a CUDA GPU on which each thing runs.
CAPABILITY = {
    "kernels": (8, 0),  # both twins' kernels (bfloat16 tensor cores): below it, plain ops only
    "pdl": (9, 0),  # programmatic dependent launch (torch_impl's launchers)
}  # a weight format's own gate is its registry entry's min_capability (common.formats)


def capable(gate: str | tuple[int, int], capability: tuple[int, int] | None) -> bool:
    """Whether a device of `capability` (None: not a CUDA GPU) passes `gate` (a CAPABILITY name or a
    (major, minor))."""
    need = CAPABILITY[gate] if isinstance(gate, str) else gate
    return capability is not None and tuple(capability) >= tuple(need)


def format_min_capability(fmt: str | None) -> tuple[int, int] | None:
    """The least compute capability whose kernels run weights of format `fmt` beyond the kernels' own
    gate (CAPABILITY["kernels"]): the registry entry's min_capability, None where that gate suffices."""
    return formats.get(fmt).min_capability


def dotted(capability: tuple[int, int]) -> str:
    """A compute capability as messages write it: "8.9"."""
    return f"{capability[0]}.{capability[1]}"


def default_path(kernel: str, framework: str, device: Device, shape: dict, dtype: str = "bfloat16") -> str:
    """torch_impl: every kernel, everywhere its kernels run. jax_impl: attention always; the
    projections at one token per step, rmsnorm_qkv also up to 16 tokens below hidden 4096; plain
    XLA beyond (XLA's matmuls measured faster there: 8B mlp at 8 tokens 320 vs 114 us); the final
    norm in XLA, which fuses it into the head's product. Weights of a format whose kernels need a newer
    GPU (dtype "<activations>-<format>", the entry's min_capability: fp8 below 8.9): plain (the
    framework dequantizes; the kernels cannot convert the values). The one-launch decoder layer
    (decode_layer): "plain", the ops one by one, until it measures faster on a GPU - a tile table
    entry with path "fused" turns it on for its shape."""
    if kernel == "decode_layer":
        return "plain"
    need = formats.of_tile_dtype(dtype).min_capability
    if need is not None and device.is_gpu and not capable(need, device.capability):
        return "plain"
    if framework == "torch":
        return "fused"
    if kernel in ("decode_attention", "prefill_attention"):
        return "fused"
    if kernel == "rms_norm":
        return "plain"
    m = shape["m"]
    if m == 1:
        return "fused"
    return "fused" if kernel == "rmsnorm_qkv" and m <= DOT_MIN_M and shape["k"] < 4096 else "plain"


def default_plain_form(kernel: str, framework: str, device: Device, shape: dict) -> str:
    """How jax_impl's plain path writes a projection at one token per step: "reduce" (multiply and
    sum over K) on CUDA GPUs, where XLA's row reduction streams the weight faster than its GEMV and
    takes the producing RMSNorm into the same kernel; "dot" (XLA's product) elsewhere - on a CPU
    backend the reduction runs as a loop far slower than the dot's GEMV (docs/MEASUREMENTS.md has
    both). Every other shape, kernel and framework: "dot"."""
    if framework == "jax" and kernel in PROJECTIONS and shape.get("m") == 1 and device.is_gpu:
        return "reduce"
    return "dot"


# ----- tiles --------------------------------------------------------------------------------------

def _layer(device: Device, shape: dict) -> LayerTiles:
    """The one-launch layer: attention split until its tasks fill about half the SMs (the largest
    power of two of splits, at most 16 - decode_attention's most); one split off the GPU."""
    fill = device.sm_count // (2 * shape["kv_heads"]) if device.is_gpu else 1
    return LayerTiles(num_splits=min(16, 1 << (max(1, fill).bit_length() - 1)))


def default_tiles(kernel: str, framework: str, device: Device, dtype: str, shape: dict):
    if kernel == "decode_layer":
        return _layer(device, shape)
    if kernel == "decode_attention":
        return _attention(framework, device, shape)
    if kernel == "prefill_attention":
        block_m = min(64, max(16, next_pow2(shape["max_seqlen_q"])))
        return PrefillTiles(block_m=block_m, block_n=64 if shape["head_dim"] <= 128 else 32)
    m, n, k = shape["m"], shape["n"], shape["k"]
    if framework == "jax":
        if kernel == "rmsnorm_qkv":
            tiles = _jax_qkv(m, n, k, shape.get("head_dim", n), device)
        else:
            tiles = _jax_matmul(m, n, k, device, pair=kernel == "mlp_gate_up")
    elif m == 1:  # the decode GEMV streams W the same way in both twins (tuned torch tables agree)
        tiles = (_torch_gemv_one_byte(kernel, n, k) if formats.of_tile_dtype(dtype).storage_bytes == 1 else None) or \
            _jax_matmul(m, n, k, device, pair=kernel == "mlp_gate_up")
    elif DOT_MIN_M < m <= SPLIT_MAX_M:
        tiles = _torch_split(kernel, n, k, device)
    else:
        tiles = _torch_matmul(m, n, k)
    return fit_stages(tiles, device, BYTES.get(dtype, 2))


def fit_stages(tiles: MatmulTiles, device: Device, nbytes: int) -> MatmulTiles:
    """Fewer pipeline stages until a tensor-core tile's operands fit the device's shared memory."""
    if tiles.block_m < DOT_MIN_M:
        return tiles
    per_stage = (tiles.block_m + tiles.block_n) * tiles.block_k * nbytes
    stages = tiles.num_stages
    while stages > 1 and stages * per_stage > device.smem_per_block:
        stages -= 1
    return tiles if stages == tiles.num_stages else dataclasses.replace(tiles, num_stages=stages)


def _attention(framework: str, device: Device, shape: dict) -> AttentionTiles:
    programs = shape["batch"] * shape["num_kv_heads"]
    splits = 1
    while programs * splits < device.sm_count and shape["max_context"] // (splits * 2) >= MIN_SPLIT_POSITIONS:
        splits *= 2
    if framework == "jax":  # 64 keys x 3 stages: 0.6B batch 1, 120.5 vs 130.1 us per step with 128 x 2
        return AttentionTiles(block_kv=64, num_splits=splits, num_stages=3)
    return AttentionTiles(block_kv=128, num_splits=splits)


def _torch_matmul(m: int, n: int, k: int) -> MatmulTiles:
    if m <= DOT_MIN_M:  # stream W; small N tiles give enough programs to fill the GPU
        return MatmulTiles(block_m=max(1, next_pow2(m)), block_n=16 if n <= 8192 else 32,
                           block_k=min(512, next_pow2(k)), num_warps=4, num_stages=2)
    return MatmulTiles(block_m=min(64, next_pow2(m)), block_n=64, block_k=min(64, next_pow2(k)),
                       num_warps=4, num_stages=3)


def _torch_split(kernel: str, n: int, k: int, device: Device) -> MatmulTiles:
    """torch_impl's tensor-core tiles at 17-32 tokens: 32 rows x 128-element chunks x 3 stages;
    block_n 16 for linear_residual (one W row per output column), 32 for rmsnorm_qkv and the
    gate/up pair (each program takes 2 x block_n rows: both rotary halves, gate and up); then
    the reduction in 2, 4, 8 parts until the programs are at least twice the SMs, each part
    keeping >= 512 of K. On an H100 (132 SMs) this gives the tuned 32-token tiles of Qwen3-0.6B
    (o_proj and down: 16 columns in 4 parts, 5.90 / 6.88 us against 12.54 / 18.87 with 64 x 64 x
    64 unsplit; qkv and gate/up: 32 in 2 parts) and Qwen3-8B's gate/up (unsplit); at 8B's qkv
    and down it gives the tuned program counts (384, 512) with other widths."""
    pair = kernel != "linear_residual"
    block_n = 32 if pair else 16
    programs = -(-n // (2 * block_n if pair else block_n))
    split = 1
    while split < 8 and programs * split < 2 * device.sm_count and k // (2 * split) >= MIN_SPLIT_K:
        split *= 2
    return MatmulTiles(32, block_n, 128, num_warps=4, num_stages=3, split_k=split)


def _torch_gemv_one_byte(kernel: str, n: int, k: int) -> MatmulTiles | None:
    """torch_impl's decode GEMV on int8 / fp8 weights at K >= 4096: o_proj and down (N <= K) 8 rows
    x 1024-element chunks, rmsnorm_qkv and the gate/up pair one row (pair) over the whole row, 4
    warps - the H100's tuned int8 and fp8 rows at Qwen3-8B's shapes (Qwen3-8B batch-1 int8 decode
    272 tok/s with them, 212 with the bf16 rule). None (the bf16 rule) below K 4096 and for the
    lm_head (N > K): not measured."""
    if k < 4096:
        return None
    if kernel == "linear_residual" and n <= k:
        return MatmulTiles(1, 8, 1024, num_warps=4, num_stages=2)
    if kernel in ("rmsnorm_qkv", "mlp_gate_up"):
        return MatmulTiles(1, 1, _chunk(k, 4096), num_warps=4, num_stages=2)
    return None


def _chunk(k: int, cap: int) -> int:
    """block_k: the largest power of two in [cap / 2, cap] dividing k (no masked tail), else
    min(cap, next_pow2(k)) (masked lanes of the last chunk cost no memory traffic)."""
    for b in (cap, cap // 2):
        if k % b == 0:
            return b
    return min(cap, next_pow2(k))


def _jax_matmul(m: int, n: int, k: int, device: Device, *, pair: bool = False) -> MatmulTiles:
    """jax_impl's projections (o_proj, down, gate/up with `pair`).

    m == 1 (multiply and reduce): more outputs than inputs and K below 4096 (qkv, gate/up at 0.6B
    sizes): 2 output rows per program, 2048-element chunks, 8 warps for the gate/up pair; N <= K:
    4 rows and the whole row in 4096-element chunks with 8 warps (o_proj 3.4 vs 4.0 us); K a
    multiple of 4096: 4 rows x 4096 with 8 warps (8B: gate/up 97%, down 92% of the copy
    bandwidth); else 4 rows x 2048. 1 < m < 16: a row at a time, 4 rows x 1024-2048.
    m == 16: 32 rows x 512 x 3 stages (the pair: 256 x 2). Larger m: 64 x 64 x 64 tiles.
    """
    outputs = n // 2 if pair else n  # the pair's n counts gate and up rows; a program takes both
    if m == 1:
        if k < 4096 and outputs > k:
            return MatmulTiles(1, 2, min(2048, next_pow2(k)), num_warps=8 if pair else 4, num_stages=2)
        if k < 4096 or k % 4096 == 0:
            return MatmulTiles(1, 4, 4096, num_warps=8, num_stages=2)
        return MatmulTiles(1, 4, _chunk(k, 2048), num_warps=4, num_stages=2)
    if m < DOT_MIN_M:
        return MatmulTiles(next_pow2(m), 4, _chunk(k, 2048 if k >= 4096 else 1024), num_warps=4, num_stages=2)
    if m == DOT_MIN_M:
        return MatmulTiles(16, 32, 256, num_stages=2) if pair else MatmulTiles(16, 32, 512, num_stages=3)
    return _torch_matmul(m, n, k)


def _jax_qkv(m: int, n: int, k: int, head_dim: int, device: Device) -> MatmulTiles:
    """Decode: the split variant (block_n < head_dim), since one program per head leaves most of
    the GPU idle (8B batch 1: 22-25 us split, 65 fused); m <= 16: the projection tiles (16 tokens:
    the gate/up pair's); 16 < m < 64: 64 x 64 x 64 (split); prefill: one head per program."""
    if m <= DOT_MIN_M:
        return _jax_matmul(m, n, k, device, pair=m > 1)
    if m < 4 * DOT_MIN_M:
        return _torch_matmul(m, n, k)
    return dataclasses.replace(_torch_matmul(m, n, k), block_n=head_dim, block_k=64)


# ----- checks of tiles against a shape ---------------------------------------------------------------

def misfit(kernel: str, framework: str, tiles, shape: dict) -> str | None:
    """Why `tiles` cannot run `kernel` at `shape` (a table entry meant for another shape), or None."""
    if kernel == "decode_attention":
        if tiles.block_kv < 16:
            return f"block_kv={tiles.block_kv}: expected >= 16 (a tensor-core tile)"
        if tiles.num_splits > 64:
            return f"num_splits={tiles.num_splits}: expected <= 64"
        return None
    if kernel in ("prefill_attention", "decode_layer"):  # (LayerTiles checks its own block_kv)
        return None
    if kernel == "rms_norm":
        return None
    if kernel == "rmsnorm_qkv" and framework == "jax" and tiles.block_n > shape["head_dim"]:
        return f"block_n={tiles.block_n}: expected at most head_dim={shape['head_dim']}"
    if framework == "torch" and tiles.block_m > 1 and tiles.block_n < 16:
        return f"block_n={tiles.block_n}: the tensor-core path (block_m={tiles.block_m} > 1) needs >= 16"
    if tiles.split_k > 1:
        if framework == "jax":
            return f"split_k={tiles.split_k}: jax_impl's projections sum each tile in one program (split_k 1)"
        if tiles.block_m == 1:
            return f"split_k={tiles.split_k}: only the tensor-core path (block_m > 1) splits the reduction"
        if shape["m"] > MAX_SPLIT_TOKENS:
            return (f"split_k={tiles.split_k}: split tiles fit up to {MAX_SPLIT_TOKENS} tokens, not {shape['m']} "
                    f"(their float32 workspace grows with the tokens)")
        if tiles.split_k > MAX_SPLIT_K or tiles.split_k * tiles.block_k > max(shape["k"], tiles.block_k):
            return (f"split_k={tiles.split_k}: expected at most {MAX_SPLIT_K} and at most one part per "
                    f"block_k={tiles.block_k} chunk of k={shape['k']}")
        chunks = -(-shape["k"] // tiles.block_k)  # torch_impl's split_range: ceil(chunks / split_k) a part
        run = -(-chunks // tiles.split_k)
        if (tiles.split_k - 1) * run >= chunks:
            return (f"split_k={tiles.split_k}: {chunks} chunks of block_k={tiles.block_k} over k={shape['k']}, "
                    f"{run} a part, leave the last part(s) empty (a program with no work)")
    if tiles.block_m > 1 and tiles.block_m < next_pow2(min(shape["m"], DOT_MIN_M)) and framework == "jax":
        return f"block_m={tiles.block_m}: fewer rows than the {shape['m']} tokens of this bucket"
    return None


# ----- candidates the tuners time ----------------------------------------------------------------------

def candidates(kernel: str, framework: str, device: Device, shape: dict, *, smoke: bool = False) -> list:
    """The tiles a tuner times for `kernel` at `shape` (the default rule's first), each fitting the
    shape (`misfit`) and the device's shared memory; `smoke`: two, for the CPU interpreters - the
    default and the one of fewest interpreted steps (`_steps`: the interpreters run programs one by one)."""
    if kernel == "rms_norm":
        return [None]
    default = default_tiles(kernel, framework, device, "bfloat16", shape)
    if kernel == "decode_attention":
        cap = shape["max_context"]
        pool = [AttentionTiles(block_kv=kv, num_splits=s, num_stages=st) for kv in (32, 64, 128)
                for s in (1, 2, 4, 8, 16) if s == 1 or cap // s >= MIN_SPLIT_POSITIONS for st in (2, 3)]
    elif kernel == "prefill_attention":
        pool = _prefill_pool(device, shape)
    else:
        pool = _matmul_pool(kernel, framework, shape)
    out = [default]
    for t in pool:
        if t not in out and misfit(kernel, framework, t, shape) is None:
            t = fit_stages(t, device, 2) if isinstance(t, MatmulTiles) else t
            if t not in out:
                out.append(t)
    return out[:1] + sorted(out[1:], key=lambda t: _steps(t, shape))[:1] if smoke else out


def prefill_smem(tiles: PrefillTiles, head_dim: int, nbytes: int = 2) -> int:
    """Shared memory a prefill attention tile stages: the query block once, a K and a V block per stage."""
    return nbytes * max(16, next_pow2(head_dim)) * (tiles.block_m + 2 * tiles.block_n * tiles.num_stages)


def _prefill_pool(device: Device, shape: dict) -> list[PrefillTiles]:
    """Prefill attention's candidates: query blocks of 32-128 rows, key blocks of 32-128, 4 or 8 warps,
    2 or 3 stages, within the device's shared memory; from LONG_PROMPT tokens (8k-32k prompts, where
    attention is most of the prefill) blocks of 64 and 128 only: fewer candidates per long compile."""
    sizes = (64, 128) if shape["max_seqlen_q"] >= LONG_PROMPT else (32, 64, 128)
    pool = [PrefillTiles(block_m=bm, block_n=bn, num_warps=w, num_stages=st) for bm in sizes for bn in sizes
            for w in (4, 8) for st in (2, 3)]
    return [t for t in pool if not device.is_gpu or prefill_smem(t, shape["head_dim"]) <= device.smem_per_block]


def _steps(tiles, shape: dict) -> int:
    """Programs times loop steps of `tiles` at `shape`: what a run in an interpreter costs."""
    if isinstance(tiles, MatmulTiles):
        return (-(-shape["m"] // tiles.block_m) * -(-shape["n"] // tiles.block_n) * tiles.split_k *
                -(-shape["k"] // (tiles.block_k * tiles.split_k)))
    if isinstance(tiles, AttentionTiles):
        return shape["batch"] * tiles.num_splits * -(-shape["max_context"] // (tiles.block_kv * tiles.num_splits))
    if isinstance(tiles, PrefillTiles):
        return -(-shape["max_seqlen_q"] // tiles.block_m) * -(-shape["max_seqlen_q"] // tiles.block_n)
    return 1


def _matmul_pool(kernel: str, framework: str, shape: dict) -> list[MatmulTiles]:
    m, k = shape["m"], shape["k"]
    kmax = max(512, next_pow2(k))
    if m == 1:  # the decode GEMV: rows per program, chunk length, warps (short chunks of many rows: one
        #         load of the activation chunk serves more weight bytes, which one-byte weights need)
        return [MatmulTiles(1, bn, bk, num_warps=w) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096)
                if bk <= kmax for w in (4, 8)]
    if m <= DOT_MIN_M:
        bm = next_pow2(m) if framework == "jax" else 16
        return [MatmulTiles(bm, bn, bk, num_warps=w, num_stages=st) for bn in (16, 32, 64) for bk in (128, 256, 512)
                for w in (4, 8) for st in (2, 3) if not (framework == "jax" and bm < DOT_MIN_M and bn > 16)] + \
            _split_pool(framework, shape, [16])
    bm = min(64, next_pow2(m))
    # narrow row blocks too: at 32 tokens Qwen3-0.6B's gate/up with 64-row blocks is 48 programs, and
    # took 33.7 us on an H200 for 12.6 MB; longer chunks too (fewer steps over a short K: at 8 tokens
    # the H100's best tiles took 128-256)
    pool = [MatmulTiles(b, bn, bk, num_warps=w, num_stages=st) for b in sorted({min(32, bm), bm})
            for bn in (16, 32, 64, 128) for bk, stages in ((64, (2, 3)), (128, (3,)), (256, (3,)))
            for w in (4, 8) for st in stages]
    return pool + _split_pool(framework, shape, [min(32, bm)])


def _split_pool(framework: str, shape: dict, row_blocks) -> list[MatmulTiles]:
    """torch_impl's tensor-core tiles with the reduction split over 2-8 programs (split_k): more
    programs stream W where the output tiles alone are fewer than the SMs (Qwen3-0.6B's o_proj at
    32 tokens: 1,024 outputs are 16-64 tiles)."""
    if framework != "torch" or shape["m"] > MAX_SPLIT_TOKENS:
        return []
    return [MatmulTiles(b, bn, bk, num_warps=4, num_stages=3, split_k=sk) for b in row_blocks
            for bn in (16, 32, 64) for bk in (64, 128) for sk in (2, 4, 8) if sk * bk <= shape["k"]]
