"""Where a torch_impl decode step spends its time on the GPU: tok/s and a per-kernel breakdown.

A random-weight model made on the GPU (bench/torch_kernels_probe.py's random_runner), a prompt of
`--prompt-len` tokens, `--steps` greedy tokens through torch_impl's Runner (CUDA-graph decode);
then one more generate() under torch.profiler: device time per decode step by kernel name, the
sum against the wall time per step (the difference is launch gaps).

    python bench/torch_decode_profile.py --presets Qwen3-0.6B,Qwen3-8B --fused auto,plain
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.torch_kernels_probe import random_runner  # noqa: E402

FUSED = {"plain": False, "auto": "auto", "on": True}


def profile_generate(runner, prompts, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.generate(prompts, steps + 1)
        torch.cuda.synchronize()
    time_us, count = collections.defaultdict(float), collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            time_us[ev.name[:60]] += ev.device_time
            count[ev.name[:60]] += 1
    per_step = {n: (t / steps, count[n] / steps) for n, t in time_us.items()}
    return dict(sorted(per_step.items(), key=lambda kv: -kv[1][0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="Qwen3-0.6B,Qwen3-8B")
    p.add_argument("--fused", default="auto")
    p.add_argument("--batch", default="1")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    for preset in a.presets.split(","):
        for fused in a.fused.split(","):
            runner = random_runner(preset, FUSED[fused])
            for b in map(int, a.batch.split(",")):
                prompts = torch.randint(0, 150000, (b, a.prompt_len)).tolist()
                best = 0.0
                for _ in range(3):  # the first run compiles and captures
                    runner.generate(prompts, a.steps + 1)
                    best = max(best, b * a.steps / runner.last_stats["decode_s"])
                row = dict(preset=preset, fused=fused, batch=b, tok_s=best, us_per_step=b / best * 1e6)
                prof = profile_generate(runner, prompts, a.steps)
                busy = sum(t for t, _ in prof.values())
                row.update(kernel_us_per_step=busy, launches_per_step=sum(c for _, c in prof.values()), kernels=prof)
                print(f"{preset:11} {fused:5} b{b:<4} {best:9.1f} tok/s  {row['us_per_step']:8.1f} us/step; "
                      f"kernel time {busy:.1f} us/step over {row['launches_per_step']:.0f} launches (incl. prefill)",
                      flush=True)
                for n, (t, c) in list(prof.items())[:a.top]:
                    print(f"      {t:8.2f} us {c:6.1f}x  {n}")
                rows.append(row)
            del runner
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
