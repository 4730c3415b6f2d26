"""python -m contrastive_kernels.bench.distributed: group= on the CPU with gloo.

For world sizes 1, 2, 4 at a fixed *global* batch, both strategies, it starts W rank processes
(joined through a file store), and each rank measures one forward+backward step of its local
loss: wall time (median over repeats after a warm-up step, the ranks released together by a
barrier), extra peak memory (as bench/measure.py: /proc/self/clear_refs reset once the inputs
exist, then VmHWM after the step minus VmRSS before it; with MALLOC_MMAP_THRESHOLD_ fixed so
that freed tensors leave the RSS), and the bytes it sent (contrastive_kernels.distributed.TRAFFIC),
next to the communication formulas of ``comm_bytes``. "single" is the same loss without group= on
the whole batch in one process.

  python -m contrastive_kernels.bench.distributed --out benchmarks/results/distributed
  python -m contrastive_kernels.bench.distributed --losses clip_loss --N 2048 --D 512 --worlds 1,2
  python -m contrastive_kernels.bench.distributed --local-batch 1024 --no-single   # weak scaling
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .measure import proc_status, reset_peak_rss
from .._files import atomic_write_text
from .report import environment, write_csv

LOSSES = ("info_nce", "clip_loss", "nt_xent", "sup_con")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


# --------------------------------------------------------------------------------------------
# communication volume (bytes one rank sends per forward+backward step; it receives as much)
# --------------------------------------------------------------------------------------------


def comm_bytes(loss, strategy, b, world, d, itemsize, similarity="cosine", label_bytes=0,
               acc_itemsize=4):
    """What ``contrastive_kernels.distributed`` sends per rank per step, excluding the
    W x 512-byte metadata all-gather of every call (and the scalar all-reduce of sup_con /
    multi_positive). ``b``: the rows of the circulating / gathered key shard (info_nce: B
    positive keys; nt_xent: 2B views; clip_loss: B texts (and B images for gather); sup_con: B
    features with ``label_bytes`` of labels per row); all keys require grad.

    gather: all-gather (W-1) b D s and reduce-scatter (W-1) b D s of the keys, plus (W-1) b
    label_bytes; clip_loss adds 4 (W-1) b f for merging the texts' column LSE (a max all-reduce
    and a reduce-scatter of N floats forward, an all-gather of N floats of gradient backward). Collectives are counted as a ring algorithm sends them ((W-1)/W of the gathered
    size; 2 (W-1)/W for an all-reduce).
    ring: forward (W-1) hops of the shard, b (D s + c f + label_bytes) each (c = 1 column term
    for cosine / l2, 0 for dot; f = 4 fp32 statistics); backward (W-1) hops of the same shard
    again and W hops of its fp32 partial gradient, b (D + c) f; clip_loss adds W hops of the
    column LSE (b f) forward and 2 b f (column LSE and its gradient) per backward hop.
    """
    w, s, f = world, itemsize, acc_itemsize
    if w == 1:
        return 0
    if strategy == "gather":
        return (w - 1) * b * (2 * d * s + label_bytes + (4 * f if loss == "clip_loss" else 0))
    c = 0 if similarity == "dot" else 1
    shard = b * (d * s + c * f + label_bytes)
    total = 2 * (w - 1) * shard + w * b * (d + c) * f
    if loss == "clip_loss":
        total += w * b * f + (w - 1) * 2 * b * f
    return total


def _key_rows(loss, b):
    return 2 * b if loss == "nt_xent" else b


# --------------------------------------------------------------------------------------------
# one rank
# --------------------------------------------------------------------------------------------


def _make_step(spec, rank, world, group, n, d):
    import contrastive_kernels as ck

    dtype = DTYPES[spec["dtype"]]
    b = n // world
    g = torch.Generator().manual_seed(0)
    mine = slice(rank * b, (rank + 1) * b) if group is not None else slice(0, n)

    def feats():
        x = torch.randn(n, d, generator=g)[mine].to(dtype).contiguous()
        return x.requires_grad_(True)

    kw = dict(group=group, backend=spec["backend"],
              group_strategy=spec["strategy"] if group is not None else "gather")
    if spec["loss"] == "info_nce":
        q, p = feats(), feats()
        return lambda: ck.info_nce(q, p, temperature=0.1, similarity="cosine", **kw)
    if spec["loss"] == "nt_xent":
        z1, z2 = feats(), feats()
        return lambda: ck.nt_xent(z1, z2, temperature=0.2, **kw)
    if spec["loss"] == "clip_loss":
        img, txt = feats(), feats()
        scale = torch.tensor(20.0, requires_grad=True)
        return lambda: ck.clip_loss(img, txt, scale, similarity="cosine", **kw)
    if spec["loss"] == "sup_con":
        x = feats()
        labels = torch.randint(0, 100, (n,), generator=g)[mine]
        return lambda: ck.sup_con(x, labels, temperature=0.1, **kw)
    raise ValueError(spec["loss"])


def worker(spec):
    """Measure one rank (``spec`` from the parent); print one JSON line."""
    import torch.distributed as dist

    from .. import distributed as ckd

    rank, world = spec["rank"], spec["world"]
    group = None
    if spec["strategy"] != "single":
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=world)
        group = dist.group.WORLD
    # warm up gloo (its connections and buffers), the thread pool and BLAS on the step itself;
    # the parent fixes glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_), so every large tensor is
    # its own mapping, returned when freed: the RSS peak of the next step is that step's own
    step = _make_step(spec, rank, world, group, spec["N"], spec["D"])
    step().backward()
    import gc

    gc.collect()
    if group is not None:
        dist.barrier(group)
    exact = reset_peak_rss()
    before = proc_status()["VmRSS"]
    ckd.reset_traffic()
    t0 = time.perf_counter()
    step().backward()
    first = time.perf_counter() - t0
    peak = proc_status()["VmHWM"] - before
    sent = dict(ckd.TRAFFIC)
    times = []
    for _ in range(spec["repeats"]):
        if group is not None:
            dist.barrier(group)
        t0 = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - t0)
    if group is not None:
        dist.barrier(group)
        dist.destroy_process_group()
    print(json.dumps({"rank": rank, "median_ms": 1e3 * statistics.median(times or [first]),
                      "first_ms": 1e3 * first, "peak_extra_bytes": peak, "memory_exact": exact,
                      "sent_p2p": sent["p2p"], "sent_collective": sent["collective"]}), flush=True)


# --------------------------------------------------------------------------------------------
# the parent
# --------------------------------------------------------------------------------------------


def run_config(spec, timeout):
    world = spec["world"] if spec["strategy"] != "single" else 1
    tmp = tempfile.mkdtemp(prefix="ck_dist_bench_")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1",
           "CK_CHUNK_MB": str(spec["chunk_mb"]), "MALLOC_MMAP_THRESHOLD_": "131072"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for r in range(world):
        payload = json.dumps(dict(spec, rank=r, world=world, init=f"file://{tmp}/store"))
        procs.append(subprocess.Popen([sys.executable, "-m", "contrastive_kernels.bench.distributed",
                                       "--worker", payload], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"error": f"timed out after {timeout:.0f} s"}
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"rank exit {p.returncode}: {tail[:200]}"}
        out.append(json.loads(lines[-1]))
    return {"ranks": out}


COLUMNS = ["loss", "strategy", "world", "global_batch", "local_batch", "D", "dtype", "backend",
           "median_ms_max_rank", "median_ms_ranks", "peak_extra_mib_max_rank", "sent_mib_per_rank",
           "formula_mib_per_rank", "memory_exact", "note"]


def markdown(rows, env, args):
    lines = ["# group= on the CPU (gloo): time and peak memory per rank", "",
             f"{env['date']}, torch {env['torch']}, python {env['python']}, {env['device']}; "
             f"{args.threads} thread(s) per rank, CK_CHUNK_MB={args.chunk_mb}, backend "
             f"{args.backend}. "
             + ("Global batch N fixed: each of W ranks holds N/W rows. " if args.local_batch is None
                else f"Local batch fixed at {args.local_batch} rows per rank: N = W x B. ")
             + f"Time: median "
             f"of {args.repeats} forward+backward steps (slowest rank); memory: extra peak RSS "
             "of the step (largest rank). Sent: bytes one rank sent in one step (measured), next "
             "to `comm_bytes` (the formula). All ranks share this machine's cores, so times at "
             "W > 1 measure contention as much as the algorithm; memory and bytes do not.", "",
             "| loss | strategy | W | N | B local | D | dtype | ms / step | peak MiB / rank | "
             "sent MiB / rank | formula MiB |", "|" + "---|" * 11]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['loss']} | {r['strategy']} | {r['world']} | {r['global_batch']} | "
                         f"{r['local_batch']} | {r['D']} | {r['dtype']} | {r['note']} | | | |")
            continue
        lines.append(f"| {r['loss']} | {r['strategy']} | {r['world']} | {r['global_batch']} | "
                     f"{r['local_batch']} | {r['D']} | {r['dtype']} | "
                     f"{r['median_ms_max_rank']:.0f} | {'' if r['memory_exact'] else '<= '}"
                     f"{r['peak_extra_mib_max_rank']:.1f} | "
                     f"{r['sent_mib_per_rank']:.2f} | {r['formula_mib_per_rank']:.2f} |")
    if any(not r.get("note") and not r["memory_exact"] for r in rows):
        lines += ["", "<= : a rank's peak resident memory could not be reset before the step "
                  "(/proc/self/clear_refs is not writable here), so that figure is an upper bound."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m contrastive_kernels.bench.distributed",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--losses", default="info_nce,clip_loss", help=f"from {', '.join(LOSSES)}")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--strategies", default="gather,ring")
    p.add_argument("--N", type=int, default=4096, help="global batch (rows of all ranks)")
    p.add_argument("--local-batch", type=int, default=None,
                   help="weak scaling: a fixed batch per rank (the global batch grows with W) "
                        "instead of a fixed global batch --N")
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="chunked")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--chunk-mb", type=float, default=8.0, help="CK_CHUNK_MB of the ranks")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--no-single", action="store_true", help="skip the one-process baseline")
    p.add_argument("--out", default=None, help="folder for results.csv, results.md, results.json")
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    losses = args.losses.split(",")
    for loss in losses:
        if loss not in LOSSES:
            p.error(f"unknown loss {loss!r}")
    worlds = [int(w) for w in args.worlds.split(",")]
    for w in worlds:
        if w < 1 or (args.local_batch is None and args.N % w):
            p.error(f"the global batch N={args.N} must split evenly over world size {w}")
    strategies = args.strategies.split(",")
    rows = []
    itemsize = DTYPES[args.dtype].itemsize
    for loss in losses:
        configs = [("single", 1)] if not args.no_single else []
        configs += [(s, w) for w in worlds for s in strategies]
        for strategy, world in configs:
            n = args.N if args.local_batch is None else args.local_batch * world
            spec = {"loss": loss, "strategy": strategy, "world": world, "N": n, "D": args.D,
                    "dtype": args.dtype, "backend": args.backend, "repeats": args.repeats,
                    "threads": args.threads, "chunk_mb": args.chunk_mb}
            print(f"{loss} {strategy} W={world} ...", file=sys.stderr, flush=True)
            res = run_config(spec, args.timeout)
            row = {"loss": loss, "strategy": strategy, "world": world, "global_batch": n,
                   "local_batch": n // world, "D": args.D, "dtype": args.dtype,
                   "backend": args.backend}
            if "error" in res:
                row["note"] = res["error"]
                rows.append(row)
                continue
            ranks = res["ranks"]
            b = _key_rows(loss, n // world)
            label_bytes = 8 if loss == "sup_con" else 0
            formula = 0 if strategy == "single" else comm_bytes(
                loss, strategy, b, world, args.D, itemsize, "cosine", label_bytes)
            row.update(
                median_ms_max_rank=max(r["median_ms"] for r in ranks),
                median_ms_ranks=" ".join(f"{r['median_ms']:.0f}" for r in ranks),
                peak_extra_mib_max_rank=max(r["peak_extra_bytes"] for r in ranks) / 2**20,
                sent_mib_per_rank=max(r["sent_p2p"] + r["sent_collective"] for r in ranks) / 2**20,
                formula_mib_per_rank=formula / 2**20,
                memory_exact=all(r["memory_exact"] for r in ranks))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    env = environment("cpu")
    table = markdown(rows, env, args)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(rows, os.path.join(args.out, "results.csv"), COLUMNS)
        atomic_write_text(os.path.join(args.out, "results.md"), table)
        atomic_write_text(os.path.join(args.out, "results.json"),
                          json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1))
        print(f"wrote {args.out}/results.csv, results.md, results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
