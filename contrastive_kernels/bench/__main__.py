"""python -m contrastive_kernels.bench: time forward+backward and peak memory of every backend on
shape presets, next to the eager reference and the practical matmul peak.

  python -m contrastive_kernels.bench                       # the CPU preset (MoCo and QK shapes)
  python -m contrastive_kernels.bench --preset gpu          # every GPU loss preset (on a CUDA device)
  python -m contrastive_kernels.bench --preset moco --backends reference,compile,triton
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .baselines_mochi import FUSED_TOPK_BACKENDS, MIXED_LSE_BACKENDS
from .cases import BASELINES, DTYPES, GPU_PRESETS, PRESETS, Case, _load_baselines, applies
from .measure import h2d_bandwidth, matmul_tflops, measure_in_process, measure_isolated, memory_limit
from .._files import atomic_write_text
from .report import environment, markdown, plot, write_csv


def _default_backends(device: str):
    import contrastive_kernels as ck

    names = ["reference"]
    if device.startswith("cuda"):
        names.append("compile")
    names += [n for n, why in ck.available_backends(device).items()
              if why is None and n != "reference"]
    return names


def _known_backends():
    from contrastive_kernels.functional import BACKEND_MODULES

    _load_baselines()
    return ["reference", "compile", *BACKEND_MODULES, *BASELINES]


def _cases(args):
    """The cases of ``args.preset`` (several presets: each case once, its labels joined)."""
    merged = {}
    for preset in args.preset.split(","):
        for c in PRESETS[preset]:
            dtype = args.dtype or c.dtype
            labels = merged.setdefault((c.op, c.shape, dtype), [])
            if c.label not in labels:
                labels.append(c.label)
    return [Case(op, shape, dtype, "+".join(x for x in labels if x))
            for (op, shape, dtype), labels in merged.items()]


def _backends(args):
    return args.backends.split(",") if args.backends else _default_backends(args.device)


def _check_out(out) -> str:
    """Why ``out`` cannot take the results (None if it can): checked before any measurement."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is a file, not a folder"
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".bench-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        return f"--out {out!r} is not a writable folder: {exc.strerror or exc}"
    return None


