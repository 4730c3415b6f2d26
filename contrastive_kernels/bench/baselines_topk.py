"""Outside candidates for the top-k cases (op "topk" and "topk_host"), registered with the harness:

- ``torch-topk``: what a user writes without this library: the bank in column chunks,
  ``torch.mm`` in the input dtype (tensor cores, cuBLAS) and ``torch.topk`` per chunk, merged
  with a running top-k. The chunk is the largest whose (M x chunk) scores fit a 2 GiB budget.
- ``gemm-only``: the Triton top-k kernel's own tiles with the selection replaced by a running
  row maximum: the GEMM floor that the fused selection is measured against.
- ``faiss-gpu``: FAISS's brute-force GPU search (``faiss.knn_gpu``, the engine behind
  ``GpuIndexFlatIP``/``GpuIndexFlatL2``) on the same torch tensors, when a FAISS build with GPU
  support imports; fp32 and fp16 inputs (no bf16). Not on the project's GPU machine (torch 2.11 +
  CUDA 13, no package index): faiss-gpu-cu13-cuvs (cp312, 81 MB) is the only CUDA 13 build and
  also needs the libcuvs/libraft/librmm-cu13 wheels; faiss-gpu / faiss-gpu-cu12 need the CUDA 12
  runtime and cuBLAS wheels. Without it the row's note says why.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .cases import DTYPES, Case, register_baseline

_SCORE_BUDGET = 2 << 30


def _inputs(c: Case, device: str):
    d = c.dims
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[c.dtype]
    q = F.normalize(torch.randn(d["M"], d["D"], generator=gen), dim=1).to(device=device, dtype=dtype)
    if c.op == "topk_host":
        from .cases import host_bank

        return q, host_bank(d["N"], d["D"], dtype, device), d["k"]
    bank = _bank(d["N"], d["D"], dtype, device, gen)
    return q, bank, d["k"]


def _bank(n, dim, dtype, device, gen, rows=1 << 20, pinned=False):
    """Unit rows, built in slices (a 50M-row host bank never exists in fp32)."""
    bank = torch.empty((n, dim), dtype=dtype, device=device, pin_memory=pinned)
    for j0 in range(0, n, rows):
        j1 = min(n, j0 + rows)
        bank[j0:j1] = F.normalize(torch.randn(j1 - j0, dim, generator=gen), dim=1).to(dtype)
    return bank


def torch_topk(q, bank, k):
    """Chunked torch.mm + torch.topk with a running merge (bank chunks copied to q's device)."""
    m = q.shape[0]
    chunk = max(k, min(bank.shape[0], _SCORE_BUDGET // (4 * m)))
    best_v = best_i = None
    for j0 in range(0, bank.shape[0], chunk):
        b = bank[j0:j0 + chunk].to(q.device, non_blocking=True)
        v, i = torch.topk(q @ b.T, min(k, b.shape[0]), dim=1)
        i = i + j0
        if best_v is None:
            best_v, best_i = v, i
        else:
            v, pos = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
            best_i = torch.cat([best_i, i], 1).gather(1, pos)
            best_v = v
    return best_v, best_i


@register_baseline("torch-topk", ops=("topk", "topk_host"))
def _torch_topk(c: Case, device: str):
    q, bank, k = _inputs(c, device)
    return lambda: torch_topk(q, bank, k)


@register_baseline("gemm-only", ops=("topk",))
def _gemm_only(c: Case, device: str):
    if not device.startswith("cuda"):
        return None
    topk = importlib.import_module("contrastive_kernels.triton.topk")
    q, bank, _ = _inputs(c, device)
    return lambda: topk.gemm_only(q, bank)


def faiss_gpu_available():
    """None when FAISS with GPU support imports, else why not."""
    try:
        import faiss
    except ImportError as exc:
        return f"faiss does not import ({exc})"
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return "faiss has no GPU support here (faiss-cpu, or no GPU visible to it)"
    return None


@register_baseline("faiss-gpu", ops=("topk",))
def _faiss_gpu(c: Case, device: str):
    if not device.startswith("cuda") or c.dtype == "bf16":
        return None
    why = faiss_gpu_available()
    if why is not None:  # reported in the row's note
        raise RuntimeError(why)
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch tensors)

    q, bank, k = _inputs(c, device)
    res = faiss.StandardGpuResources()
    return lambda: faiss.knn_gpu(res, q, bank, k, metric=faiss.METRIC_INNER_PRODUCT)
