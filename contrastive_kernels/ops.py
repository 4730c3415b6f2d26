"""torch.library custom ops of contrastive_kernels (namespace ``contrastive_kernels``).

Triton ops (prefix ``triton_``; the compiled C++/CUDA extension registers its own ops in the same
namespace through TORCH_LIBRARY, under other names):

``contrastive_kernels::triton_lse_fwd(q, k, row_scale, col_scale?, row_bias?, col_bias?,
    gammas, exclude?, q_labels?, k_labels?, want_col_lse, row_only)
    -> (row_lse (G,B), pos_sum (B,), pos_count (B,), col_lse (N,)|(0,), row_e (B,D)|(0,D))``
    the forward of ``reference.lse_stats`` (all outputs fp32, fp64 for fp64 inputs). ``row_only``
    (only the query side needs gradients) also returns the normalized key accumulator
    row_e_i = sum_j softmax_j(l_ij) b_j k_j, which makes the backward O(B D).
``contrastive_kernels::triton_lse_bwd(d_row, d_pos, d_col, q, k, row_scale, col_scale?,
    row_bias?, col_bias?, gammas, exclude?, q_labels?, k_labels?, row_lse, col_lse, need, fused)
    -> (dq, dk, d_row_scale, d_col_scale, d_row_bias, d_col_bias)``
    the recompute backward; gradients not in ``need`` come back as empty (0,) tensors.

Both are ``torch.library.triton_op``s: ``torch.compile(fullgraph=True)`` traces into them and sees
the Triton kernels (launched through ``wrap_triton``). Their fake kernels (shapes and dtypes only,
no launch) are registered explicitly, so FakeTensorMode works on any device. The autograd formula
of ``triton_lse_fwd`` is registered with ``register_autograd``: the row-only backward is a few
O(B D) torch ops; otherwise it calls ``triton_lse_bwd``, fused (dQ and dK from one recompute, fp32
atomics) unless ``torch.use_deterministic_algorithms(True)`` asks for reproducible sums.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

TRITON_OPS_AVAILABLE = False
TRITON_OPS_ERROR: Optional[str] = None

try:
    from .triton.infonce import backward_outputs, forward_outputs, lse_backward, lse_forward
except ImportError as exc:  # triton missing: the C++ / chunked backends still work
    TRITON_OPS_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TRITON_OPS_AVAILABLE = True

if TRITON_OPS_AVAILABLE:

    @torch.library.triton_op("contrastive_kernels::triton_lse_fwd", mutates_args=())
    def triton_lse_fwd(q: Tensor, k: Tensor, row_scale: Tensor, col_scale: Optional[Tensor],
                       row_bias: Optional[Tensor], col_bias: Optional[Tensor], gammas: List[float],
                       exclude: Optional[Tensor], q_labels: Optional[Tensor],
                       k_labels: Optional[Tensor], want_col_lse: bool,
                       row_only: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return lse_forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                           q_labels, k_labels, want_col_lse, row_only)

    @triton_lse_fwd.register_fake
    def _triton_lse_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                             q_labels, k_labels, want_col_lse, row_only):
        return forward_outputs(q, k, gammas, want_col_lse, row_only)

    @torch.library.triton_op("contrastive_kernels::triton_lse_bwd", mutates_args=())
    def triton_lse_bwd(d_row: Tensor, d_pos: Tensor, d_col: Tensor, q: Tensor, k: Tensor,
                       row_scale: Tensor, col_scale: Optional[Tensor], row_bias: Optional[Tensor],
                       col_bias: Optional[Tensor], gammas: List[float], exclude: Optional[Tensor],
                       q_labels: Optional[Tensor], k_labels: Optional[Tensor], row_lse: Tensor,
                       col_lse: Tensor, need: List[bool],
                       fused: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return lse_backward(d_row, d_pos, d_col, q, k, row_scale, col_scale, row_bias, col_bias,
                            gammas, exclude, q_labels, k_labels, row_lse, col_lse, need, fused)

    @triton_lse_bwd.register_fake
    def _triton_lse_bwd_fake(d_row, d_pos, d_col, q, k, row_scale, col_scale, row_bias, col_bias,
                             gammas, exclude, q_labels, k_labels, row_lse, col_lse, need, fused):
        return backward_outputs(q, k, row_scale, col_scale, row_bias, col_bias, need)

    def _fwd_setup_context(ctx, inputs, output):
        (q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
         want_col_lse, row_only) = inputs
        row_lse, _pos_sum, pos_count, col_lse, row_e = output
        ctx.gammas = [float(g) for g in gammas]
        ctx.row_only = bool(row_only)
        ctx.mark_non_differentiable(pos_count, row_e)
        if row_only:
            ctx.save_for_backward(q, row_scale, row_e, row_lse)
        else:
            ctx.save_for_backward(q, k, row_scale, col_scale, row_bias, col_bias, exclude,
                                  q_labels, k_labels, row_lse, col_lse)

    def _fwd_backward(ctx, d_row, d_pos, _d_count, d_col, _d_e):
        need = [bool(x) for x in ctx.needs_input_grad[:6]]
        none6 = (None,) * 6
        if ctx.row_only:
            # dq_i = a_i w_i E_i, d a_i = w_i <q_i, E_i>, d c_i = w_i [row i has a column],
            # with w = dR gamma and E the normalized key accumulator of the forward pass
            q, row_scale, row_e, row_lse = ctx.saved_tensors
            w = d_row[0].to(row_e.dtype) * ctx.gammas[0]
            dq = da = dc = None
            if need[0]:
                dq = ((row_scale.to(row_e.dtype) * w)[:, None] * row_e).to(q.dtype)
            if need[2]:
                da = (w * (q.to(row_e.dtype) * row_e).sum(1)).to(row_scale.dtype)
            if need[4]:
                dc = torch.where(row_lse[0] > -math.inf, w, torch.zeros_like(w))
            return (dq, None, da, None, dc, None) + none6
        (q, k, row_scale, col_scale, row_bias, col_bias, exclude, q_labels, k_labels, row_lse,
         col_lse) = ctx.saved_tensors
        if d_pos is None:
            d_pos = torch.zeros_like(row_lse[0])
        if d_col is None:
            d_col = torch.zeros_like(col_lse)
        if d_row is None:
            d_row = torch.zeros_like(row_lse)
        fused = not torch.are_deterministic_algorithms_enabled()
        grads = torch.ops.contrastive_kernels.triton_lse_bwd(
            d_row, d_pos, d_col, q, k, row_scale, col_scale, row_bias, col_bias, ctx.gammas,
            exclude, q_labels, k_labels, row_lse, col_lse, need, fused)
        return tuple(g if wanted else None for g, wanted in zip(grads, need)) + none6

    triton_lse_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)

else:  # pragma: no cover - exercised only without triton

    def triton_lse_fwd(*args, **kwargs):
        raise RuntimeError(f"the Triton ops are unavailable: {TRITON_OPS_ERROR}")

    def triton_lse_bwd(*args, **kwargs):
        raise RuntimeError(f"the Triton ops are unavailable: {TRITON_OPS_ERROR}")


__all__ = ["TRITON_OPS_AVAILABLE", "TRITON_OPS_ERROR", "triton_lse_fwd", "triton_lse_bwd"]
