#!/usr/bin/env python3
"""Compile every Triton kernel of contrastive_kernels ahead of time, without a GPU.

Each module of ``contrastive_kernels.triton`` may expose ``AOT_SPECS``: a list of dicts

    name        label of the variant
    kernel      the @triton.jit function or @triton.autotune'd kernel
    signature   {arg: type} for every argument, "constexpr" for constexpr ones; "{dt}" stands for
                each dtype of ``dtypes`` and "{acc}" for its accumulation dtype (fp64 for fp64,
                else fp32)
    constexprs  {name: value or callable(dtype name) -> value}
    divisible   optional names of int arguments divisible by 16 (default: DIVISIBLE; also read
                from ``divisible_by_16``); pointers are always taken as 16-byte aligned, as the
                launcher specializes them
    dtypes      tuple of dtype names (fp32, fp16, bf16, fp64); default: the signature as given
    configs     optional [(num_warps, num_stages, {extra constexprs})]; or ``num_warps`` and
                ``num_stages`` for one plain (non-autotuned) launch config; default: every config
                of the autotuned kernel
    arch_major  optional: compile this spec only for targets of that major version (its tiles
                were chosen for that architecture, as the launcher does)

and this script compiles each (spec, dtype, config) for every target (default sm_80 and sm_90)
through ``triton.compile`` and runs ptxas -v on the PTX to report registers, spills and shared
memory. It exits 1 when a kernel fails to compile (the errors the interpreter cannot see: a
non-constexpr global, an unsupported dot shape or dtype, a shared-memory overflow, ...). Spills
and configs whose shared memory exceeds the target's limit are reported (the autotuner skips the
latter at run time); ``--max-spill-bytes`` turns spills above a threshold into failures.

    python scripts/triton_aot_check.py                 # all modules, sm_80 and sm_90
    python scripts/triton_aot_check.py --arch 90 --only lse_fwd --jobs 2
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback

# the interpreter would replace every kernel by an InterpretedFunction
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# int arguments that are multiples of 16 in the launches being modeled (feature dims and strides
# of the specs are multiples of 16; plan widths are multiples of 128); a spec may override this
DIVISIBLE = ("D", "stride_q", "stride_k", "stride_x", "rows_per_group", "cols_per_split")
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ACC = {"fp64": "fp64"}


def _collect(only=None):
    import contrastive_kernels.triton as pkg

    specs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for spec in getattr(mod, "AOT_SPECS", []):
            if only and not any(o in spec["name"] for o in only):
                continue
            specs.append((info.name, spec))
    return specs


FULL_DTYPES = ("bf16", "fp32")  # quick mode: every config for these on sm_90


def _jobs(specs, archs, full):
    """Flatten (module, spec) into compile jobs (picklable: indices, not kernels). Quick mode
    (default): every autotune config for bf16 and fp32 on sm_90 and newer; otherwise only the
    last config (the smallest tile, the autotuner's fallback)."""
    jobs = []
    for si, (mod, spec) in enumerate(specs):
        kernel = spec["kernel"]
        if spec.get("configs") is not None:
            configs = [(w, s, dict(extra)) for w, s, extra in spec["configs"]]
        elif "num_warps" in spec:
            configs = [(spec["num_warps"], spec.get("num_stages", 3), {})]
        else:
            configs = [(c.num_warps, c.num_stages, dict(c.kwargs)) for c in kernel.configs]
        for dt in spec.get("dtypes", ("fp32",)):
            for arch in archs:
                if "arch_major" in spec and arch // 10 != spec["arch_major"]:
                    continue
                every = full or (arch >= 90 and dt in FULL_DTYPES)
                for ci, cfg in enumerate(configs):
                    if every or ci == len(configs) - 1:
                        jobs.append((si, dt, ci, cfg, arch))
    return jobs


def _ptxas(arch: int):
    """The ptxas Triton itself uses for this arch (its PTX version matches), else CUDA's."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older triton: fall through
        pass
    for cand in (os.environ.get("PTXAS"), "/usr/local/cuda/bin/ptxas", "/usr/local/cuda-13.0/bin/ptxas"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _ptxas_report(ptx: str, arch: int):
    exe = _ptxas(arch)
    if exe is None:
        return {}
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        proc = subprocess.run([exe, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
                              capture_output=True, text=True)
    finally:
        os.unlink(path)
    text = proc.stderr + proc.stdout
    if proc.returncode != 0:
        return {"ptxas_error": text.strip().splitlines()[-1] if text.strip() else "ptxas failed"}
    out = {}
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["spill_st"], out["spill_ld"] = int(m.group(1)), int(m.group(2))
    return out


def _compile_one(job, only):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    si, dt, ci, (num_warps, num_stages, extra), arch = job
    mod, spec = _collect(only)[si]
    from contrastive_kernels.triton.infonce import jit_function

    fn = jit_function(spec["kernel"])
    acc = ACC.get(dt, "fp32")
    sig = {k: v.replace("{dt}", dt).replace("{acc}", acc) for k, v in spec["signature"].items()}
    consts = {k: (v(dt) if callable(v) else v) for k, v in spec["constexprs"].items()}
    consts.update(extra)
    row = {"module": mod, "name": spec["name"], "dtype": dt, "arch": arch, "warps": num_warps,
           "stages": num_stages, "meta": " ".join(f"{k}={v}" for k, v in extra.items())}
    t0 = time.time()
    # what the launcher specializes at run time: 16-byte aligned pointers and ints divisible by 16
    divisible = set(spec.get("divisible", spec.get("divisible_by_16", DIVISIBLE)))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in sig and (sig[name].startswith("*") or name in divisible)}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # noqa: BLE001 - reported, the script fails at the end
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        row["error"] = msg.splitlines()[-1][:300] if msg else type(exc).__name__
        row["detail"] = msg[-2000:]
        return row
    row["seconds"] = time.time() - t0
    row["smem"] = int(getattr(compiled.metadata, "shared", 0) or 0)
    ptx = compiled.asm.get("ptx", "")
    row["wgmma"] = "wgmma" in ptx
    row["mma"] = ("mma.sync" in ptx) or row["wgmma"]
    row.update(_ptxas_report(ptx, arch))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--only", default=None, help="substrings of spec names to keep, comma-separated")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--max-spill-bytes", type=int, default=None,
                   help="fail when a kernel spills more than this many bytes (default: report only)")
    p.add_argument("--full", action="store_true",
                   help="every autotune config for every dtype and arch (default: all configs "
                        "for bf16/fp32 on sm_90, the fallback config otherwise)")
    p.add_argument("--list", action="store_true", help="list the specs and exit")
    args = p.parse_args(argv)

    import triton

    only = args.only.split(",") if args.only else None
    specs = _collect(only)
    if args.list:
        for mod, spec in specs:
            print(f"{mod}: {spec['name']}  dtypes={spec.get('dtypes')}")
        return 0
    archs = [int(a) for a in args.arch.split(",")]
    jobs = _jobs(specs, archs, args.full)
    print(f"triton {triton.__version__}: {len(specs)} specs, {len(jobs)} compilations for "
          f"sm_{'/sm_'.join(map(str, archs))} (ptxas: {', '.join(sorted({str(_ptxas(a)) for a in archs}))})",
          flush=True)
    t0 = time.time()
    rows = []
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_compile_one, jobs, [only] * len(jobs)))
    else:
        rows = [_compile_one(j, only) for j in jobs]
    failed = []
    header = f"{'arch':>4} {'dtype':>5} {'w':>2} {'st':>2} {'regs':>4} {'spill':>9} {'smem KiB':>8}  kernel / config"
    print(header)
    print("-" * len(header))
    for r in rows:
        cfg = f"{r['name']} {r['meta']}".strip()
        if "error" in r:
            failed.append(r)
            print(f"{r['arch']:>4} {r['dtype']:>5} {r['warps']:>2} {r['stages']:>2}  COMPILE ERROR  {cfg}: {r['error']}")
            continue
        spill = f"{r.get('spill_st', '?')}/{r.get('spill_ld', '?')}"
        note = []
        if r["smem"] > SMEM_LIMIT.get(r["arch"], 227 * 1024):
            note.append("smem over the limit (autotuner skips it)")
        if "ptxas_error" in r:
            note.append(f"ptxas: {r['ptxas_error']}")
        if args.max_spill_bytes is not None and (r.get("spill_st", 0) + r.get("spill_ld", 0)) > args.max_spill_bytes:
            note.append("SPILLS over the threshold")
            failed.append(r)
        if r["arch"] >= 90 and r["dtype"] in ("fp16", "bf16") and "lse_" in r["name"] and not r["wgmma"]:
            note.append("no wgmma")
        print(f"{r['arch']:>4} {r['dtype']:>5} {r['warps']:>2} {r['stages']:>2} {r.get('regs', '?'):>4} "
              f"{spill:>9} {r['smem'] / 1024:>8.1f}  {cfg}{'  [' + '; '.join(note) + ']' if note else ''}")
    # the autotuner needs at least one config that fits in shared memory
    fits = {}
    for r in rows:
        key = (r["name"], r["dtype"], r["arch"])
        ok = "error" not in r and r["smem"] <= SMEM_LIMIT.get(r["arch"], 227 * 1024)
        fits[key] = fits.get(key, False) or ok
    for (name, dt, arch), ok in sorted(fits.items()):
        if not ok:
            print(f"NO CONFIG FITS: {name} {dt} sm_{arch}")
            failed.append({"name": name, "dtype": dt, "arch": arch})
    print(f"\n{len(rows) - len(failed)}/{len(rows)} ok in {time.time() - t0:.0f} s (triton {triton.__version__})")
    for r in failed:
        if "detail" in r:
            print(f"\n--- {r['name']} {r['dtype']} sm_{r['arch']} w{r['warps']} s{r['stages']} "
                  f"{r['meta']}\n{r['detail']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
