"""Does XLA's batch-1 GEMV care whether W is [out, in] or [in, out]? Times chains of per-layer matmuls."""

import time

import jax
import jax.numpy as jnp


def chain_time(ws, x, transposed, iters=20):
    def step(x, ws):
        for w in ws:
            if transposed:  # w [in, out]
                y = jnp.dot(x, w, preferred_element_type=jnp.float32)
            else:  # w [out, in]
                y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            x = (y[:, : x.shape[1]] * 1e-3).astype(x.dtype) + x if y.shape[1] >= x.shape[1] else x + jnp.pad(y, ((0, 0), (0, x.shape[1] - y.shape[1]))).astype(x.dtype) * 1e-3
        return x

    @jax.jit
    def run(x, ws):
        return jax.lax.fori_loop(0, iters, lambda i, x: step(x, ws), x)

    run(x, ws).block_until_ready()
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        run(x, ws).block_until_ready()
        best = min(best, (time.perf_counter() - t) / iters / len(ws))
    return best


def main():
    key = jax.random.key(0)
    src = jnp.ones((1 << 20,), jnp.bfloat16)
    n = 2_000_000_000 // 2
    a = jax.random.normal(key, (n,), jnp.bfloat16)
    cp = jax.jit(lambda a: a * 1)
    cp(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        r = cp(a)
    r.block_until_ready()
    bw = 2 * a.nbytes * 10 / (time.perf_counter() - t)
    del a, r
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for name, k, n_out, layers in [("qkv", 4096, 6144, 36), ("o", 4096, 4096, 36), ("gate_up", 4096, 24576, 36),
                                   ("down", 12288, 4096, 36), ("0.6B qkv", 1024, 4096, 28), ("0.6B gate_up", 1024, 6144, 28)]:
        for batch in (1, 16):
            x = jnp.ones((batch, k), jnp.bfloat16) * 0.01
            for transposed in (False, True):
                shape = (k, n_out) if transposed else (n_out, k)
                ws = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02 for i in range(layers)]
                t = chain_time(ws, x, transposed)
                gbs = k * n_out * 2 / t / 1e9
                print(f"{name:14s} b={batch:2d} {'[in,out]' if transposed else '[out,in]'}: {t * 1e6:7.1f} us  {gbs:7.0f} GB/s  ({gbs / bw * 1e9 * 100:.0f}% of copy)", flush=True)
                del ws


if __name__ == "__main__":
    main()
