"""Compile the top-k Triton kernels ahead of time for NVIDIA GPUs, without a GPU.

    python scripts/triton_aot_topk.py [--arch 80,90] [--ptxas /usr/local/cuda-13.0/bin/ptxas]

Each entry of ``contrastive_kernels.triton.topk.AOT_SPECS`` (kernel, signature, constexprs,
num_warps, num_stages) is compiled with ``triton.compile`` for each architecture; the report
gives registers and spills (``ptxas -v``),
shared memory, whether the bank loads are software-pipelined (async copies in the TTGIR) and
whether the dot runs on wgmma (sm_90). With ``--sass`` it also disassembles each kernel
(Triton's bundled nvdisasm) and gives, per loop, the instructions per thread of one iteration,
the barriers among them and the part a forward branch can skip (in the FILTER walk: the survivor
extraction): the per-tile costs that ``topk.sample_factor`` is chosen with. Exit status 1 if any
compile fails. Works with Triton 3.6 through 3.9 (run it with PYTHONPATH pointing at another
Triton to check that one).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


def compile_spec(spec, arch):
    fn = spec["kernel"]
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", [])}
    src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})


def ptxas_report(ptx: str, arch: int, ptxas: str):
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        out = subprocess.run([ptxas, f"-arch={sm}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(path)
    text = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    return (int(regs[-1]) if regs else None, int(spill[-1]) if spill else None,
            out.returncode, text.strip().splitlines()[-1:] if out.returncode else [])


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def _opcode(ins: str) -> str:
    words = ins.split()
    return words[1] if ins.startswith("@") else words[0]  # past a predicate ("@P0", "@!PT")


def sass_loops(sass: str):
    """Loops of a disassembled kernel: [(instructions per iteration, barriers, largest region a
    forward branch inside the loop skips)] in code order. A loop is the span from a label to a
    later branch back to it (the kernel's closing self-branch is left out)."""
    code, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(code)
            continue
        m = _SASS_LINE.match(line)
        if m:
            code.append(m.group(2))
    branches = []
    for i, ins in enumerate(code):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ins)
        if m and m.group(1) in labels:
            branches.append((i, labels[m.group(1)]))
    loops = []
    for i, target in branches:
        if target < i:
            body = code[target:i + 1]
            skips = [t - j for j, t in branches if target <= j < t <= i + 1]
            bars = sum(_opcode(ins).startswith("BAR") for ins in body)
            loops.append((len(body), bars, max(skips, default=0)))
    return loops


def sass_report(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(path)
    if out.returncode:
        return f"nvdisasm failed: {out.stderr.strip()[-200:]}"
    loops = sass_loops(out.stdout)
    return "; ".join(f"loop {n} instr ({b} barriers, {skip} skippable)"
                     for n, b, skip in loops) or "no loops"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90")
    p.add_argument("--ptxas", default=None,
                   help="ptxas for the register report (default: the first of Triton's bundled "
                        "ptxas-blackwell, ptxas, and /usr/local/cuda-13.0/bin/ptxas that accepts the PTX)")
    p.add_argument("--filter", default="", help="only specs whose name contains this")
    p.add_argument("--sass", action="store_true", help="per-loop SASS instruction counts")
    args = p.parse_args(argv)
    from contrastive_kernels.triton import topk as _pkg_attr  # noqa: F401  (loads the backend)
    import importlib

    mod = importlib.import_module("contrastive_kernels.triton.topk")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    candidates = [args.ptxas] if args.ptxas else [
        os.path.join(bundled, "ptxas-blackwell"), os.path.join(bundled, "ptxas"),
        "/usr/local/cuda-13.0/bin/ptxas"]
    candidates = [c for c in candidates if os.path.exists(c)]
    print(f"triton {triton.__version__}")
    failed = 0
    for arch in [int(a) for a in args.arch.split(",")]:
        for spec in mod.AOT_SPECS:
            name = spec.get("name", spec["kernel"].__name__)
            if args.filter not in name or spec.get("arch_major", arch // 10) != arch // 10:
                continue
            try:
                c = compile_spec(spec, arch)
            except Exception as exc:  # report every failure, not just the first
                failed += 1
                msg = str(exc).strip().splitlines()
                print(f"sm_{arch} {name}: COMPILE FAILED: {msg[-1] if msg else type(exc).__name__}")
                continue
            ttgir = c.asm.get("ttgir", "")
            pipelined = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")
            wgmma = ttgir.count("warp_group_dot ") > 0
            shared = getattr(c.metadata, "shared", None)
            regs = spills = None
            note = ""
            rc, tail = 1, ["no ptxas found"]
            for ptxas in candidates:
                regs, spills, rc, tail = ptxas_report(c.asm["ptx"], arch, ptxas)
                if rc == 0:
                    break
            if rc:
                failed += 1
                note = f" PTXAS FAILED {tail}"
            print(f"sm_{arch} {name}: regs {regs} spills {spills} shared {shared} "
                  f"async-copies {pipelined} wgmma {wgmma}{note}")
            if args.sass and "cubin" in c.asm:
                print(f"    sass: {sass_report(c.asm['cubin'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
