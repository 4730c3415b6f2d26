"""The portable streaming backend: pure PyTorch, any device, never more than one chunk of the
score matrix alive.

``lse_stats`` walks the key rows in column chunks sized from a memory budget, keeping per-row
running (max, sum) pairs and, for the symmetric CLIP loss, the complete column log-sum-exp of each
chunk. Backward recomputes each chunk from the saved statistics (see ``reference.lse_stats`` for
the formulas). When only the query side needs a gradient (a MoCo queue or a frozen bank), the
forward pass also accumulates, flash-attention style with the keys as values,

    E_gi = sum_j p_gij b_j k_j,   F_gi = sum_j p_gij b_j <q_i, k_j>,   p_gij = softmax_j(gamma_g l_ij)

so backward is O(B D) with no second pass over the keys (4 B K D flops in all instead of 6).

``topk`` keeps a running top-k per query of packed int64 keys (order-preserving fp32 bits in the
high word, the complement of the bank index in the low word), so merging chunks is exact and ties
resolve to the lower index whatever torch.topk does with equal values.

The budget: ``CK_CHUNK_MB`` (environment) or ``set_memory_budget(bytes)``; without either,
32 MiB on a CPU (chunks that stay near the caches) and 256 MiB on a GPU (whose launches cost more
than its memory: at 32 MiB a 2^20-key bank is 512 chunks of a dozen small kernels each).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from . import reference
from ._common import MixingDraws, acc_dtype, first_order, query_side_only

NAME = "chunked"
DEFAULT_BUDGET_MB = {"cpu": 32, "cuda": 256}  # per device type; others take the CPU's
_budget_bytes: Optional[int] = (int(float(os.environ["CK_CHUNK_MB"]) * 2**20)
                                if os.environ.get("CK_CHUNK_MB") else None)
_LIVE_TEMPORARIES = 4  # (rows x chunk) buffers alive at once in the loops below


def available(device: torch.device) -> Optional[str]:
    """None when usable on ``device`` (always), else the reason it is not."""
    return None


def set_memory_budget(nbytes: Optional[int]) -> Optional[int]:
    """Bytes that the per-chunk temporaries of this backend may take together, on every device;
    None: the per-device defaults (``DEFAULT_BUDGET_MB``). Returns the previous setting."""
    global _budget_bytes
    if nbytes is not None and nbytes < 1:
        raise ValueError(f"the memory budget must be positive, got {nbytes}")
    old, _budget_bytes = _budget_bytes, (None if nbytes is None else int(nbytes))
    return old


def memory_budget(device=None) -> int:
    """The budget in bytes on ``device`` (a torch.device or its string; None: the CPU)."""
    if _budget_bytes is not None:
        return _budget_bytes
    kind = torch.device(device).type if device is not None else "cpu"
    return DEFAULT_BUDGET_MB.get(kind, DEFAULT_BUDGET_MB["cpu"]) << 20


def chunk_size(rows: int, total: int, itemsize: int = 4, temporaries: int = _LIVE_TEMPORARIES,
               minimum: int = 16, device=None) -> int:
    """Columns per chunk so that ``temporaries`` (rows x chunk) buffers fit in the budget of
    ``device``."""
    per_col = max(1, rows * itemsize * temporaries)
    return int(max(1, min(total, max(minimum, memory_budget(device) // per_col))))


# --------------------------------------------------------------------------------------------
# lse_stats
# --------------------------------------------------------------------------------------------


def _chunk_logits(qf, kc, a, b, c, d, j0, j1):
    """l = a_i b_j <q_i, k_j> + c_i + d_j for one column chunk, built in place in one buffer."""
    logits = qf @ kc.T
    logits.mul_(a[:, None])
    if b is not None:
        logits.mul_(b[None, j0:j1])
    if c is not None:
        logits.add_(c[:, None])
    if d is not None:
        logits.add_(d[None, j0:j1])
    return logits


def _chunk_valid(exclude, j0, j1, device):
    if exclude is None:
        return None
    cols = torch.arange(j0, j1, device=device)
    valid = None
    for e in exclude.unbind(1):
        ok = cols[None, :] != e[:, None]
        valid = ok if valid is None else valid & ok
    return valid


def _logit_chunks(qf, k, a, b, c, d, exclude, acc):
    """The streaming loop of lse_stats' forward and backward: for each column chunk (its size from
    the memory budget), (j0, j1, the chunk's keys in ``acc``, its logits, its valid mask or None)."""
    bsz, n, dev = qf.shape[0], k.shape[0], qf.device
    step = chunk_size(bsz, n, torch.finfo(acc).bits // 8, device=dev)
    for j0 in range(0, n, step):
        j1 = min(n, j0 + step)
        kc = k[j0:j1].to(device=dev, dtype=acc)
        yield j0, j1, kc, _chunk_logits(qf, kc, a, b, c, d, j0, j1), _chunk_valid(exclude, j0, j1, dev)


def _chunk_positive(q_labels, k_labels, j0, j1, valid):
    if q_labels is None:
        return None
    if q_labels.dim() == 1:
        share = q_labels[:, None] == k_labels[None, j0:j1]
    else:
        share = ((q_labels[:, None, :] & k_labels[None, j0:j1, :]) != 0).any(-1)
    return share if valid is None else share & valid


def _masked(x, valid, fill):
    return x if valid is None else x.masked_fill(~valid, fill)


class _LseStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, a, b, c, d, gammas, exclude, q_labels, k_labels, want_col_lse, row_only):
        acc = acc_dtype(q.dtype)
        bsz, n = q.shape[0], k.shape[0]
        dev = q.device
        qf = q.to(acc)
        a, b, c, d = (t.to(acc) if t is not None else None for t in (a, b, c, d))
        n_g = len(gammas)
        run_max = torch.full((n_g, bsz), -math.inf, dtype=acc, device=dev)
        run_sum = torch.zeros((n_g, bsz), dtype=acc, device=dev)
        pos_sum = torch.zeros(bsz, dtype=acc, device=dev)
        pos_count = torch.zeros(bsz, dtype=acc, device=dev)
        col_lse = torch.empty(n if want_col_lse else 0, dtype=acc, device=dev)
        if row_only:
            e_key = torch.zeros((n_g, bsz, q.shape[1]), dtype=acc, device=dev)
            p_key = torch.zeros((bsz, q.shape[1]), dtype=acc, device=dev)
        for j0, j1, kc, logits, valid in _logit_chunks(qf, k, a, b, c, d, exclude, acc):
            bk = kc * b[j0:j1, None] if (row_only and b is not None) else kc
            for g, gamma in enumerate(gammas):
                z = logits if gamma == 1.0 else gamma * logits
                z = _masked(z, valid, -math.inf)
                new_max = torch.maximum(run_max[g], z.amax(1))
                shift = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
                rescale = torch.exp(run_max[g] - shift)
                p = torch.exp(z - shift[:, None])
                del z
                run_sum[g] = run_sum[g] * rescale + p.sum(1)
                run_max[g] = new_max
                if row_only:
                    e_key[g] = e_key[g] * rescale[:, None] + p @ bk
                del p
            positive = _chunk_positive(q_labels, k_labels, j0, j1, valid)
            if positive is not None:
                pos_sum += _masked(logits, positive, 0.0).sum(1)
                pos_count += positive.sum(1).to(acc)
                if row_only:
                    p_key += positive.to(acc) @ bk
            if want_col_lse:
                col_lse[j0:j1] = torch.logsumexp(_masked(logits, valid, -math.inf), 0)
            del logits
        row_lse = run_max + torch.log(run_sum)
        ctx.gammas, ctx.row_only, ctx.want_col_lse = tuple(gammas), row_only, want_col_lse
        ctx.has_labels = q_labels is not None
        ctx.in_dtypes = [t.dtype if t is not None else None for t in (q, k, a, b, c, d)]
        if row_only:
            live = run_sum > 0
            denom = torch.where(live, run_sum, torch.ones_like(run_sum))
            e_key = torch.where(live[..., None], e_key / denom[..., None], torch.zeros_like(e_key))
            ctx.save_for_backward(qf, a, e_key, live.to(acc), p_key, pos_count)
        else:
            ctx.save_for_backward(q, k, a, b, c, d, exclude, q_labels, k_labels, row_lse, col_lse)
        ctx.mark_non_differentiable(pos_count)
        return row_lse, pos_sum, pos_count, col_lse

    @staticmethod
    @first_order("backend='chunked'")
    def backward(ctx, d_row, d_pos, _d_count, d_col):
        need = ctx.needs_input_grad
        gammas = ctx.gammas
        if ctx.row_only:
            qf, a, e_key, live, p_key, pos_count = ctx.saved_tensors
            w = torch.stack([d_row[g] * gammas[g] for g in range(len(gammas))])  # (G, B)
            g_key = (w[..., None] * e_key).sum(0)  # sum_j G_ij b_j k_j
            g_sum = (w * live).sum(0)
            if ctx.has_labels:
                g_key = g_key + d_pos[:, None] * p_key
                g_sum = g_sum + d_pos * pos_count
            g_dot = (qf * g_key).sum(1)  # sum_j G_ij b_j <q_i, k_j>
            dq = (a[:, None] * g_key).to(ctx.in_dtypes[0]) if need[0] else None
            da = g_dot.to(ctx.in_dtypes[2]) if need[2] else None
            dc = g_sum.to(ctx.in_dtypes[4]) if need[4] else None
            return dq, None, da, None, dc, None, None, None, None, None, None, None

        q, k, a, b, c, d, exclude, q_labels, k_labels, row_lse, col_lse = ctx.saved_tensors
        acc = row_lse.dtype
        bsz, n = q.shape[0], k.shape[0]
        dev = q.device
        qf = q.to(acc)
        g_key = torch.zeros_like(qf) if (need[0] or need[2]) else None
        dk = torch.zeros((n, k.shape[1]), dtype=acc, device=dev) if need[1] else None
        db = torch.zeros(n, dtype=acc, device=dev) if need[3] else None
        dc = torch.zeros(bsz, dtype=acc, device=dev) if need[4] else None
        dd = torch.zeros(n, dtype=acc, device=dev) if need[5] else None
        aq = qf * a[:, None] if (need[1] or need[3]) else None
        for j0, j1, kc, logits, valid in _logit_chunks(qf, k, a, b, c, d, exclude, acc):
            grad = torch.zeros_like(logits)
            for g, gamma in enumerate(gammas):
                if gamma != 0.0:
                    grad += (d_row[g] * gamma)[:, None] * torch.exp(gamma * logits - row_lse[g][:, None])
            if ctx.want_col_lse:
                grad += d_col[None, j0:j1] * torch.exp(logits - col_lse[None, j0:j1])
            del logits
            positive = _chunk_positive(q_labels, k_labels, j0, j1, valid)
            if positive is not None:
                grad += d_pos[:, None] * positive.to(acc)
            grad = _masked(grad, valid, 0.0)
            if dc is not None:
                dc += grad.sum(1)
            if dd is not None:
                dd[j0:j1] = grad.sum(0)
            if dk is not None or db is not None:
                h = grad.T @ aq  # sum_i G_ij a_i q_i
                if db is not None:
                    db[j0:j1] = (h * kc).sum(1)
                if dk is not None:
                    dk[j0:j1] = h * b[j0:j1, None] if b is not None else h
            if b is not None:
                grad.mul_(b[None, j0:j1])
            if g_key is not None:
                g_key += grad @ kc  # sum_j G_ij b_j k_j
        da = (qf * g_key).sum(1) if need[2] else None  # sum_j G_ij b_j <q_i, k_j>
        dq = g_key * a[:, None] if need[0] else None
        out = [dq, dk, da, db, dc, dd]
        out = [t.to(dt) if t is not None else None for t, dt in zip(out, ctx.in_dtypes)]
        return (*out, None, None, None, None, None, None)


def lse_stats(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
              gammas: Sequence[float] = (1.0,), exclude=None, q_labels=None, k_labels=None,
              want_col_lse=False):
    """``reference.lse_stats`` in column chunks; see the module docstring."""
    row_only = query_side_only(q, k, row_scale, col_scale, row_bias, col_bias) and not want_col_lse
    return _LseStats.apply(q, k, row_scale, col_scale, row_bias, col_bias, tuple(gammas), exclude,
                           q_labels, k_labels, want_col_lse, row_only)


# --------------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------------

_LOW_MASK = 0xFFFFFFFF
_EXCLUDED = torch.iinfo(torch.int64).min


def pack_keys(scores: torch.Tensor, first_index: int) -> torch.Tensor:
    """fp32 scores (M, n) of bank rows first_index.. -> int64 keys whose order is (score, then
    lower index). The fp32 bits are mapped so that signed-integer order equals float order;
    every NaN (of either sign: inf - inf gives -nan on x86) becomes +nan, above +inf, as in
    torch.sort, and NaNs tie (lower index first)."""
    scores = torch.where(scores.isnan(), math.nan, scores + 0.0)  # +0.0: -0.0 ties +0.0
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    index = torch.arange(first_index, first_index + scores.shape[1], device=scores.device)
    return (ordered << 32) | (_LOW_MASK - index)[None, :]


def unpack_keys(keys: torch.Tensor):
    ordered = keys >> 32
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def topk(query, bank, k, *, similarity="dot", exclude_index=None, query_labels=None,
         bank_labels=None):
    """Exact top-k in (query block x bank chunk) tiles with a running packed-key top-k. The bank
    may live on another device than the query (each chunk is copied over)."""
    m, n = query.shape[0], bank.shape[0]
    dev = query.device
    out_keys = torch.empty((m, k), dtype=torch.int64, device=dev)
    row_block = min(m, 4096)
    step = chunk_size(row_block, n, 4, temporaries=5, minimum=max(64, k), device=dev)
    for i0 in range(0, m, row_block):
        i1 = min(m, i0 + row_block)
        qf = query[i0:i1].float()
        q_sq = qf.pow(2).sum(1) if similarity == "l2" else None
        q_inv = 1.0 / qf.norm(dim=1).clamp(min=1e-12) if similarity == "cosine" else None
        excl = exclude_index[i0:i1] if exclude_index is not None else None
        qlab = query_labels[i0:i1] if query_labels is not None else None
        running = None
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            kc = bank[j0:j1].to(device=dev, dtype=torch.float32, non_blocking=True)
            scores = qf @ kc.T
            if similarity == "cosine":
                scores = scores * q_inv[:, None] * (1.0 / kc.norm(dim=1).clamp(min=1e-12))[None, :]
            elif similarity == "l2":
                scores = 2 * scores - q_sq[:, None] - kc.pow(2).sum(1)[None, :]
            keys = pack_keys(scores, j0)
            if excl is not None:
                valid = _chunk_valid(excl if excl.dim() == 2 else excl[:, None], j0, j1, dev)
                keys = keys.masked_fill(~valid, _EXCLUDED)
            if qlab is not None:
                keys = keys.masked_fill(qlab[:, None] == bank_labels[j0:j1].to(dev)[None, :], _EXCLUDED)
            top = keys.topk(min(k, j1 - j0), dim=1, sorted=False).values
            running = top if running is None else torch.cat([running, top], 1)
            if running.shape[1] > k:
                running = running.topk(k, dim=1, sorted=False).values
        out_keys[i0:i1] = running.sort(dim=1, descending=True).values
    values, indices = unpack_keys(out_keys)
    return values, indices


# --------------------------------------------------------------------------------------------
# mixing
# --------------------------------------------------------------------------------------------


def mix(query, negatives, hard_index, draws: MixingDraws):
    return reference.mix_points(query, negatives, hard_index, draws)


def _slice_draws(draws: MixingDraws, i0, i1) -> MixingDraws:
    return MixingDraws(*(t[i0:i1] for t in (draws.pair_index, draws.alpha, draws.query_index,
                                             draws.query_weight)))


class _MixedDots(torch.autograd.Function):
    """u_it = <q_i, h_it> for the synthetic points h = mix(mix_query, negatives, hard_index,
    draws), computed in row blocks so that at most one block of points exists at a time;
    backward recomputes them (dq_i = sum_t g_it h_it)."""

    @staticmethod
    def forward(ctx, q, mix_query, negatives, hard_index, draws):
        acc = acc_dtype(q.dtype)
        bsz, t = q.shape[0], draws.alpha.shape[1] + draws.query_weight.shape[1]
        out = torch.empty((bsz, t), dtype=acc, device=q.device)
        step = chunk_size(max(1, t), bsz, torch.finfo(acc).bits // 8 * q.shape[1], temporaries=4,
                          device=q.device)
        for i0 in range(0, bsz, step):
            i1 = min(bsz, i0 + step)
            h = mix(mix_query[i0:i1], negatives, hard_index[i0:i1], _slice_draws(draws, i0, i1))
            out[i0:i1] = torch.einsum("bd,btd->bt", q[i0:i1].to(acc), h.to(acc))
        ctx.save_for_backward(mix_query, negatives, hard_index)
        ctx.draws, ctx.step, ctx.q_dtype = draws, step, q.dtype
        return out

    @staticmethod
    @first_order("backend='chunked'")
    def backward(ctx, grad):
        mix_query, negatives, hard_index = ctx.saved_tensors
        acc = grad.dtype
        dq = torch.empty((mix_query.shape[0], mix_query.shape[1]), dtype=acc, device=grad.device)
        for i0 in range(0, dq.shape[0], ctx.step):
            i1 = min(dq.shape[0], i0 + ctx.step)
            h = mix(mix_query[i0:i1], negatives, hard_index[i0:i1], _slice_draws(ctx.draws, i0, i1))
            dq[i0:i1] = torch.einsum("bt,btd->bd", grad[i0:i1], h.to(acc))
        return dq.to(ctx.q_dtype), None, None, None, None


def mixed_dots(q, mix_query, negatives, hard_index, draws: MixingDraws):
    return _MixedDots.apply(q, mix_query.detach(), negatives.detach(), hard_index, draws)
