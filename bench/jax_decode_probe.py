"""Quick end-to-end decode timing of jax_impl on the GPU (the full suite is `python -m bench`)."""

from __future__ import annotations

import argparse
import json
import time

from bench.checkpoints import random_checkpoint


def time_decode(runner, batch: int, prompt_len: int = 16, new_tokens: int = 256, repeats: int = 3) -> dict:
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)]
    runner.generate(prompts, new_tokens)  # compile + warm up
    best = None
    for _ in range(repeats):
        runner.generate(prompts, new_tokens)
        s = runner.last_stats
        tps = batch * (new_tokens - 1) / s["decode_s"]
        if best is None or tps > best["decode_tok_s"]:
            best = dict(batch=batch, decode_tok_s=tps, prefill_s=s["prefill_s"],
                        prefill_tok_s=batch * prompt_len / s["prefill_s"])
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="Qwen3-0.6B,Qwen3-8B")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--fused", default="off,on")
    p.add_argument("--json")
    a = p.parse_args(argv)
    import jax_impl

    rows = []
    for preset in a.models.split(","):
        path = random_checkpoint(preset)
        for fused in a.fused.split(","):
            t0 = time.perf_counter()
            try:
                runner = jax_impl.load(path, dtype="bfloat16", fused={"on": True, "off": False, "auto": "auto"}[fused])
            except Exception as e:  # report and go on with the other variants
                print(f"{preset} fused={fused}: load failed: {e!r}", flush=True)
                continue
            print(f"{preset} fused={fused}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            for b in [int(x) for x in a.batch.split(",")]:
                try:
                    r = time_decode(runner, b)
                except Exception as e:
                    print(f"  batch {b}: failed: {e!r}", flush=True)
                    continue
                r.update(model=preset, fused=fused)
                rows.append(r)
                print(f"  batch {b}: {r['decode_tok_s']:.1f} tok/s decode, prefill {r['prefill_s'] * 1e3:.1f} ms",
                      flush=True)
            del runner
    print("| model | fused | batch | decode tok/s | prefill ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fused']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['prefill_s'] * 1e3:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
