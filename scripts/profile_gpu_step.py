"""Where the time of one training step of a loss goes: host (Python, dispatch, launches) against
device (kernels).

    python scripts/profile_gpu_step.py [--case moco|qk|mochi] [--backend triton] [--steps 20]
                                       [--graph] [--cprofile] [--no-launch] [--table]

Prints one line per measurement:

- ``wall``: the step's wall time (median over batches of ``--steps`` steps, then a synchronize);
  ``forward``: the same for the forward alone;
- ``kernels``: the summed kernel time per step and the number of kernels (torch.profiler);
- ``--graph``: the step captured once in a CUDA graph and replayed: its time is the kernels'
  with no host in the way (a step with a host synchronization cannot be captured: says so);
- ``--no-launch``: the wall time with every Triton launch skipped (the results are garbage, the
  host work is the same except for data-dependent paths such as MoCHi's fallback rows);
- ``--cprofile``: the host's Python profile of ``--steps`` steps, the top functions by own time;
- ``--table``: torch.profiler's operator tables (self CPU, self CUDA).

A step whose wall time is far above its kernel time is bound by the host. ``--device cpu --tiny``
runs the same code paths on the CPU at a small shape (CI's smoke test; Triton through its
interpreter).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

CASES = {  # B, K, D, mixing
    "moco": (256, 65536, 128, None),
    "qk": (1024, 2**20, 128, None),
    "mochi": (256, 65536, 128, (1024, 512, 256)),
}
TINY = {"moco": (32, 2048, 32, None), "qk": (64, 4096, 32, None), "mochi": (32, 2048, 32, (64, 16, 8))}


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _wall_ms(fn, steps: int, dev: str, batches: int = 5) -> float:
    """Median over ``batches`` of the mean wall time of ``steps`` calls (one synchronize each)."""
    times = []
    for _ in range(batches):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def no_triton_launches():
    """Skip every Triton kernel launch (compiled or interpreted); everything else runs (MoCHi's
    rows all count as certified: see ``rows_exact``)."""
    from triton.runtime import autotuner, jit

    patched = [(jit.JITFunction, "run"), (autotuner.Autotuner, "run")]
    try:
        from triton.runtime import interpreter
        patched.append((interpreter.InterpretedFunction, "run"))
    except ImportError:  # pragma: no cover
        pass
    old = [(cls, name, getattr(cls, name)) for cls, name in patched]
    for cls, name in patched:
        setattr(cls, name, lambda self, *a, **k: None)
    from contrastive_kernels import _loss_topk
    real = _loss_topk.lse_stats_topk

    def rows_exact(backend, reason, q, k, gammas, n_hard, flags, fused, *rest, **kwargs):
        # the skipped kernels leave MoCHi's inexact-row flags unwritten: without this the garbage
        # would send random rows to the fallback top-k, host work a real step does not do (one
        # zero fill instead)
        def fused_exact(t, cap):
            row_lse, hard, inexact = fused(t, cap)
            return row_lse, hard, inexact.zero_()
        return real(backend, reason, q, k, gammas, n_hard, flags, fused_exact, *rest, **kwargs)

    _loss_topk.lse_stats_topk = rows_exact
    try:
        yield
    finally:
        for cls, name, fn in old:
            setattr(cls, name, fn)
        _loss_topk.lse_stats_topk = real


def graph_replay_ms(step, steps: int, dev: str) -> str:
    """Capture ``step`` in a CUDA graph and time its replay, or say why it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture wants
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - any capture failure is the answer
        torch.cuda.synchronize()
        return f"not capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return f"{_wall_ms(graph.replay, steps, dev):.3f} ms/step"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="moco", choices=sorted(CASES))
    p.add_argument("--backend", default="triton")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--tiny", action="store_true", help="a small shape (smoke test)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--graph", action="store_true", help="time the step replayed from a CUDA graph")
    p.add_argument("--no-launch", action="store_true", help="time the step with Triton launches skipped")
    p.add_argument("--cprofile", action="store_true", help="the host's Python profile")
    p.add_argument("--table", action="store_true", help="torch.profiler's operator tables")
    p.add_argument("--rows", type=int, default=25, help="rows per table / profile")
    args = p.parse_args(argv)
    if args.device == "cpu" and "triton" in args.backend:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import contrastive_kernels as ck

    b, k, d, mix = (TINY if args.tiny else CASES)[args.case]
    dev = args.device
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=dev, dtype=dt)  # noqa: E731
    q, pos, queue = unit(b).requires_grad_(), unit(b), unit(k)
    mixing = ck.Mixing(*mix, generator=torch.Generator(device=dev).manual_seed(0)) if mix else None

    def forward():
        return ck.info_nce(q, pos, queue, temperature=0.07, mixing=mixing, backend=args.backend)

    def step():
        q.grad = None
        forward().backward()

    for _ in range(3):  # compile, autotune, tune the split counts
        step()
    _sync(dev)
    head = (f"case {args.case} (B={b} K={k} D={d} {args.dtype}, mixing={mix}) backend {args.backend} "
            f"on {dev}")
    print(f"{head}: wall {_wall_ms(step, args.steps, dev):.3f} ms/step, "
          f"forward {_wall_ms(forward, args.steps, dev):.3f} ms")
    if dev.startswith("cuda"):
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.device_time for e in kernels)
        print(f"kernels: {total_us / args.steps / 1e3:.3f} ms/step in {len(kernels) / args.steps:.1f} "
              f"kernels/step")
        if args.table:
            events = prof.key_averages()
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    if args.no_launch:
        with no_triton_launches():
            print(f"no Triton launches: wall {_wall_ms(step, args.steps, dev):.3f} ms/step")
    if args.cprofile:
        # on the CPU the interpreter would swamp the profile: launches skipped there
        quiet = no_triton_launches() if dev == "cpu" else contextlib.nullcontext()
        prof = cProfile.Profile()
        with quiet:
            prof.enable()
            for _ in range(args.steps):
                step()
            _sync(dev)
            prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(args.rows)
        print(f"host profile of {args.steps} steps (own time):")
        print(out.getvalue())
    if args.graph:  # last: a capture that fails on a synchronization may leave CUDA unusable
        replay = graph_replay_ms(step, args.steps, dev) if dev.startswith("cuda") else "needs a CUDA device"
        print(f"graph replay: {replay}")


if __name__ == "__main__":
    main(sys.argv[1:])
