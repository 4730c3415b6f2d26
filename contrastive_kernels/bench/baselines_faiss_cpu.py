"""FAISS's exact inner-product flat index (faiss-cpu) as a top-k candidate on the CPU.

The index is built from the same unit-norm bank as the library's step (inner product = the
"dot" similarity of topk_similarity) outside the timed step; search runs on torch's thread count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cases import DTYPES, register_baseline


@register_baseline("faiss_cpu", ops=("topk",))
def build_faiss_cpu(c, device):
    if not str(device).startswith("cpu") or DTYPES[c.dtype] != torch.float32:
        return None
    try:
        import faiss
    except ImportError as exc:  # reported in the row's note
        raise RuntimeError(f"faiss is not installed ({exc}); pip install faiss-cpu") from exc
    d = c.dims
    gen = torch.Generator().manual_seed(0)  # the same draws as cases.build_step
    q = F.normalize(torch.randn(d["M"], d["D"], generator=gen), dim=1).numpy()
    bank = F.normalize(torch.randn(d["N"], d["D"], generator=gen), dim=1).numpy()
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(d["D"])
    index.add(bank)
    del bank
    k = d["k"]
    return lambda: index.search(q, k)
