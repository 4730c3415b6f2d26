"""What a CPU benchmark figure depends on, checked by hand: the CPU generation, the FMA peak of the
cpu kernels per instruction set, torch.mm's rate, the MoCo step of backend="cpu" and the code path
MKL takes. Output: benchmarks/results/cpu-topk-2026-11-24/machine.md.

    python scripts/cpu_machine_check.py
"""
import subprocess
import sys
import time

import torch

import contrastive_kernels as ck
from contrastive_kernels import _ext
from contrastive_kernels.bench.measure import matmul_tflops
from contrastive_kernels.bench.report import _cpu_model

print("cpu:", _cpu_model())
print("torch", torch.__version__, "threads", torch.get_num_threads())
for isa in ("avx512", "avx2", "generic"):
    if _ext.set_cpu_isa(isa):
        p = _ext.cpu_fma_peak(0.5)
        print(f"fma probe {isa}: {p['gflops']:.0f} GFLOP/s on {p['threads']} threads, "
              f"{p['gflops_one_thread']:.0f} on one (check {p['check']:.3f})")
_ext.set_cpu_isa("auto")
rates = [1e3 * matmul_tflops("cpu", "fp32", 2048, 2048, 2048, repeats=10) for _ in range(3)]
print("torch.mm 2048^3 fp32 GFLOP/s:", " ".join(f"{r:.0f}" for r in rates))
torch.manual_seed(0)
B, K, D = 256, 65536, 128
F = torch.nn.functional
q = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
k, bank = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(K, D), dim=1)
def step():
    ck.info_nce(q, k, bank, temperature=0.07, backend="cpu").backward()
for _ in range(3):
    step()
ts = []
for _ in range(15):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
ms = sorted(ts)[7] * 1e3
print(f"MoCo B=256 K=65536 D=128 fp32 backend=cpu fwd+bwd: median {ms:.1f} ms = "
      f"{4 * B * K * D / ms / 1e6:.0f} GFLOP/s of real 4BKD work")
out = subprocess.run([sys.executable, "-c", "import torch; a=torch.randn(64,64); a@a"],
                     env={"MKL_VERBOSE": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True).stdout
print("MKL_VERBOSE:", out.splitlines()[0] if out else "(nothing)")
