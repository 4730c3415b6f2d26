"""torch.library custom ops of contrastive_kernels (namespace ``contrastive_kernels``).

Triton ops (prefix ``triton_``; the compiled C++/CUDA extension registers its own ops in the same
namespace through TORCH_LIBRARY, under other names):

``contrastive_kernels::triton_lse_fwd(q, k, row_scale, col_scale?, row_bias?, col_bias?,
    gammas, exclude?, q_labels?, k_labels?, want_col_lse, row_only, row_extra?=None)
    -> (row_lse (G,B), pos_sum (B,), pos_count (B,), col_lse (N,)|(0,), row_e (B,D)|(0,D))``
    the forward of ``reference.lse_stats`` (all outputs fp32, fp64 for fp64 inputs). ``row_only``
    (only the query side needs gradients) also returns the normalized key accumulator
    row_e_i = sum_j softmax_j(l_ij) b_j k_j, which makes the backward O(B D). ``row_extra``
    (B,), one gamma: one more logit per row (InfoNCE's positive) in row_lse and in the softmax
    of row_e, with its gradient d row_lse_i / d x_i = exp(x_i - row_lse_i).
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

``contrastive_kernels::triton_lse_topk_fwd(q, k, row_scale, col_scale?, row_bias?, col_bias?,
    gammas, row_only, threshold, capacity, n_hard, row_extra?=None) -> (the 5 outputs of
    triton_lse_fwd, hard (B, n_hard) int64, inexact (B,) int32)``
    ``triton_lse_fwd`` over a queue (no exclusions, labels or column statistics) whose kernel also
    lists, per row, every column j with <q_i, k_j> >= T_i as a top-k key of triton/topk.py (score,
    then the lower column first; at most ``capacity``), and a second kernel sorts each row's list:
    ``hard`` holds the columns of the n_hard largest, in topk's order. These are the hard
    negatives of mixing from the loss's own pass (triton/mixing.py). T_i = t - 2^-7 |t| in fp32
    for t = threshold[i] (any float dtype: the threshold sample's k-th score as it comes,
    _loss_topk.sample_kth; the kernel lowers it as ``_loss_topk.lower_threshold`` would, saving
    three host ops). ``inexact`` is 1 for the rows whose list may not hold their top ``n_hard``
    (fewer than n_hard or more than capacity columns passed, or a non-finite lse): their ``hard``
    is arbitrary and the caller recomputes them. Same autograd formula as ``triton_lse_fwd``; the
    hard negatives carry no gradient.

``contrastive_kernels::triton_paired_dot(a, b) -> (n,) fp32``: <a_i, b_i> of (n, D) rows
    (fp16/bf16/fp32), products and sum in fp32, in one launch; its backward
    ``triton_paired_dot_bwd(g, a, b, want_a, want_b) -> (da, db)`` (g_i b_i and g_i a_i in the
    inputs' dtypes, (0,) where not wanted) is one launch too.

Mixing (triton/mixing.py; the synthetic points never carry a gradient):

``contrastive_kernels::triton_mix(query, negatives, hard_index, pair_index, alpha, query_index,
    query_weight) -> points (B, s+s', D)`` in the query dtype (``reference.mix_points``).
``contrastive_kernels::triton_mixed_dots_fwd(q, mix_query, negatives, hard_index, pair_index,
    alpha, query_index, query_weight) -> (u (B, s+s'), nrm (B, s+s'))`` in the accumulation dtype:
    u_it = <q_i, h_it> of the points h of ``triton_mix`` (with mix_query as the query), nrm_it the
    norm they were divided by. Its autograd formula gives q the gradient dq_i = sum_t du_it h_it
    through ``triton_mixed_dots_bwd(grad, nrm, mix_query, negatives, hard_index, pair_index,
    alpha, query_index, query_weight, q_dtype) -> dq (B, D)``; the other inputs get none.
``contrastive_kernels::triton_mixed_lse(q, mix_query, negatives, hard_index, pair_index, alpha,
    query_index, query_weight, row_scale, row_bias?, gammas, row_extra?=None) -> (lse (G,B),
    e_sum (G,B,D), u_sum (G,B))``: the synthetic logits row_scale_i u_it + row_bias_i reduced to
    their log-sum-exp per gamma, with the softmax-weighted sums of h and u; the same schema (but
    ``row_extra``) and autograd formula (``_common.mixed_lse_backward``: gradients to q,
    row_scale, row_bias, with no second pass over the points) as the C++ op ``mixed_lse``.
    ``row_extra`` (B,), one gamma: one more term e^{x_i} in row i's sum (InfoNCE: the queue's
    log-sum-exp with the positive), with gradient exp(x_i - lse_i).

This module's ``triton_*`` functions call the registered ops under torch.compile, fake tensors,
dispatch modes and functorch transforms; in plain eager mode they run the same host functions
and autograd formulas through a torch.autograd.Function (``_eager_fast``), which saves about 60 us
of custom-op dispatch per call. ``torch.ops.contrastive_kernels.*`` are always the ops.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import (extra_grad, first_order, mixed_lse_backward, mixed_lse_outputs, mixed_lse_setup_context,
                      times_gammas)

TRITON_OPS_AVAILABLE = False
TRITON_OPS_ERROR: Optional[str] = None

try:  # launches through wrap_triton run the kernel directly only with this off (triton_op does so)
    from torch._library.triton import set_wrap_triton_enabled
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    _functorch_active = torch._C._are_functorch_transforms_active
except (ImportError, AttributeError):  # pragma: no cover - other torch: every call takes the op
    set_wrap_triton_enabled = None


# CK_EAGER_FAST=0: every call through the dispatcher (the A/B of scripts/gpu_session.sh profile)
EAGER_FAST = os.environ.get("CK_EAGER_FAST", "1") != "0"


def _plain_eager(args) -> bool:
    """True when nothing traces or transforms this call: no torch.compile, no dispatch mode (fake
    tensors, functionalization, make_fx), no functorch transform, no tensor subclass."""
    if not EAGER_FAST or set_wrap_triton_enabled is None or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None or _functorch_active():
        return False
    return all(type(a) in (Tensor, torch.nn.Parameter) for a in args if isinstance(a, Tensor))


def _eager_fast(op, impl, setup_context=None, backward=None):
    """``op`` (a triton_op) as a function that, in plain eager mode, runs its host function
    ``impl`` directly, and its autograd formula (``setup_context``, ``backward``, the ones
    registered with the op) through a torch.autograd.Function. The custom-op path costs about
    60 us of host time per call on top (torch's fill_defaults walks the schema's arguments once
    per argument: 50 us for a 13-argument op), which a MoCo step pays for every op. Everything
    else (torch.compile, fake tensors, opcheck, torch.ops.contrastive_kernels.*) takes ``op``."""
    if backward is not None:
        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        function = type(f"{op._name.split('::')[-1]}_function", (torch.autograd.Function,),
                        {"forward": staticmethod(forward),
                         "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads))})

    # trailing defaults, as the dispatcher fills them for setup_context (once here, not per call)
    defaults = tuple(a.default_value for a in op._opoverload._schema.arguments)

    def call(*args):
        if not _plain_eager(args):
            return op(*args)
        if len(args) < len(defaults):
            args = args + defaults[len(args):]
        with set_wrap_triton_enabled(False):
            if backward is None:
                return impl(*args)
            return function.apply(*args)

    call.op = op
    call.__name__ = call.__qualname__ = op._name.split("::")[-1]
    call.__doc__ = f"``{op._name}`` (see the module docstring); plain eager calls skip the dispatcher."
    return call


try:
    from .triton.infonce import (backward_outputs, forward_outputs, forward_topk_outputs,
                                 lse_backward, lse_forward, lse_forward_topk, paired_dot_backward,
                                 paired_dot_forward)
    from .triton.mixing import (mix_forward, mix_outputs, mixed_dots_backward,
                                mixed_dots_forward, mixed_dots_outputs, mixed_lse_forward)
except ImportError as exc:  # triton missing: the C++ / chunked backends still work
    TRITON_OPS_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TRITON_OPS_AVAILABLE = True

if TRITON_OPS_AVAILABLE:

    @torch.library.triton_op("contrastive_kernels::triton_lse_fwd", mutates_args=())
    def triton_lse_fwd(q: Tensor, k: Tensor, row_scale: Tensor, col_scale: Optional[Tensor],
                       row_bias: Optional[Tensor], col_bias: Optional[Tensor], gammas: List[float],
                       exclude: Optional[Tensor], q_labels: Optional[Tensor],
                       k_labels: Optional[Tensor], want_col_lse: bool, row_only: bool,
                       row_extra: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor,
                                                                    Tensor, Tensor]:
        return lse_forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                           q_labels, k_labels, want_col_lse, row_only, row_extra)

    @triton_lse_fwd.register_fake
    def _triton_lse_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                             q_labels, k_labels, want_col_lse, row_only, row_extra=None):
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
         want_col_lse, row_only, row_extra) = inputs
        _save_lse_context(ctx, q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                          q_labels, k_labels, row_only, row_extra, output)

    def _save_lse_context(ctx, q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
                          q_labels, k_labels, row_only, row_extra, output):
        row_lse, _pos_sum, pos_count, col_lse, row_e = output[:5]
        ctx.gammas = [float(g) for g in gammas]
        ctx.row_only = bool(row_only)
        ctx.mark_non_differentiable(pos_count, row_e, *output[5:])  # + the keys of the topk op
        # unused outputs (most of them, most of the time) get None, not a zero-filled gradient each
        ctx.set_materialize_grads(False)
        if row_only:
            ctx.save_for_backward(q, row_scale, row_e, row_lse, row_extra)
        else:
            ctx.save_for_backward(q, k, row_scale, col_scale, row_bias, col_bias, exclude,
                                  q_labels, k_labels, row_lse, col_lse, row_extra)

    @first_order("backend='triton'")
    def _fwd_backward(ctx, d_row, d_pos, _d_count, d_col, _d_e):
        grads, d_extra = _lse_grads(ctx, d_row, d_pos, d_col, _needs(ctx, 12))
        return grads + (None,) * 6 + (d_extra,)

    def _needs(ctx, i):
        # the dispatcher drops trailing arguments left at their defaults (row_extra=None)
        return len(ctx.needs_input_grad) > i and ctx.needs_input_grad[i]

    def _extra_grad(row_extra, d_row, row_lse, wanted):
        """d row_lse_i / d row_extra_i = exp(row_extra_i - row_lse_i), times the incoming gradient."""
        if row_extra is None or d_row is None or not wanted:
            return None
        return extra_grad(d_row[0], row_extra, row_lse[0]).to(row_extra.dtype)

    def _lse_grads(ctx, d_row, d_pos, d_col, want_extra):
        """(gradients of (q, k, row_scale, col_scale, row_bias, col_bias), of row_extra)."""
        need = [bool(x) for x in ctx.needs_input_grad[:6]]
        if ctx.row_only:
            # dq_i = a_i w_i E_i, d a_i = w_i <q_i, E_i>, d c_i = w_i [row i has a column],
            # with w = dR gamma and E the normalized key accumulator of the forward pass
            q, row_scale, row_e, row_lse, row_extra = ctx.saved_tensors
            if d_row is None:
                return (None,) * 6, None
            w = times_gammas(d_row.to(row_e.dtype), ctx.gammas)[0]
            d_extra = _extra_grad(row_extra, d_row, row_lse, want_extra or need[4])
            dq = da = dc = None
            if need[0]:
                dq = ((row_scale.to(row_e.dtype) * w)[:, None] * row_e).to(q.dtype)
            if need[2]:
                da = (w * (q.to(row_e.dtype) * row_e).sum(1)).to(row_scale.dtype)
            if need[4]:  # the bias is on the columns' logits: their softmax mass, 1 - p(extra)
                dc = (torch.where(row_lse[0] > -math.inf, w, torch.zeros_like(w)) if d_extra is None
                      else w - d_extra)
            return (dq, None, da, None, dc, None), d_extra if want_extra else None
        (q, k, row_scale, col_scale, row_bias, col_bias, exclude, q_labels, k_labels, row_lse,
         col_lse, row_extra) = ctx.saved_tensors
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
        return (tuple(g if wanted else None for g, wanted in zip(grads, need)),
                _extra_grad(row_extra, d_row, row_lse, want_extra))

    triton_lse_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)

    @torch.library.triton_op("contrastive_kernels::triton_lse_topk_fwd", mutates_args=())
    def triton_lse_topk_fwd(q: Tensor, k: Tensor, row_scale: Tensor, col_scale: Optional[Tensor],
                            row_bias: Optional[Tensor], col_bias: Optional[Tensor],
                            gammas: List[float], row_only: bool, threshold: Tensor,
                            capacity: int, n_hard: int,
                            row_extra: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor,
                                                                         Tensor, Tensor, Tensor,
                                                                         Tensor]:
        return lse_forward_topk(q, k, row_scale, col_scale, row_bias, col_bias, gammas, row_only,
                                threshold, capacity, n_hard, row_extra)

    @triton_lse_topk_fwd.register_fake
    def _triton_lse_topk_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, row_only,
                                  threshold, capacity, n_hard, row_extra=None):
        return forward_topk_outputs(q, k, gammas, row_only, n_hard)

    def _topk_fwd_setup_context(ctx, inputs, output):
        (q, k, row_scale, col_scale, row_bias, col_bias, gammas, row_only, _thr, _cap, _n,
         row_extra) = inputs
        _save_lse_context(ctx, q, k, row_scale, col_scale, row_bias, col_bias, gammas, None, None,
                          None, row_only, row_extra, output)

    @first_order("backend='triton'")
    def _topk_fwd_backward(ctx, d_row, d_pos, _d_count, d_col, _d_e, _d_hard, _d_inexact):
        grads, d_extra = _lse_grads(ctx, d_row, d_pos, d_col, _needs(ctx, 11))
        return grads + (None,) * 5 + (d_extra,)

    triton_lse_topk_fwd.register_autograd(_topk_fwd_backward, setup_context=_topk_fwd_setup_context)

    @torch.library.triton_op("contrastive_kernels::triton_mix", mutates_args=())
    def triton_mix(query: Tensor, negatives: Tensor, hard_index: Tensor, pair_index: Tensor,
                   alpha: Tensor, query_index: Tensor, query_weight: Tensor) -> Tensor:
        return mix_forward(query, negatives, hard_index, pair_index, alpha, query_index,
                           query_weight)

    @triton_mix.register_fake
    def _triton_mix_fake(query, negatives, hard_index, pair_index, alpha, query_index,
                         query_weight):
        return mix_outputs(query, pair_index, query_weight)

    @torch.library.triton_op("contrastive_kernels::triton_mixed_dots_fwd", mutates_args=())
    def triton_mixed_dots_fwd(q: Tensor, mix_query: Tensor, negatives: Tensor, hard_index: Tensor,
                              pair_index: Tensor, alpha: Tensor, query_index: Tensor,
                              query_weight: Tensor) -> Tuple[Tensor, Tensor]:
        return mixed_dots_forward(q, mix_query, negatives, hard_index, pair_index, alpha,
                                  query_index, query_weight)

    @triton_mixed_dots_fwd.register_fake
    def _triton_mixed_dots_fwd_fake(q, mix_query, negatives, hard_index, pair_index, alpha,
                                    query_index, query_weight):
        return mixed_dots_outputs(q, pair_index, query_weight)

    @torch.library.triton_op("contrastive_kernels::triton_mixed_dots_bwd", mutates_args=())
    def triton_mixed_dots_bwd(grad: Tensor, nrm: Tensor, mix_query: Tensor, negatives: Tensor,
                              hard_index: Tensor, pair_index: Tensor, alpha: Tensor,
                              query_index: Tensor, query_weight: Tensor,
                              q_dtype: torch.dtype) -> Tensor:
        return mixed_dots_backward(grad, nrm, mix_query, negatives, hard_index, pair_index, alpha,
                                   query_index, query_weight, q_dtype)

    @triton_mixed_dots_bwd.register_fake
    def _triton_mixed_dots_bwd_fake(grad, nrm, mix_query, negatives, hard_index, pair_index, alpha,
                                    query_index, query_weight, q_dtype):
        return mix_query.new_empty(mix_query.shape, dtype=q_dtype)

    def _mixed_dots_setup_context(ctx, inputs, output):
        q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.q_dtype = q.dtype
        ctx.save_for_backward(output[1], mix_query, negatives, hard_index, pair_index, alpha,
                              query_index, query_weight)

    @first_order("backend='triton'")
    def _mixed_dots_backward(ctx, d_u, _d_nrm):
        dq = None
        if ctx.needs_input_grad[0] and d_u is not None:
            dq = torch.ops.contrastive_kernels.triton_mixed_dots_bwd(
                d_u.contiguous(), *ctx.saved_tensors, ctx.q_dtype)
        return (dq,) + (None,) * 7

    triton_mixed_dots_fwd.register_autograd(_mixed_dots_backward,
                                            setup_context=_mixed_dots_setup_context)

    @torch.library.triton_op("contrastive_kernels::triton_mixed_lse", mutates_args=())
    def triton_mixed_lse(q: Tensor, mix_query: Tensor, negatives: Tensor, hard_index: Tensor,
                         pair_index: Tensor, alpha: Tensor, query_index: Tensor,
                         query_weight: Tensor, row_scale: Tensor, row_bias: Optional[Tensor],
                         gammas: List[float],
                         row_extra: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        return mixed_lse_forward(q, mix_query, negatives, hard_index, pair_index, alpha,
                                 query_index, query_weight, row_scale, row_bias, gammas, row_extra)

    @triton_mixed_lse.register_fake
    def _triton_mixed_lse_fake(q, mix_query, negatives, hard_index, pair_index, alpha, query_index,
                               query_weight, row_scale, row_bias, gammas, row_extra=None):
        return mixed_lse_outputs(q, mix_query, gammas)

    triton_mixed_lse.register_autograd(mixed_lse_backward, setup_context=mixed_lse_setup_context)

    @torch.library.triton_op("contrastive_kernels::triton_paired_dot", mutates_args=())
    def triton_paired_dot(a: Tensor, b: Tensor) -> Tensor:
        return paired_dot_forward(a, b)

    @triton_paired_dot.register_fake
    def _triton_paired_dot_fake(a, b):
        return a.new_empty((a.shape[0],), dtype=torch.float32)

    @torch.library.triton_op("contrastive_kernels::triton_paired_dot_bwd", mutates_args=())
    def triton_paired_dot_bwd(g: Tensor, a: Tensor, b: Tensor, want_a: bool,
                              want_b: bool) -> Tuple[Tensor, Tensor]:
        return paired_dot_backward(g, a, b, want_a, want_b)

    @triton_paired_dot_bwd.register_fake
    def _triton_paired_dot_bwd_fake(g, a, b, want_a, want_b):
        return (torch.empty_like(a, memory_format=torch.contiguous_format) if want_a else a.new_empty((0,)),
                torch.empty_like(b, memory_format=torch.contiguous_format) if want_b else b.new_empty((0,)))

    def _paired_dot_setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    @first_order("backend='triton'")
    def _paired_dot_backward(ctx, g):
        want_a, want_b = ctx.needs_input_grad[:2]
        if g is None or not (want_a or want_b):
            return None, None
        da, db = triton_paired_dot_bwd(g, *ctx.saved_tensors, bool(want_a), bool(want_b))
        return (da if want_a else None), (db if want_b else None)

    triton_paired_dot.register_autograd(_paired_dot_backward, setup_context=_paired_dot_setup_context)

    # Plain eager calls skip the custom-op machinery: the same host function, setup_context and
    # backward run through a torch.autograd.Function (see _eager_fast).
    triton_lse_fwd = _eager_fast(triton_lse_fwd, lse_forward, _fwd_setup_context, _fwd_backward)
    triton_lse_topk_fwd = _eager_fast(triton_lse_topk_fwd, lse_forward_topk, _topk_fwd_setup_context,
                                      _topk_fwd_backward)
    triton_mixed_dots_fwd = _eager_fast(triton_mixed_dots_fwd, mixed_dots_forward,
                                        _mixed_dots_setup_context, _mixed_dots_backward)
    triton_mixed_lse = _eager_fast(triton_mixed_lse, mixed_lse_forward, mixed_lse_setup_context,
                                   mixed_lse_backward)
    triton_lse_bwd = _eager_fast(triton_lse_bwd, lse_backward)
    triton_mixed_dots_bwd = _eager_fast(triton_mixed_dots_bwd, mixed_dots_backward)
    triton_mix = _eager_fast(triton_mix, mix_forward)
    triton_paired_dot = _eager_fast(triton_paired_dot, paired_dot_forward, _paired_dot_setup_context,
                                    _paired_dot_backward)
    triton_paired_dot_bwd = _eager_fast(triton_paired_dot_bwd, paired_dot_backward)

else:  # pragma: no cover - exercised only without triton

    def triton_lse_fwd(*args, **kwargs):
        raise RuntimeError(f"the Triton ops are unavailable: {TRITON_OPS_ERROR}")

    def triton_lse_bwd(*args, **kwargs):
        raise RuntimeError(f"the Triton ops are unavailable: {TRITON_OPS_ERROR}")

    triton_lse_topk_fwd = triton_mix = triton_mixed_dots_fwd = triton_mixed_dots_bwd = triton_lse_bwd
    triton_mixed_lse = triton_paired_dot = triton_paired_dot_bwd = triton_lse_bwd


__all__ = ["TRITON_OPS_AVAILABLE", "TRITON_OPS_ERROR", "triton_lse_fwd", "triton_lse_bwd",
           "triton_lse_topk_fwd", "triton_mix", "triton_mixed_dots_fwd", "triton_mixed_dots_bwd",
           "triton_mixed_lse", "triton_paired_dot", "triton_paired_dot_bwd"]
