"""Where the time of one training step of a loss goes on a GPU: host (Python, dispatch, launches)
against device (kernels), from torch.profiler.

    python scripts/profile_gpu_step.py [--case moco|qk|mochi] [--backend triton] [--steps 5]

Prints the step's wall time, the summed kernel time, and the top operators by self CPU time and by
self CUDA time. A step whose wall time is far above its kernel time is bound by the host.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import contrastive_kernels as ck

CASES = {  # B, K, D, mixing
    "moco": (256, 65536, 128, None),
    "qk": (1024, 2**20, 128, None),
    "mochi": (256, 65536, 128, (1024, 512, 256)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="moco", choices=sorted(CASES))
    p.add_argument("--backend", default="triton")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="operators listed per table")
    args = p.parse_args()
    b, k, d, mix = CASES[args.case]
    dev, dt = "cuda", torch.bfloat16
    q = F.normalize(torch.randn(b, d, device=dev), dim=1).to(dt).requires_grad_()
    pos = F.normalize(torch.randn(b, d, device=dev), dim=1).to(dt)
    queue = F.normalize(torch.randn(k, d, device=dev), dim=1).to(dt)
    gen = torch.Generator(device=dev).manual_seed(0)
    mixing = ck.Mixing(*mix, generator=gen) if mix else None

    def step():
        loss = ck.info_nce(q, pos, queue, temperature=0.07, mixing=mixing, backend=args.backend)
        loss.backward()

    for _ in range(3):  # compile, autotune, tune the split counts
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"case {args.case} (B={b} K={k} D={d} bf16, mixing={mix}) backend {args.backend}: "
          f"wall {wall:.3f} ms/step, kernels {kernel_us / args.steps / 1e3:.3f} ms/step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
