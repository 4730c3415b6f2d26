"""Entry point of ``python -m contrastive_kernels.train`` (see ``config.DESCRIPTION``), and
``--compare``: the same job once per implementation, each in a fresh process (so that its peak
memory is its own), then the side-by-side report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

from . import config
from .report import compare_markdown, per_step_max, plot_compare, relative_differences
from .checkpoint import WriteError, atomic_write_bytes, atomic_write_json

PROG = "python -m contrastive_kernels.train"
COMPARE_TOLERANCE = 1e-3  # max relative loss difference accepted between implementations (fp32)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _environment(device: str, threads: int) -> str:
    from contrastive_kernels.bench.report import environment

    env = environment(device)
    where = env["device"].split(", torch threads")[0]
    if not device.startswith("cuda"):
        where += f", torch threads {threads}"
    return f"{where}, torch {env['torch']}, Python {env['python']}"


def _run_child(base: List[str], impl: str, out: str, extra: List[str] = ()) -> Optional[Dict]:
    # --out=VALUE: a folder whose name starts with "-" would otherwise read as a flag
    cmd = [sys.executable, "-m", "contrastive_kernels.train", *base, "--impl", impl, *extra,
           f"--out={out}"]
    print(f"[compare] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return None
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def free_running_diff(loss: List[float], base: List[float], tolerance: float) -> Dict:
    rel = relative_differences(loss, base)
    worst = max(range(len(rel)), key=rel.__getitem__)
    identical = next((i for i, r in enumerate(rel) if r != 0.0), len(rel))
    beyond = next((i for i, r in enumerate(rel) if r > tolerance), None)
    return {"max_rel_diff": rel[worst], "argmax_step": worst + 1,
            "mean_rel_diff": sum(rel) / len(rel), "first_rel_diff": rel[0],
            "identical_steps": identical,
            "first_step_beyond_tolerance": None if beyond is None else beyond + 1,
            "same_length": len(loss) == len(base)}


def compare(args) -> int:
    """Run ``args`` once per implementation of ``--compare`` (free-running, each in a fresh
    process), then once more with the first implementation and ``--shadow-impl`` the others (the
    lockstep check), and report them side by side."""
    from .trainer import RunError, check_impl

    for impl in args.compare:
        try:
            check_impl(impl, args.device)
        except RunError as exc:
            return _error(str(exc))
    if args.resume not in (None, "auto"):
        return _error("--compare resumes each implementation from OUT/<impl>/checkpoint.pt; "
                      "give --resume without a path")
    base = config.to_argv(args, skip=("compare", "impl", "out", "shadow_impl"))
    runs: Dict[str, Dict] = {}
    for impl in args.compare:
        metrics = _run_child(base, impl, os.path.join(args.out, impl))
        if metrics is None:
            return _error(f"the --impl {impl} run failed")
        runs[impl] = metrics
    names = list(runs)
    first, others = names[0], names[1:]
    lockstep = _run_child([a for a in base if a != "--resume"], first,
                          os.path.join(args.out, "lockstep"),
                          ["--shadow-impl", ",".join(others), "--no-eval-init"])
    if lockstep is None:
        return _error("the lockstep run failed")
    tol = COMPARE_TOLERANCE
    free = {n: free_running_diff(runs[n]["loss"], runs[first]["loss"], tol) for n in others}
    check = {n: {**lockstep["lockstep"][n], "tolerance": tol,
                 "within_tolerance": lockstep["lockstep"][n]["max_rel_loss_diff"] <= tol
                 and lockstep["lockstep"][n]["max_rel_grad_diff"] <= tol} for n in others}
    reproducible = lockstep["loss"] == runs[first]["loss"]
    text = compare_markdown(runs, free, check, reproducible, _environment(args.device, args.threads))
    atomic_write_bytes(os.path.join(args.out, "compare.md"), text.encode())
    summary = {"impls": names, "free_running": free, "lockstep": check,
               "lockstep_run_reproduces_first_run": reproducible, "tolerance": tol,
               "config": runs[first]["config"],
               "runs": {n: {k: v for k, v in m.items() if k != "loss"} for n, m in runs.items()},
               "loss": {n: m["loss"] for n, m in runs.items()}}
    atomic_write_json(summary, os.path.join(args.out, "compare.json"))
    plot_compare({n: m["loss"] for n, m in runs.items()}, os.path.join(args.out, "loss_compare.png"),
                 f"{args.method} on {args.data}: " + " vs ".join(
                     f"{n} ({runs[n]['impl_resolved']})" for n in names),
                 lockstep={n: per_step_max(lockstep["lockstep_trace"]["loss_diff"][n],
                                           lockstep["lockstep_trace"]["call_step"])
                           for n in others})
    print(text, flush=True)
    print(f"wrote {os.path.join(args.out, 'compare.md')}, compare.json, loss_compare.png",
          file=sys.stderr)
    ok = all(c["within_tolerance"] for c in check.values()) and reproducible and \
        all(f["same_length"] for f in free.values())
    if not ok:
        print(f"{PROG}: the implementations differ by more than {tol:g} relative in lockstep, or "
              "the lockstep run did not reproduce the first run", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = config.parse_args(argv)  # usage errors exit with code 2 here
    from .trainer import RunError, run

    try:
        if args.compare is not None:
            return compare(args)
        metrics = run(args)
    except RunError as exc:
        return _error(str(exc))
    except WriteError as exc:  # disk full, ...: not a usage error
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if metrics is not None:
        extra = f", mAP {metrics['map']:.4f}" if "map" in metrics else ""
        init = metrics.get("knn_top1_init")
        init_text = f" (untrained {init:.4f})" if init is not None else ""
        speed = metrics["samples_per_s"]  # None when this process had no step left to train
        speed_text = "no steps left to train" if speed is None else f"{speed:,.0f} samples/s"
        print(f"{args.method} on {metrics['data']} [--impl {args.impl} -> "
              f"{metrics['impl_resolved']}]: {metrics['steps']} steps, final loss "
              f"{metrics['loss'][-1]:.4f}, kNN top-1 {metrics['knn_top1']:.4f}{init_text}{extra}, "
              f"{speed_text}, peak memory "
              f"{metrics['peak_memory_mb']:.0f} MiB, wall {metrics['wall_time_s']:.1f} s "
              f"-> {os.path.join(args.out, 'metrics.json')}", flush=True)
    return 0
