"""Every loss written once, over the backend's streaming op.

A fused backend implements four family ops (see ``reference.lse_stats`` for the spec of the
first one); this module turns them into the public losses, so that the formulas live in one place
and autograd carries the gradients of everything that is cheap (temperature / logit_scale, the
cosine and l2 transforms, the own logits of positives and extra negatives):

- ``lse_stats(q, k, row_scale, col_scale, row_bias, col_bias, *, gammas, exclude, q_labels,
  k_labels, want_col_lse)`` -> (row_lse (G,B), pos_sum (B,), pos_count (B,), col_lse (N,))
- ``topk(query, bank, k, *, similarity, exclude_index, query_labels, bank_labels)``
  -> (values fp32 (M,k), indices int64 (M,k)); exclude_index is (M,) or (M, E), -1 = none
- ``mix(query, negatives, hard_index, draws)`` -> synthetic points (B, s+s', D)
- ``mixed_dots(q, mix_query, negatives, hard_index, draws)`` -> <q_i, h_it> (B, s+s') fp32 with
  h = mix(mix_query, negatives, hard_index, draws), with a gradient to q only (the synthetic
  points are constants, as in MoCHi)

Optional (mixing uses them when the backend module has them):
- ``lse_stats_topk(q, k, row_scale, col_scale, row_bias, col_bias, *, gammas, n_hard)``
  -> (row_lse (G,B), hard (B, n_hard) int64): ``lse_stats(...)[0]`` over a queue and exactly
  ``topk(q.detach(), k.detach(), n_hard, similarity="dot").indices``, in one pass over the queue
  (_loss_topk.py; triton, cpu); else ``lse_stats`` and ``topk``
- ``mixed_lse(q, mix_query, negatives, hard_index, draws, row_scale, row_bias, *, gammas)``
  -> (G,B): log sum_t exp(gamma_g (row_scale_i u_it + row_bias_i)) with u = mixed_dots(...), whose
  backward needs no second gather of the points (triton, cpu); else ``mixed_dots`` and torch ops

Similarities become the affine form of ``lse_stats``, l_ij = a_i b_j <q_i,k_j> + c_i + d_j, with
scale = 1/T (or CLIP's logit_scale):
  dot:    a = scale,               b = 1
  cosine: a = scale / |q_i|,       b = 1 / |k_j|
  l2:     a = 2 scale, c = -scale |q_i|^2, d = -scale |k_j|^2     (-|q-k|^2 expanded)
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from . import reference
from ._common import NORM_EPS, Mixing, acc_dtype, draw_mixing, first_order, pack_multi_hot, to_acc


class Side(NamedTuple):
    """One side's terms of the affine logit form: scale (n,) fp32 and bias (n,) fp32 or None."""

    scale: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    return _paired_dot(x, x)


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    # clamp before the square root: rows shorter than NORM_EPS get gradient 0, not 0 * inf
    return 1.0 / _sq_norm(x).clamp(min=NORM_EPS ** 2).sqrt()


def row_side(x: torch.Tensor, similarity: str, scale: torch.Tensor) -> Side:
    """The query side carries the temperature: a = scale (x 1/|q| for cosine, x 2 for l2)."""
    n = x.shape[0]
    if similarity == "dot":
        return Side(scale.expand(n).contiguous(), None)
    if similarity == "cosine":
        return Side(scale * _inv_norm(x), None)
    return Side((2 * scale).expand(n).contiguous(), -scale * _sq_norm(x))


def col_side(x: torch.Tensor, similarity: str, scale: torch.Tensor) -> Side:
    if similarity == "dot":
        return Side(None, None)
    if similarity == "cosine":
        return Side(_inv_norm(x), None)
    return Side(None, -scale * _sq_norm(x))


# rows per chunk of _PairedDot's fp32 temporaries: about 32 MiB at D = 128
_PAIRED_CHUNK_ELEMENTS = 1 << 23


