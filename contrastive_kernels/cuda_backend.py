"""The CUDA backend (backend="cuda"): the family ops of losses.py on the compiled kernels of
csrc/cuda (tensor-core score tiles with the online log-sum-exp fused, WarpSelect-style top-k,
mixing). Available when the extension was built with CUDA (torch with CUDA and nvcc at build time)
and a GPU is visible. See _ext.py for how the extension is found."""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._csrc_backend import lse_stats, mix, mixed_dots, mixed_lse, topk  # noqa: F401

NAME = "cuda"


def available(device: torch.device) -> Optional[str]:
    """None when usable on ``device``, else the reason it is not."""
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only (got a {device.type} device)"
    why = _ext.unavailable_reason()
    if why is not None:
        return why
    if not _ext.has_cuda_kernels():
        return ("the compiled extension has no CUDA kernels (it was built where torch had no CUDA or "
                "nvcc/CUDA_HOME was missing); rebuild on a CUDA machine with `python setup.py "
                f"build_ext --inplace`. {_ext.FALLBACK}")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def build_info() -> dict:
    return _ext.build_info()
