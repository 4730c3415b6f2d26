"""Results out: CSV, a markdown table naming the machine and versions, and PNG plots of
throughput and memory against the number of negatives."""
from __future__ import annotations

import csv
import datetime
import io
import os
import platform
from collections import defaultdict
from typing import Dict, List

import torch

from .._files import atomic_write_text

COLUMNS = ["label", "op", "shape", "dtype", "device", "backend", "median_ms", "min_ms", "max_ms",
           "eff_tflops", "mm_tflops", "pct_of_mm", "peak_extra_mib", "speedup_vs_eager",
           "memory_vs_eager", "memory_exact", "bank_gbps", "h2d_gbps", "pct_of_h2d", "vs_plain", "note"]


def _cpu_model() -> str:
    """'model name (family F model M)' from /proc/cpuinfo: the name alone ('AMD EPYC') does not
    tell apart CPU generations whose vector units differ (Zen 4 runs AVX-512 at half width)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's block is enough
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "cpu"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def environment(device: str, fma_peak: bool = False) -> Dict[str, str]:
    """Date, versions and device; with ``fma_peak`` on a CPU also the fp32 FMA throughput of the
    cpu backend's instruction set, measured now (half a second)."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda or "?"
    else:
        env["device"] = f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        # the cpu backend's kernels are compiled per instruction set: its figures depend on which
        from .. import _ext

        if _ext.load() is not None:
            env["cpu kernels"] = _ext.build_info().get("cpu_isa", "?")
            if fma_peak:
                peak = _ext.cpu_fma_peak(0.5)
                env["fp32 FMA peak"] = f"{peak['gflops']:.0f} GFLOP/s"
    return env


def _fmt(value, digits=3):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_csv(rows: List[Dict], path: str, columns: List[str] = COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(path, buffer.getvalue())


def markdown(rows: List[Dict], env: Dict[str, str], cpu: bool) -> str:
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    scale = 1e3 if cpu else 1.0
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [f"Measured on {head}.", "",
             f"| case | shape | dtype | backend | median ms (min-max) | eff. {unit} | % of mm | "
             f"peak extra MiB | speed-up vs eager | memory vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['label'] or r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | "
                         f"{r['note']} | | | | | |")
            continue
        eff = r["eff_tflops"] * scale
        bound = "" if r.get("memory_exact", True) else "<= "
        lines.append(
            f"| {r['label'] or r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | "
            f"{_fmt(r['median_ms'])} ({_fmt(r['min_ms'])}-{_fmt(r['max_ms'])}) | {_fmt(eff)} | "
            f"{_fmt(r.get('pct_of_mm'), 2)} | {bound}{_fmt(r['peak_extra_mib'])} | "
            f"{_fmt(r.get('speedup_vs_eager'), 3)} | {r.get('memory_vs_eager_mark', '') if r.get('memory_vs_eager') is not None else ''}"
            f"{_fmt(r.get('memory_vs_eager'), 3)} |")
    mm = sorted({(r["dtype"], r.get("mm_tflops")) for r in rows if r.get("mm_tflops")})
    if mm:
        lines += ["", "Practical matmul peak measured in the same run (torch.mm, "
                  + ("2048x2048x2048" if cpu else "8192x8192x8192") + "): "
                  + ", ".join(f"{dt} {_fmt(v * scale)} {unit}" for dt, v in mm) + "."]
    host = [r for r in rows if r.get("h2d_gbps")]
    if host:
        lines += ["", "Host-resident banks (pinned host memory, streamed to the GPU): "
                  + "; ".join(f"{r['shape']} {r['backend']}: {_fmt(r['bank_gbps'])} GB/s of bank = "
                              f"{_fmt(r['pct_of_h2d'], 2)}% of the pinned host-to-device rate "
                              f"{_fmt(r['h2d_gbps'])} GB/s measured in the same run" for r in host) + "."]
    mixing = [r for r in rows if r.get("vs_plain")]
    if mixing:
        lines += ["", "Hard-negative mixing against plain InfoNCE of the same backend (eager MoCHi: "
                  "the eager reference; X-separate-topk, X-mixed-dots: X) at the same B, K, D: " + "; ".join(f"{r['shape']} {r['backend']}: {_fmt(r['vs_plain'], 3)}x"
                                          for r in mixing) + "."]
    if any(not r.get("note") and not r.get("memory_exact", True) for r in rows):
        lines += ["", "<= : the process's peak resident memory could not be reset before the step "
                  "(/proc/self/clear_refs is not writable here), so that figure is an upper bound, and so is a "
                  "memory ratio to an exact eager figure; ~ : a ratio to eager's bound (an estimate)."]
    lines += ["", "Effective throughput uses DESIGN.md's FLOP models (bank mode 6BKD, in-batch 8BND, "
              "CLIP 8N^2D, top-k 2MND); speed-up and memory are relative to the eager reference "
              "(`backend=\"reference\"`) in the same run; peak extra memory excludes the inputs."]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], out_dir: str, cpu: bool) -> List[str]:
    """One PNG per (op, dtype, fixed dims) group measured at several numbers of negatives."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in rows:
        if r.get("note"):
            continue
        groups[(r["op"], r["dtype"], r["fixed"])].append(r)
    paths = []
    for (op, dtype, fixed), members in groups.items():
        if len({m["negatives"] for m in members}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        by_backend = defaultdict(list)
        for m in members:
            by_backend[m["backend"]].append(m)
        for backend, ms in sorted(by_backend.items()):
            ms.sort(key=lambda m: m["negatives"])
            x = [m["negatives"] for m in ms]
            ax_t.plot(x, [m["eff_tflops"] * (1e3 if cpu else 1) for m in ms], marker="o", label=backend)
            ax_m.plot(x, [max(m["peak_extra_mib"], 1e-3) for m in ms], marker="o", label=backend)
        mm = [m["mm_tflops"] for m in members if m.get("mm_tflops")]
        if mm:
            ax_t.axhline(mm[0] * (1e3 if cpu else 1), color="gray", ls="--", label="torch.mm peak")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("negatives per row (K)" if op != "topk" else "bank rows (N)")
            ax.grid(alpha=0.3)
            ax.legend()
        ax_t.set_ylabel("effective " + ("GFLOP/s" if cpu else "TFLOP/s"))
        ax_m.set_ylabel("peak extra memory (MiB)")
        ax_m.set_yscale("log")
        fig.suptitle(f"{op} {dtype} {fixed}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{dtype}_{fixed.replace(' ', '_').replace('=', '')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
