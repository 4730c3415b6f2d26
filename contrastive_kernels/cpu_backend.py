"""The C++ CPU backend (backend="cpu"): the family ops of losses.py on the compiled kernels of
csrc/cpu (tiled GEMM with the log-sum-exp fused into each tile, top-k with per-row bounded
selection, mixing), threaded with at::parallel_for and vectorized for the CPU's instruction set
(AVX-512, AVX2 or portable code, chosen at run time). See _ext.py for how the extension is found
and csrc/cpu/*.h for the kernels."""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._csrc_backend import lse_stats, lse_stats_topk, mix, mixed_dots, mixed_lse, topk  # noqa: F401

NAME = "cpu"


def available(device: torch.device) -> Optional[str]:
    """None when usable on ``device``, else the reason it is not."""
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors only (got a {device.type} device)"
    return _ext.unavailable_reason()


def build_info() -> dict:
    return _ext.build_info()