class _PairedDot(torch.autograd.Function):
    """<a_i, b_i> (B,) in fp32 for fp16/bf16 rows (B, D), saving only a and b for backward: the fp32
    copies and products are formed a chunk of rows at a time (forward: sum_d a_id b_id; backward:
    da_i = g_i b_i, db_i = g_i a_i, each rounded to its input's dtype). With plain autograd the fp32
    copies of both sides would live until backward (CLIP at N = 65536, D = 512: 256 MiB)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _by_row_chunks(a, lambda i, j: (a[i:j].float() * b[i:j].float()).sum(-1), torch.float32)

    @staticmethod
    @first_order("the fused backends' positive logits")
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        want_a, want_b = ctx.needs_input_grad[:2]
        scaled = lambda x: lambda i, j: g[i:j, None].float() * x[i:j].float()  # noqa: E731
        return (_by_row_chunks(a, scaled(b), a.dtype) if want_a else None,
                _by_row_chunks(b, scaled(a), b.dtype) if want_b else None)


def _by_row_chunks(x: torch.Tensor, part, dtype: torch.dtype) -> torch.Tensor:
    """``part(i, j)`` over row chunks of x (about _PAIRED_CHUNK_ELEMENTS fp32 values each), in one
    tensor of ``dtype``; a single chunk (the usual case) needs no output buffer and no copies."""
    n = x.shape[0]
    step = max(1, _PAIRED_CHUNK_ELEMENTS // max(1, x.shape[-1]))
    if step >= n:
        return part(0, n).to(dtype)
    out = None
    for i in range(0, n, step):
        j = min(i + step, n)
        chunk = part(i, j)
        if out is None:
            out = chunk.new_empty((n, *chunk.shape[1:]), dtype=dtype)
        out[i:j] = chunk
    return out


def _paired_dot(a: torch.Tensor, b: torch.Tensor, ops=None) -> torch.Tensor:
    """<a_i, b_i> in the accumulation dtype, for (B, D) x (B, D); by the backend's ``paired_dot``
    (one launch each way) where it has one for this dtype."""
    fused = getattr(ops, "paired_dot", None)
    if (fused is not None and a.dtype == b.dtype and a.dtype in ops.PAIRED_DOT_DTYPES
            and a.device == b.device and not torch.compiler.is_compiling()):
        return fused(a, b)
    if a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype \
            and not torch.compiler.is_compiling():
        return _PairedDot.apply(a, b)
    return (to_acc(a) * to_acc(b)).sum(-1)


def paired_logits(q: torch.Tensor, rows: Side, k: torch.Tensor, similarity: str,
                  scale: torch.Tensor, ops=None) -> torch.Tensor:
    """l_i = a_i b_i <q_i, k_i> + c_i + d_i for paired rows (B, D) x (B, D) -> (B,), or
    (B, D) x (B, S, D) -> (B, S); fp32. The column terms come from k itself; ``ops``: the backend
    (its ``paired_dot``, if any)."""
    cols = col_side(k.reshape(-1, k.shape[-1]), similarity, scale)
    if k.dim() == 3:
        dot = torch.einsum("bd,bsd->bs", to_acc(q), to_acc(k))
        a = rows.scale[:, None]
        c = rows.bias[:, None] if rows.bias is not None else None
    else:
        dot = _paired_dot(q, k, ops)
        a, c = rows.scale, rows.bias
    out = dot * a
    if cols.scale is not None:
        out = out * cols.scale.view(dot.shape)
    if c is not None:
        out = out + c
    if cols.bias is not None:
        out = out + cols.bias.view(dot.shape)
    return out


def _scale(value, like: torch.Tensor) -> torch.Tensor:
    """A positive float or 0-dim tensor -> 0-dim tensor in the accumulation dtype of ``like``, on
    its device (keeps autograd)."""
    dtype = acc_dtype(like.dtype)
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=dtype)
    # torch.full, not torch.tensor: no host-to-device copy (which waits for the stream) per step
    return torch.full((), float(value), dtype=dtype, device=like.device)


def _temperature_and_scale(temperature, like: torch.Tensor):
    """(temperature, scale = 1 / temperature). A tensor temperature is cast once to the
    accumulation dtype (every use then accumulates its gradient in fp32: fp16 partial gradients of
    separate casts can overflow where their sum does not); a number stays a number and its scale
    is one fill, not a fill, a reciprocal and a multiply per step."""
    if torch.is_tensor(temperature):
        temperature = _scale(temperature, like)
        return temperature, 1.0 / temperature
    return float(temperature), _scale(1.0 / float(temperature), like)


def _logsumexp_rows(parts):
    """log sum exp over a list of (B,) log-sum-exp terms."""
    if len(parts) == 1:
        return parts[0]
    return torch.logsumexp(torch.stack(parts), 0)


# CK_MIXING_LSE=0: the synthetic logits through mixed_dots even where a backend has mixed_lse (the
# A/B of the benchmark candidates "X-mixed-dots")
MIXED_LSE = os.environ.get("CK_MIXING_LSE", "1") != "0"


def _fused_mixed_lse(ops) -> bool:
    return MIXED_LSE and hasattr(ops, "mixed_lse")


def add_synthetic_terms(ops, query, rows: Side, mix_query, bank, hard, mixing: Mixing, scale,
                        gammas, parts, own, merge_last_part=False):
    """MoCHi's synthetic negatives without forming them, as a log-sum-exp part (G, B) in ``parts``
    where the backend has ``mixed_lse`` (no second gather in backward), else as logits (B, s+s')
    in ``own``: u = <q, h> from ``ops.mixed_dots`` (h mixes rows of ``bank`` picked by ``hard``,
    and ``mix_query``). The synthetic points are unit vectors, so cosine uses a = scale/|q| and l2
    adds d = -scale * |h|^2 = -scale. ``merge_last_part`` (one gamma, a backend with ROW_EXTRA):
    the last part joins the synthetic log-sum-exp inside ``mixed_lse``, which replaces it."""
    draws = draw_mixing(query.shape[0], mixing.n_hard, mixing.n_synthetic,
                        mixing.n_query_synthetic, mixing.generator, query.device)
    bias = rows.bias - scale if rows.bias is not None else None
    if _fused_mixed_lse(ops):
        extra = {"row_extra": parts.pop().squeeze(0)} if merge_last_part else {}
        parts.append(ops.mixed_lse(query, mix_query, bank, hard, draws, rows.scale, bias,
                                   gammas=gammas, **extra))
        return
    logits = ops.mixed_dots(query, mix_query, bank, hard, draws) * rows.scale[:, None]
    own.append(logits if bias is None else logits + bias[:, None])


def _finish(l_pos, parts, own, n_neg, tau_plus, beta, temperature, positive_in_parts):
    """Combine streamed LSE parts (each (G, B)) and own logits (each (B, S)) into per-row losses.

    Cross-entropy: parts hold gamma = 1 over negatives (and the positive when it is a streamed
    column); DCL/HCL: parts hold gammas (1+beta, beta) over negatives only."""
    if tau_plus == 0.0 and beta == 0.0:
        # one gamma: (1, B) -> (B,) by squeeze, a view also in backward (p[0] would zero-fill)
        terms = [p.squeeze(0) for p in parts] + [torch.logsumexp(o, 1) for o in own]
        if not positive_in_parts:
            terms.append(l_pos)
        return _logsumexp_rows(terms) - l_pos
    if n_neg == 0:
        return l_pos * 0.0
    lse_hi = _logsumexp_rows([p[0] for p in parts] + [torch.logsumexp((1 + beta) * o, 1) for o in own])
    lse_lo = _logsumexp_rows([p[1] for p in parts] + [torch.logsumexp(beta * o, 1) for o in own])
    return reference.debiased_nce_from_stats(l_pos, lse_hi - lse_lo, n_neg, tau_plus, temperature)


def info_nce(ops, query, positive_key, queue=None, *, temperature, similarity, in_batch_negatives,
             tau_plus, beta, extra_negatives, mixing, reduction):
    b = query.shape[0]
    temperature, scale = _temperature_and_scale(temperature, query)
    rows = row_side(query, similarity, scale)
    pos_cols = col_side(positive_key, similarity, scale)
    l_pos = paired_logits(query, rows, positive_key, similarity, scale, ops)
    debiased = tau_plus != 0.0 or beta != 0.0
    gammas = (1.0 + beta, beta) if debiased else (1.0,)
    parts, own, n_neg = [], [], 0
    if in_batch_negatives:
        # cross-entropy keeps the positive (column i) in the sum; DCL/HCL sums negatives only
        exclude = torch.arange(b, device=query.device)[:, None] if debiased else None
        parts.append(ops.lse_stats(query, positive_key, rows.scale, pos_cols.scale, rows.bias,
                                   pos_cols.bias, gammas=gammas, exclude=exclude)[0])
        n_neg += b - 1
    mixes = mixing is not None and mixing.n_total > 0
    hard = None
    has_queue = queue is not None and queue.shape[0] > 0
    # the positive, the queue and the synthetic negatives as one chain of log-sum-exps in the
    # kernels (the positive merged into the queue's, that into the synthetic one), where they are
    # the only terms of cross-entropy: a single term, no log-sum-exp of our own
    chain = (has_queue and not debiased and not in_batch_negatives
             and getattr(ops, "ROW_EXTRA", False)
             and (extra_negatives is None or extra_negatives.shape[1] == 0)
             and (not mixes or _fused_mixed_lse(ops)))
    positive_in_parts = chain or (in_batch_negatives and not debiased)
    if has_queue:
        cols = col_side(queue, similarity, scale)
        extra = {"row_extra": l_pos} if chain else {}
        if mixes and hasattr(ops, "lse_stats_topk"):
            # the hard negatives come out of the loss's own pass over the queue
            row_lse, hard = ops.lse_stats_topk(query, queue, rows.scale, cols.scale, rows.bias,
                                               cols.bias, gammas=gammas, n_hard=mixing.n_hard,
                                               **extra)
            parts.append(row_lse)
        else:
            parts.append(ops.lse_stats(query, queue, rows.scale, cols.scale, rows.bias, cols.bias,
                                       gammas=gammas, **extra)[0])
        n_neg += queue.shape[0]
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        own.append(paired_logits(query, rows, extra_negatives, similarity, scale))
        n_neg += extra_negatives.shape[1]
    if mixes:
        # hard negatives by dot product, as DESIGN.md fixes for info_nce(mixing=)
        if hard is None:
            hard = ops.topk(query.detach(), queue.detach(), mixing.n_hard, similarity="dot",
                            exclude_index=None, query_labels=None, bank_labels=None)[1]
        add_synthetic_terms(ops, query, rows, query.detach(), queue.detach(), hard, mixing, scale,
                            gammas, parts, own, merge_last_part=chain)
        n_neg += mixing.n_total
    loss = _finish(l_pos, parts, own, n_neg, tau_plus, beta, temperature, positive_in_parts)
    return _keep_empty_inputs(reference.reduce_loss(loss, reduction), queue, extra_negatives)


def _keep_empty_inputs(loss, *tensors):
    """The loss, still attached to the inputs with no rows that the kernels skipped (a K = 0 queue
    or no extra negatives that requires grad), so that autograd gives them an empty gradient as
    the reference does, not "not used in the graph"."""
    for t in tensors:
        if t is not None and t.numel() == 0 and t.requires_grad:
            loss = loss + t.sum().to(loss.dtype)
    return loss


def nt_xent(ops, z1, z2, *, temperature, similarity, tau_plus, beta, mixing, reduction):
    b = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    temperature, scale = _temperature_and_scale(temperature, z)
    rows, cols = row_side(z, similarity, scale), col_side(z, similarity, scale)
    idx = torch.arange(2 * b, device=z.device)
    partner = (idx + b) % (2 * b)
    self_and_partner = torch.stack([idx, partner], 1)
    l_pos = paired_logits(z, rows, z[partner], similarity, scale, ops)
    debiased = tau_plus != 0.0 or beta != 0.0
    gammas = (1.0 + beta, beta) if debiased else (1.0,)
    parts = [ops.lse_stats(z, z, rows.scale, cols.scale, rows.bias, cols.bias, gammas=gammas,
                           exclude=self_and_partner if debiased else idx[:, None])[0]]
    own, n_neg = [], 2 * b - 2
    if mixing is not None and mixing.n_total > 0:
        unit = torch.nn.functional.normalize(z.detach(), dim=-1, eps=NORM_EPS)
        hard = ops.topk(unit, unit, mixing.n_hard, similarity="dot", exclude_index=self_and_partner,
                        query_labels=None, bank_labels=None)[1]
        add_synthetic_terms(ops, z, rows, unit, unit, hard, mixing, scale, gammas, parts, own)
        n_neg += mixing.n_total
    loss = _finish(l_pos, parts, own, n_neg, tau_plus, beta, temperature, positive_in_parts=True)
    return reference.reduce_loss(loss, reduction)


def clip_loss(ops, image_features, text_features, logit_scale, *, similarity, reduction):
    scale = _scale(logit_scale, image_features)
    rows = row_side(image_features, similarity, scale)
    cols = col_side(text_features, similarity, scale)
    # the diagonal first: its fp32 copies of the features are freed before the streaming pass
    diagonal = paired_logits(image_features, rows, text_features, similarity, scale, ops)
    row_lse, _, _, col_lse = ops.lse_stats(image_features, text_features, rows.scale, cols.scale,
                                           rows.bias, cols.bias, gammas=(1.0,), want_col_lse=True)
    per_pair = 0.5 * ((row_lse[0] - diagonal) + (col_lse - diagonal))
    return reference.reduce_loss(per_pair, reduction)


def sup_con(ops, features, labels, *, temperature, similarity, reduction):
    b = features.shape[0]
    scale = _temperature_and_scale(temperature, features)[1]
    rows, cols = row_side(features, similarity, scale), col_side(features, similarity, scale)
    lab = labels.long() if labels.dim() == 1 else pack_multi_hot(labels)
    self_index = torch.arange(b, device=features.device)[:, None]
    row_lse, pos_sum, pos_count, _ = ops.lse_stats(
        features, features, rows.scale, cols.scale, rows.bias, cols.bias, gammas=(1.0,),
        exclude=self_index, q_labels=lab, k_labels=lab)
    has_pos = pos_count > 0
    loss = row_lse[0] - pos_sum / pos_count.clamp(min=1)
    return reference.reduce_loss(loss, reduction, keep=has_pos)


def multi_positive_info_nce(ops, query, keys, positive_index, queue=None, *, temperature,
                            similarity, reduction):
    scale = _temperature_and_scale(temperature, query)[1]
    rows = row_side(query, similarity, scale)
    key_cols = col_side(keys, similarity, scale)
    parts = [ops.lse_stats(query, keys, rows.scale, key_cols.scale, rows.bias, key_cols.bias,
                           gammas=(1.0,))[0][0]]
    if queue is not None and queue.shape[0] > 0:
        cols = col_side(queue, similarity, scale)
        parts.append(ops.lse_stats(query, queue, rows.scale, cols.scale, rows.bias, cols.bias,
                                   gammas=(1.0,))[0][0])
    lse = _logsumexp_rows(parts)
    valid = positive_index >= 0
    pidx = positive_index.clamp(min=0)
    n_keys = keys.shape[0]
    picked = keys[pidx.clamp(max=n_keys - 1)]  # (B, P, D); positives may also be queue rows
    if queue is not None and queue.shape[0] > 0:
        in_queue = (pidx >= n_keys)[..., None]
        picked = torch.where(in_queue, queue[(pidx - n_keys).clamp(min=0, max=queue.shape[0] - 1)], picked)
    l_pos = paired_logits(query, rows, picked, similarity, scale)  # (B, P)
    n_pos = valid.sum(1)
    loss = lse - torch.where(valid, l_pos, torch.zeros_like(l_pos)).sum(1) / n_pos.clamp(min=1)
    return _keep_empty_inputs(reference.reduce_loss(loss, reduction, keep=n_pos > 0), queue)
