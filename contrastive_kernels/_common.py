"""Small pieces shared by the spec and every backend: option names, the Mixing config, the
random draws of hard-negative mixing, and label bitsets.

Nothing here depends on a backend, so `reference.py` and the streaming backends consume the very
same random draws and label encodings.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SIMILARITIES = ("dot", "cosine", "l2")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "chunked", "triton", "cuda", "cpu")
GROUP_STRATEGIES = ("gather", "ring")  # how group= reaches the other ranks' keys (distributed.py)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORM_EPS = 1e-12  # the eps of torch.nn.functional.normalize: x / max(||x||, eps)


def first_order(what: str, instead: str = "backend='reference'"):
    """Decorates every fused backward formula: they call kernels with no derivative of their own,
    so a second derivative through them would be silently wrong. When autograd asks for a graph
    of the gradient (``create_graph=True``: the engine runs backward with grad mode on), the
    gradients are still returned (right as first derivatives: a penalty that does not
    differentiate them again is fine), but through a node that raises if a second backward
    reaches it. torch's once_differentiable does this only when the incoming gradients require
    grad, and its node hangs off fresh leaves, which a second ``autograd.grad(..., inputs)`` never
    visits: here the node also takes the saved tensors that are in the graph. Tracing
    (torch.compile, fake tensors) and functorch transforms are left alone. The error names
    ``what`` and, as ``instead``, what has second derivatives."""
    message = (f"contrastive_kernels: {what} has first derivatives only, and a second backward "
               f"(a graph of its gradient, create_graph=True) reached it; use {instead} "
               "for second derivatives").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def first_order_backward(*args):
            if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
                    or _get_current_dispatch_mode() is not None or torch._C._are_functorch_transforms_active()):
                return backward(*args)
            with torch.no_grad():
                grads = backward(*args)
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            flagged = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) and g.is_floating_point() else g
                       for g in grads]
            # the node must lie on the second backward's path to the inputs: give it the saved
            # tensors that are in the graph as inputs too (their outputs are dropped)
            ctx = next(a for a in args if hasattr(a, "saved_tensors"))
            anchors = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            out = torch._C._functions.DelayedError(message, len(flagged) + len(anchors))(*flagged, *anchors)
            out = out if isinstance(out, tuple) else (out,)
            return out[0] if single else tuple(out[:len(flagged)])

        return first_order_backward

    return decorate


class TopK(NamedTuple):
    """What ``topk_similarity`` returns: ``values`` (M, k) and int64 ``indices`` (M, k)."""

    values: "torch.Tensor"
    indices: "torch.Tensor"


@dataclasses.dataclass(frozen=True)
class Mixing:
    """MoCHi hard-negative mixing, the config for ``info_nce(mixing=...)``.

    For each query row, take its ``n_hard`` most similar queue rows (by dot product, as
    ``topk_similarity`` defaults to), then synthesize ``n_synthetic`` points
    ``normalize(a*n_x + (1-a)*n_y)`` (a ~ U(0,1)) and ``n_query_synthetic`` points
    ``normalize(b*q + (1-b)*n_y)`` (b ~ U(0, 0.5)) and use them as extra negatives without a
    gradient. ``generator`` (a ``torch.Generator``) makes the draws reproducible; see
    ``draw_mixing`` for the order in which they are taken.
    """

    n_hard: int
    n_synthetic: int
    n_query_synthetic: int = 0
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        for name in ("n_hard", "n_synthetic", "n_query_synthetic"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Mixing.{name} must be an int, got {type(value).__name__}")
            object.__setattr__(self, name, int(value))  # a numpy int too (frozen dataclass)
        if self.n_hard < 1:
            raise ValueError(f"Mixing.n_hard must be >= 1, got {self.n_hard}")
        if self.n_synthetic < 0 or self.n_query_synthetic < 0:
            raise ValueError(
                "Mixing.n_synthetic and Mixing.n_query_synthetic must be >= 0, got "
                f"{self.n_synthetic} and {self.n_query_synthetic}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(
                f"Mixing.generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    @property
    def n_total(self) -> int:
        return self.n_synthetic + self.n_query_synthetic


@dataclasses.dataclass(frozen=True)
class MixingDraws:
    """The random numbers of one mixing call, on the query's device.

    pair_index (B, s, 2) and query_index (B, s') are positions into a row of ``hard_index``
    (0 <= position < n_hard); alpha (B, s) ~ U(0, 1); query_weight (B, s') ~ U(0, 0.5).
    """

    pair_index: torch.Tensor
    alpha: torch.Tensor
    query_index: torch.Tensor
    query_weight: torch.Tensor


def draw_mixing(batch: int, n_hard: int, n_synthetic: int, n_query_synthetic: int,
                generator: Optional[torch.Generator], device: torch.device) -> MixingDraws:
    """Draw the random numbers of hard-negative mixing, in the documented order.

    The contract, shared by every backend: on the generator's device (the default generator of
    ``device`` when ``generator`` is None), first ONE call
    ``torch.randint(0, n_hard, (batch, 2*s + s'), generator=g)`` whose columns are
    [x positions (s) | y positions (s) | query-mix y positions (s')], then ONE call
    ``torch.rand((batch, s + s'), generator=g)`` whose columns are [a (s) | 2*b (s')]. The draws are
    then moved to ``device``. A CPU generator therefore gives the same synthetic points whether the
    query lives on the CPU or a GPU.
    """
    s, sq = n_synthetic, n_query_synthetic
    gen_device = generator.device if generator is not None else torch.device(device)
    idx = torch.randint(0, n_hard, (batch, 2 * s + sq), generator=generator, device=gen_device)
    uni = torch.rand((batch, s + sq), generator=generator, device=gen_device, dtype=torch.float32)
    idx, uni = idx.to(device), uni.to(device)
    return MixingDraws(
        # views into the two draws (no copies): pair_index[i, t] = (idx[i, t], idx[i, s + t])
        pair_index=idx[:, :2 * s].unflatten(1, (2, s)).transpose(1, 2),
        alpha=uni[:, :s],
        query_index=idx[:, 2 * s:],
        query_weight=uni[:, s:] * 0.5,
    )


def pack_multi_hot(labels: torch.Tensor) -> torch.Tensor:
    """(B, C) multi-hot labels (nonzero = has the label) -> (B, ceil(C/64)) int64 bitsets.

    Two rows share a label iff ``(bits_a & bits_b) != 0`` in some word; kernels test that instead
    of forming a B x B label-overlap matrix.
    """
    b, c = labels.shape
    words = max(1, (c + 63) // 64)
    hot = torch.zeros(b, words * 64, dtype=torch.int64, device=labels.device)
    hot[:, :c] = (labels != 0).to(torch.int64)
    shifts = torch.arange(64, device=labels.device, dtype=torch.int64)
    # distinct powers of two: their sum is their bitwise OR (bit 63 wraps to the sign, harmlessly)
    return (hot.view(b, words, 64) << shifts).sum(-1)


def query_side_only(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None) -> bool:
    """lse_stats' row-only rule: only the query side needs a gradient (a queue, a frozen bank), so
    the forward can keep the softmax-weighted key sums and backward is O(B D)."""
    key_side = any(t is not None and t.requires_grad for t in (k, col_scale, col_bias))
    query_side = any(t is not None and t.requires_grad for t in (q, row_scale, row_bias))
    return torch.is_grad_enabled() and query_side and not key_side


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and losses are kept in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(acc_dtype(x.dtype))


# ------------------------------------------------------------------------------------------------
# the autograd formula of the mixed_lse ops (C++ ``mixed_lse``, Triton ``triton_mixed_lse``): both
# take (q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight,
# row_scale, row_bias, gammas) and return (lse (G,B), e_sum (G,B,D), u_sum (G,B))
# ------------------------------------------------------------------------------------------------


def mixed_lse_outputs(q, mix_query, gammas):
    """Empty outputs (lse (G,B), e_sum (G,B,D), u_sum (G,B)) in the accumulation dtype: the
    ops' fake kernels, and the Triton op's output buffers."""
    acc = acc_dtype(mix_query.dtype)
    g, (b, d) = len(gammas), mix_query.shape
    return (q.new_empty((g, b), dtype=acc), q.new_empty((g, b, d), dtype=acc),
            q.new_empty((g, b), dtype=acc))


def times_gammas(d: torch.Tensor, gammas) -> torch.Tensor:
    """d (G, B) with row g times gammas[g]: Python scalars (a tensor of them would be a blocking
    host-to-device copy per step), and a gamma of 1 is no multiply (one gamma of 1: a view of d)."""
    rows = [d[g] if gamma == 1.0 else d[g] * gamma for g, gamma in enumerate(gammas)]
    return torch.stack(rows) if len(rows) > 1 else rows[0][None]


def extra_grad(w0: torch.Tensor, row_extra: torch.Tensor, lse0: torch.Tensor) -> torch.Tensor:
    """dL/dx_i = w_i e^{x_i - lse_i} for a row_extra x (one more term e^{x_i} of lse_i; w = dL/dlse)."""
    return w0 * (row_extra.to(lse0.dtype) - lse0).exp()


def mixed_lse_setup_context(ctx, inputs, output):
    q, row_scale, row_bias, gammas = inputs[0], inputs[8], inputs[9], inputs[10]
    row_extra = inputs[11] if len(inputs) > 11 else None  # the Triton op's (C++: no such input)
    lse, e_sum, u_sum = output
    ctx.gammas = tuple(float(g) for g in gammas)
    ctx.dtypes = (q.dtype, row_scale.dtype, None if row_bias is None else row_bias.dtype)
    ctx.mark_non_differentiable(e_sum, u_sum)
    ctx.set_materialize_grads(False)  # e_sum and u_sum get None, not zero-filled gradients
    ctx.save_for_backward(row_scale, lse, e_sum, u_sum, row_extra)


@first_order("the fused MoCHi (mixed_lse)")
def mixed_lse_backward(ctx, d_lse, _d_e, _d_u):
    """lse_gi = log sum_t e^{gamma_g l_it}, l_it = a_i <q_i, h_it> + c_i (h constant), with the
    forward's softmax-weighted sums e_gi = sum_t p_git h_it and su_gi = sum_t p_git u_it:
    dq_i = a_i sum_g w_gi e_gi, da_i = sum_g w_gi su_gi, dc_i = sum_g w_gi, where w = d_lse gamma
    (rows with no point, lse = -inf, get nothing). With a row_extra x (one gamma, a term e^{x_i}
    of the sum): dx_i = w_i e^{x_i - lse_i}, and dc_i = w_i - dx_i (the points' share)."""
    need = ctx.needs_input_grad
    row_scale, lse, e_sum, u_sum, row_extra = ctx.saved_tensors
    acc = lse.dtype
    if d_lse is None:  # (12 gradients: the C++ op's 11 inputs and a trailing None are fine too)
        return (None,) * 12
    w = times_gammas(d_lse.to(acc), ctx.gammas)
    sum_g = lambda x: x[0] if x.shape[0] == 1 else x.sum(0)  # noqa: E731 - no copy for one gamma
    dq = da = dc = None
    # rows with no point have e_sum = u_sum = 0 (every kernel): only dc needs them masked
    if need[0]:
        dq = (row_scale.to(acc)[:, None] * sum_g(w[..., None] * e_sum)).to(ctx.dtypes[0])
    if need[8]:
        da = sum_g(w * u_sum).to(ctx.dtypes[1])
    want_extra = row_extra is not None and len(need) > 11 and need[11]
    d_extra = None
    if row_extra is not None and (want_extra or need[9]):
        d_extra = extra_grad(w[0], row_extra, lse[0])
    if need[9]:
        dc = (sum_g(w.masked_fill(lse == float("-inf"), 0.0)) if d_extra is None
              else w[0] - d_extra).to(ctx.dtypes[2])
    d_extra = d_extra.to(row_extra.dtype) if want_extra else None
    return (dq,) + (None,) * 7 + (da, dc, None, d_extra)