def parse_args(argv=None):
    known = _known_backends()
    names = ", ".join(known)
    p = argparse.ArgumentParser(prog="python -m contrastive_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default cpu); "
                   "several separated by commas (a case in two of them is measured once)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from: {names} "
                        "(default: reference + every available backend; compile on GPUs); an "
                        "outside candidate only runs the ops it supports")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="override the presets' dtypes: fp32, fp16, bf16")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed steps per measurement (CPU: at most 60 s of them; GPU: "
                        "triton's do_bench over max(100, 20 x repeats) ms)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per CPU measurement process (not with --no-isolate)")
    p.add_argument("--out", default=None, help="folder for results.csv, results.md, *.png, results.json")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure CPU cases in this process (peak memory is then only indicative)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    args = p.parse_args(argv)
    for preset in args.preset.split(","):
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        p.error(f"unknown dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.timeout > 0:
        p.error("--timeout must be > 0")
    if args.backends is not None:
        chosen = list(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
        if not chosen:
            p.error("--backends names no backend")
        for b in chosen:
            if b not in known:
                p.error(f"unknown backend {b!r}; choose from {names}")
        args.backends = ",".join(chosen)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(args.device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda (or cuda:N), not {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA device")
    on_gpu = [x for x in args.preset.split(",") if x in GPU_PRESETS]
    if kind == "cpu" and on_gpu and not args.list:
        p.error(f"--preset {','.join(on_gpu)} is sized for a GPU (hours on a CPU); the CPU presets "
                f"are {', '.join(x for x in PRESETS if x.startswith('cpu'))}")
    if args.list:
        return args
    if not any(applies(b, c.op) for c in _cases(args) for b in _backends(args)):
        p.error(f"nothing to measure: no case of --preset {args.preset} runs with --backends "
                f"{args.backends or 'default'}")
    if args.out:
        why = _check_out(args.out)
        if why:
            p.error(why)
    return args


def run(args) -> list:
    from tqdm import tqdm

    cases = _cases(args)
    backends = _backends(args)
    cpu = not args.device.startswith("cuda")
    mm_cache = {}
    rows = []
    config = {k: getattr(args, k) for k in ("preset", "backends", "device", "dtype", "repeats")}
    config["backends"] = ",".join(backends)
    _save_partial(args.out, rows, config)  # replaces the partial rows of an earlier run
    limit = memory_limit(args.device)
    bar = tqdm([(c, b) for c in cases for b in backends if applies(b, c.op)], desc="bench", unit="run",
               file=sys.stderr)
    for c, backend in bar:
        _save_partial(args.out, rows, config)  # the rows before this one (also skipped or failed)
        bar.set_postfix_str(f"{c.label or c.op} {c.shape_str} {c.dtype} {backend}")
        row = {"label": c.label, "op": c.op, "shape": c.shape_str, "dtype": c.dtype,
               "device": args.device, "backend": backend, "negatives": c.negatives,
               "fixed": " ".join(f"{k}={v}" for k, v in c.shape if k not in ("K", "N") or c.op == "clip")}
        if backend in ("reference", "compile") and c.eager_bytes() > limit:
            row["note"] = f"skipped: eager needs ~{c.eager_bytes() / 2**30:.0f} GiB"
            rows.append(row)
            continue
        if cpu and not args.no_isolate:
            result = measure_isolated(c, backend, args.device, args.repeats, args.timeout)
        else:
            try:
                result = measure_in_process(c, backend, args.device, args.repeats)
            except Exception as exc:  # a backend that fails on this shape: reported, not fatal
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            if not cpu:
                torch.cuda.empty_cache()
        if "error" in result:
            row["note"] = result["error"]
            rows.append(row)
            continue
        if c.dtype not in mm_cache:
            size = 2048 if cpu else 8192
            mm_cache[c.dtype] = matmul_tflops(args.device, c.dtype, size, size, size)
        row.update(result)
        row["eff_tflops"] = c.flops / (result["median_ms"] * 1e-3) / 1e12
        row["mm_tflops"] = mm_cache[c.dtype]
        row["pct_of_mm"] = 100.0 * row["eff_tflops"] / row["mm_tflops"]
        row["peak_extra_mib"] = result["peak_extra_bytes"] / 2**20
        if c.op == "topk_host" and not cpu:  # the bank's streaming rate vs the PCIe rate
            if "h2d" not in mm_cache:
                mm_cache["h2d"] = h2d_bandwidth(args.device)
            row["bank_gbps"] = c.bank_bytes() / (result["median_ms"] * 1e-3) / 1e9
            row["h2d_gbps"] = mm_cache["h2d"]
            row["pct_of_h2d"] = 100.0 * row["bank_gbps"] / row["h2d_gbps"]
        rows.append(row)
    _save_partial(args.out, rows, config)
    # mixing against plain InfoNCE at the same B, K, D, dtype and backend (the issue's "at most
    # 15 %"); the mixing-only candidates against the backend they stand beside
    plain_of = {"eager-mochi": "reference",
                **{f"{b}-separate-topk": b for b in FUSED_TOPK_BACKENDS},
                **{f"{b}-mixed-dots": b for b in MIXED_LSE_BACKENDS}}
    plain = {(r["backend"], r["dtype"], r["shape"]): r for r in rows
             if r["op"] == "info_nce_bank" and not r.get("note")}
    for r in rows:
        if r["op"] == "mixing" and not r.get("note"):
            dims = dict(kv.split("=") for kv in r["shape"].split())
            base = plain.get((plain_of.get(r["backend"], r["backend"]), r["dtype"],
                              f"B={dims['B']} K={dims['K']} D={dims['D']}"))
            if base is not None:
                r["vs_plain"] = r["median_ms"] / base["median_ms"]
    ratios_to_eager(rows)
    return rows


def ratios_to_eager(rows) -> None:
    """Speed-up and memory against the eager reference of the same case, in place. A memory
    figure that is an upper bound (memory_exact False) over an exact eager figure bounds the ratio
    ("<= "); over eager's own bound the ratio is only an estimate ("~ ")."""
    eager = {(r["op"], r["shape"], r["dtype"]): r for r in rows
             if r["backend"] == "reference" and not r.get("note")}
    for r in rows:
        e = eager.get((r["op"], r["shape"], r["dtype"]))
        if e is not None and not r.get("note"):
            r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
            r["memory_vs_eager"] = r["peak_extra_mib"] / max(e["peak_extra_mib"], 1e-9)
            eager_exact = e.get("memory_exact", True)
            exact = r is e or (r.get("memory_exact", True) and eager_exact)
            r["memory_vs_eager_mark"] = "" if exact else "<= " if eager_exact else "~ "


PARTIAL = "results.partial.json"
PLOTS = "plots.json"  # the PNGs this run wrote: the next run into the folder replaces them


def _save_partial(out, rows, config=None) -> None:
    """The rows measured so far, so that a run cut short (a time limit, a crash) keeps them; with
    the run's configuration, written (empty) before the first measurement too, so that a partial
    file of an earlier run never passes for this one's."""
    if out:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, PARTIAL),
                          json.dumps({"config": config, "rows": rows}, indent=1, default=str))


def _earlier_plots(out) -> set:
    """The PNGs an earlier run wrote into ``out`` (as it listed them: files of the user's own are
    never touched)."""
    try:
        names = json.load(open(os.path.join(out, PLOTS)))
    except (OSError, ValueError):
        return set()
    if not isinstance(names, list):  # not a list this CLI wrote
        return set()
    return {n for n in names if isinstance(n, str) and n.endswith(".png") and os.path.basename(n) == n
            and os.path.isfile(os.path.join(out, n))}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, cases in PRESETS.items():
            print(f"{name}: " + "; ".join(f"{c.op} {c.shape_str} {c.dtype}" for c in cases))
        return 0
    rows = run(args)
    cpu = not args.device.startswith("cuda")
    env = environment(args.device, fma_peak=cpu)
    table = markdown(rows, env, cpu)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(rows, os.path.join(args.out, "results.csv"))
        atomic_write_text(os.path.join(args.out, "results.md"), table)
        atomic_write_text(os.path.join(args.out, "results.json"),
                          json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
        if os.path.exists(os.path.join(args.out, PARTIAL)):
            os.remove(os.path.join(args.out, PARTIAL))
        earlier = _earlier_plots(args.out)
        plots = plot(rows, args.out, cpu)
        for path in plots:
            print(f"wrote {path}")
        for name in earlier - {os.path.basename(p) for p in plots}:
            os.remove(os.path.join(args.out, name))  # an earlier run's plot of cases not run now
        atomic_write_text(os.path.join(args.out, PLOTS), json.dumps(sorted(os.path.basename(p) for p in plots)))
        print(f"wrote {args.out}/results.csv, results.md, results.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
