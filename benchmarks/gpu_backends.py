"""Quick GPU comparison of the backends on the headline shapes (a subset of `python -m
contrastive_kernels.bench --preset gpu`, fast enough for a short GPU session):

    python benchmarks/gpu_backends.py [--backends cuda,triton,chunked,reference] [--ops topk,bank,clip,ntx] [--quick]

Times are medians of CUDA-event-timed repeats after warm-up (forward + backward for losses).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels.bench.measure import measure_cuda


def timed(fn, reps=10):
    """Median milliseconds of ``fn`` (CUDA-timed, after a warm-up), as the bench harness times."""
    return measure_cuda(fn, reps)["median_ms"]


def unit(n, d, dtype, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)
    return x.requires_grad_(grad)


def cases(quick):
    bf = torch.bfloat16
    out = []
    for k in ((16, 256, 1024) if quick else (16, 128, 256, 1024)):
        out.append((f"topk M=8192 N=2^20 D=128 k={k} bf16", "topk", dict(M=8192, N=2**20, D=128, k=k, dtype=bf)))
    out.append(("topk M=1024 N=2^20 D=128 k=64 fp32", "topk", dict(M=1024, N=2**20, D=128, k=64, dtype=torch.float32)))
    out.append(("info_nce bank B=1024 K=2^20 D=128 bf16", "bank", dict(B=1024, K=2**20, D=128, dtype=bf)))
    out.append(("info_nce bank B=256 K=65536 D=128 bf16", "bank", dict(B=256, K=65536, D=128, dtype=bf)))
    out.append(("clip N=16384 D=256 bf16", "clip", dict(N=16384, D=256, dtype=bf)))
    if not quick:
        out.append(("clip N=16384 D=512 bf16", "clip", dict(N=16384, D=512, dtype=bf)))
        out.append(("nt_xent B=4096 D=128 bf16", "ntx", dict(B=4096, D=128, dtype=bf)))
    return out


def build(kind, shape, backend):
    s = dict(shape)
    dt = s.pop("dtype")
    if kind == "topk":
        q, bank = unit(s["M"], s["D"], dt), unit(s["N"], s["D"], dt, seed=1)
        return lambda: ck.topk_similarity(q, bank, s["k"], backend=backend)
    if kind == "bank":
        q, k, queue = unit(s["B"], s["D"], dt, True), unit(s["B"], s["D"], dt, seed=1), unit(s["K"], s["D"], dt, seed=2)

        def step():
            q.grad = None
            ck.info_nce(q, k, queue, temperature=0.07, backend=backend).backward()
        return step
    if kind == "clip":
        x, y = unit(s["N"], s["D"], dt, True), unit(s["N"], s["D"], dt, True, seed=1)
        scale = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)

        def step():
            x.grad = y.grad = scale.grad = None
            ck.clip_loss(x, y, scale, backend=backend).backward()
        return step
    if kind == "ntx":
        x, y = unit(s["B"], s["D"], dt, True), unit(s["B"], s["D"], dt, True, seed=1)

        def step():
            x.grad = y.grad = None
            ck.nt_xent(x, y, temperature=0.1, backend=backend).backward()
        return step
    raise ValueError(kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cuda,triton,chunked")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ops", default=None, help="case kinds to run (topk, bank, clip, ntx); default all")
    args = ap.parse_args()
    ops = None if args.ops is None else set(args.ops.split(","))
    avail = ck.available_backends("cuda")
    backends = [b for b in args.backends.split(",") if b == "reference" or avail.get(b) is None]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; backends {backends}")
    for b in args.backends.split(","):
        if b not in backends:
            print(f"  {b}: unavailable ({avail.get(b)})")
    print(f"| case | {' | '.join(backends)} |")
    print("|---|" + "---|" * len(backends))
    for label, kind, shape in cases(args.quick):
        if ops is not None and kind not in ops:
            continue
        row = []
        for b in backends:
            try:
                ms = timed(build(kind, shape, b), reps=5 if args.quick else 10)
                row.append(f"{ms:.2f} ms")
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row.append(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
            torch.cuda.empty_cache()
        print(f"| {label} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()
