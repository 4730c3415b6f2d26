"""Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier", the ``inf-cl`` package) as a benchmark
candidate for the symmetric CLIP loss: ``--backends ...,infcl``.

Inf-CL computes one direction of the contrastive loss with tiled Triton kernels (``cal_inf_loss``;
on one GPU, without torch.distributed, it runs its ``_cal_flash_loss``: the features are upcast to
fp32, viewed as heads of ``head_dim`` features, and the log-sum-exp and its gradient are computed
tile by tile). The symmetric loss is the mean of both directions, as in Inf-CLIP's training code:

    0.5 * (cal_inf_loss(s * image, text) + cal_inf_loss(s * text, image))

The logit scale multiplies the features outside (its own ``scale=`` argument wraps the scale in a
gradient all-reduce that needs an initialized process group). ``head_dim`` must be a power of two
dividing D (their kernels do not mask the feature dim): the largest of 256..16 that does.

Install without touching torch: ``pip install --no-deps inf-cl`` (it needs only triton and numpy),
or offline ``pip install --no-deps --no-index --target DIR inf_cl-1.2.1-py3-none-any.whl`` and put
DIR on PYTHONPATH.
"""
from __future__ import annotations

import torch

from .cases import DTYPES, Case, _train_step, _unit, register_baseline


def _head_dim(d: int):
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    return None


@register_baseline("infcl", ops=("clip",))
def infcl_clip(c: Case, device: str):
    if not device.startswith("cuda"):
        raise RuntimeError("inf-cl runs on CUDA only")
    try:
        from inf_cl import cal_inf_loss
    except ImportError as exc:
        raise RuntimeError(f"inf-cl is not installed ({exc}); pip install --no-deps inf-cl") from exc
    d = c.dims
    head_dim = _head_dim(d["D"])
    if head_dim is None:
        raise RuntimeError(f"inf-cl needs D divisible by a power of two >= 16, got D={d['D']}")
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[c.dtype]
    img = _unit(d["N"], d["D"], gen, dtype, device, True)
    txt = _unit(d["N"], d["D"], gen, dtype, device, True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    labels = torch.arange(d["N"], device=device)

    def forward():
        s = scale.to(img.dtype)
        return 0.5 * (cal_inf_loss(s * img, txt, labels, head_dim=head_dim)
                      + cal_inf_loss(s * txt, img, labels, head_dim=head_dim))

    return _train_step(forward, [img, txt, scale])
