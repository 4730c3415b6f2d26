"""Timing and peak-memory measurement.

CPU: each (case, backend) runs in fresh subprocesses, one for memory and one for time (see
``measure_isolated``). The inputs are built first; then the process's peak-RSS mark is reset (``/proc/self/clear_refs``) and the extra peak memory of the
step is VmHWM after it minus VmRSS before it (what ``ru_maxrss`` reports, without the inputs or
the interpreter). Times are wall-clock medians of repeated steps after one warm-up.
GPU: ``triton.testing.do_bench`` (median, min, max) and ``torch.cuda.max_memory_allocated``
above what the inputs hold.
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict

import torch

from .cases import DTYPES, Case, build_step


def proc_status() -> Dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_in_process(c: Case, backend: str, device: str, repeats: int = 5,
                       max_seconds: float = 60.0) -> Dict:
    """Time and memory of one (case, backend) in this process (see the module docstring)."""
    if not device.startswith("cuda"):
        # initialize the libraries (thread pools, BLAS buffers) on a tiny copy of the case first,
        # so that the measured peak is the step's own
        tiny = Case(c.op, tuple((k, min(v, 8 if k == "k" else 64)) for k, v in c.shape), c.dtype, c.label)
        build_step(tiny, backend, device)[0]()
    step, _ = build_step(c, backend, device)
    if device.startswith("cuda"):
        return measure_cuda(step, repeats)
    gc.collect()
    exact = reset_peak_rss()
    before = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    step()  # warm-up; also the memory measurement
    first = time.perf_counter() - t0
    peak_extra = proc_status()["VmHWM"] - before
    times = [] if repeats > 0 else [first]  # repeats=0: memory only, the one step timed
    budget_end = time.perf_counter() + max_seconds
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > budget_end:
            break
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "first_ms": 1e3 * first, "runs": len(times),
            "peak_extra_bytes": peak_extra, "memory_exact": exact}


def measure_cuda(step, repeats):
    torch.cuda.synchronize()
    step()  # warm-up (compiles Triton kernels, autotunes)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before
    try:
        from triton.testing import do_bench

        med, lo, hi = do_bench(step, warmup=max(25, repeats), rep=max(100, 20 * repeats),
                               quantiles=[0.5, 0.0, 1.0])
    except ImportError:
        times = []
        for _ in range(max(3, repeats)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        med, lo, hi = statistics.median(times), min(times), max(times)
    return {"median_ms": med, "min_ms": lo, "max_ms": hi, "peak_extra_bytes": peak_extra,
            "memory_exact": True}


def _run_worker(payload: Dict, env: Dict[str, str], timeout: float) -> Dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "contrastive_kernels.bench.worker",
                               json.dumps(payload)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def measure_isolated(c: Case, backend: str, device: str, repeats: int, timeout: float) -> Dict:
    """``measure_in_process`` in fresh Python processes (CPU memory needs one per measurement).

    On the CPU, memory and time come from two processes: the memory one with glibc's mmap
    threshold fixed low, so that every large block comes straight from mmap and goes back (the
    peak is the step's own, not the heap's growth), and the timing one with the default allocator,
    as a user runs it (with the fixed threshold every large temporary is page-faulted in afresh,
    which slows the chunked loops by a third)."""
    payload = {"op": c.op, "shape": c.shape, "dtype": c.dtype, "label": c.label,
               "backend": backend, "device": device, "repeats": repeats}
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONUNBUFFERED"] = "1"
    if device.startswith("cuda"):
        return _run_worker(payload, env, timeout)
    memory = _run_worker(dict(payload, repeats=0), dict(env, MALLOC_MMAP_THRESHOLD_="131072"), timeout)
    if "error" in memory:
        return memory
    timing = _run_worker(payload, env, timeout)
    if "error" in timing:
        return timing
    return dict(timing, peak_extra_bytes=memory["peak_extra_bytes"],
                memory_exact=memory["memory_exact"])


def matmul_tflops(device: str, dtype: str, m: int, n: int, k: int, repeats: int = 5) -> float:
    """Throughput of torch.mm (m x k) @ (k x n) at ``dtype`` on ``device``: the practical peak."""
    dt = DTYPES[dtype]
    a = torch.randn(m, k, device=device).to(dt)
    b = torch.randn(k, n, device=device).to(dt)
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            ms = do_bench(lambda: torch.mm(a, b), warmup=25, rep=100, quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        except ImportError:
            torch.mm(a, b)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b)
            torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - t0) / repeats
    else:
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def memory_limit(device: str) -> int:
    """Bytes a case may use on ``device`` (80% of free memory)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free)
    try:
        text = open("/proc/meminfo").read()
        avail = int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024
        return int(0.8 * avail)
    except (OSError, AttributeError):
        return 8 << 30


def h2d_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Pinned host-to-device copy rate in GB/s (best of ``repeats``), for the host-bank rows."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    return nbytes / best / 1e9
