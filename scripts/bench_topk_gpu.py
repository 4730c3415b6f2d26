"""GPU timing of the Triton top-k against its GEMM floor and torch.mm + torch.topk, with the
survivor statistics of each FILTER pass. One call on the GPU machine:

    python scripts/bench_topk_gpu.py [--quick] [--out DIR]

Prints a table: ms (median of triton.testing.do_bench), topk / gemm-only ratio, speedup over
torch-topk, effective TFLOP/s (2 M N D), survivors per row.
"""
import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from contrastive_kernels.bench.baselines_topk import torch_topk  # noqa: E402

T = importlib.import_module("contrastive_kernels.triton.topk")
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=20, rep=150)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--cases", default=None, help="dtype:N:k,... (default: the mining preset)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch.mm + torch.topk baseline")
    a = p.parse_args()
    if a.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in a.cases.split(",")]
    elif a.quick:
        cases = [(dt, 2**20, k) for dt in ("fp16",) for k in (16, 128, 1024)]
    else:
        cases = [(dt, n, k) for dt in ("fp16", "bf16", "fp32") for n in (2**20, 2**22) for k in (16, 128, 1024)]
    m, d = 8192, 128
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = {}
    print(f"{'dtype':5} {'N':>8} {'k':>5} {'gemm ms':>8} {'topk ms':>8} {'ratio':>6} {'torch ms':>9} "
          f"{'speedup':>7} {'TFLOP/s':>8}  survivors/row (mean, max) per pass", flush=True)
    for dt, n, k in cases:
        key = (dt, n)
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            q = F.normalize(torch.randn(m, d, device="cuda", generator=gen), dim=1).to(DT[dt])
            bank = torch.empty(n, d, device="cuda", dtype=DT[dt])
            for j0 in range(0, n, 1 << 20):
                j1 = min(n, j0 + (1 << 20))
                bank[j0:j1] = F.normalize(torch.randn(j1 - j0, d, device="cuda", generator=gen), dim=1).to(DT[dt])
            cache[key] = (q, bank)
        q, bank = cache[key]
        t_gemm = bench(lambda: T.gemm_only(q, bank))
        T.STATS = []
        T.topk(q, bank, k)
        stats = T.STATS
        T.STATS = None
        t_topk = bench(lambda: T.topk(q, bank, k))
        try:
            t_torch = float("nan") if a.no_torch else bench(lambda: torch_topk(q, bank, k))
        except torch.cuda.OutOfMemoryError:
            t_torch = float("nan")
        tf = 2.0 * m * n * d / (t_topk * 1e-3) / 1e12
        surv = "; ".join(f"n={s['n_view']} X={s['X']} S={s['splits']} cap={s['cap']}: "
                         f"{s['survivors_mean']:.0f},{s['survivors_max']:.0f} ovf={s['overflow_rows']}" for s in stats)
        print(f"{dt:5} {n:>8} {k:>5} {t_gemm:8.2f} {t_topk:8.2f} {t_topk / t_gemm:6.2f} {t_torch:9.2f} "
              f"{t_torch / t_topk:7.2f} {tf:8.1f}  {surv}", flush=True)
        rows.append(dict(dtype=dt, N=n, k=k, M=m, D=d, gemm_ms=t_gemm, topk_ms=t_topk, torch_ms=t_torch,
                         stats=stats))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_topk_gpu.json"), "w") as f:
            json.dump(rows, f, indent=1)




def diagnose(dt="fp16", n=2**20, ks=(16, 128, 1024)):
    """Split the time of one call (first query block) as ``topk._select`` runs it: the
    tile-maximum threshold pass over the 1/f sample, the FILTER pass with that threshold, the same
    pass with the ideal threshold (the true k-th key: the fewest survivors possible), and the
    merge of the candidates (one torch.topk per row)."""
    m, d = 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(m, d, device="cuda", generator=gen), dim=1).to(DT[dt])
    bank = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).to(DT[dt])
    qs, _ = T._prepare_queries(q, "dot", None, None)
    view, _ = T._prepare_view(bank, "dot", None, 0)
    cfg = T._config(q.device, qs.q.dtype, d, m)
    t_gemm = bench(lambda: T.gemm_only(q, bank))
    print(f"diagnose {dt} N={n}: gemm-only {t_gemm:.2f} ms", flush=True)
    for k in ks:
        rows = T._query_block_rows(m, k, cfg)
        qb = qs.rows(0, rows)
        f = T.sample_factor(k, view.n_view, cfg.BN)
        expected = 1.25 * f * k + 32
        thr = T._tilemax_threshold(qb, view.sample(f), k, "dot", cfg)
        best, _ = T._select(qb, view, k, "dot", cfg)
        ideal = best[:, k - 1].contiguous()
        t_thr = bench(lambda: T._tilemax_threshold(qb, view.sample(f), k, "dot", cfg))
        t_main = bench(lambda: T._filter(qb, view, k, "dot", cfg, thr, expected))
        t_ideal = bench(lambda: T._filter(qb, view, k, "dot", cfg, ideal, k))
        t_all = bench(lambda: T._select(qb, view, k, "dot", cfg))
        t_gemm_b = bench(lambda: T.gemm_only(q[:rows], bank))
        print(f"  k={k} rows={rows} f={f}: gemm {t_gemm_b:.2f}  threshold pass {t_thr:.2f}  filter+merge "
              f"{t_main:.2f} ({t_main / t_gemm_b:.2f}x)  with the ideal threshold {t_ideal:.2f} "
              f"({t_ideal / t_gemm_b:.2f}x)  whole block {t_all:.2f} ({t_all / t_gemm_b:.2f}x)", flush=True)


if __name__ == "__main__":
    if os.environ.get("DIAGNOSE"):
        diagnose(ks=[int(k) for k in os.environ.get("DIAGNOSE_K", "16,128,1024").split(",")])
    else:
        main()
