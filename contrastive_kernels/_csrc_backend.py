"""The family ops of losses.py over the compiled torch.ops.contrastive_kernels ops, shared by
the "cpu" and "cuda" backends (the op dispatches on the tensors' device; see csrc/)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _bank_chunks, _ext, _loss_topk, chunked
from ._common import MixingDraws, query_side_only

_ext.load()  # registers the ops (and their autograd / fake kernels) when the extension exists


# The op namespace and the "tensor is on the CUDA kernels' device" rule. Tests swap both to run
# this module, unchanged, over the CUDA emulator's build of csrc/cuda on host tensors
# (tests/_cuda_emu.py).
OPS_NAMESPACE = "contrastive_kernels"


def _on_cuda_kernels(t) -> bool:
    return t.is_cuda


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


# Shapes the CUDA kernels take (their tiles of the features must fit in shared memory); others
# run through the chunked backend on the same device (cuBLAS GEMMs), as does top-k with k > 1024.
CUDA_LSE_MAX_DIM = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256, torch.float64: 128}
CUDA_TOPK_MAX_DIM = 256
CUDA_TOPK_MAX_K = 1024


def _cuda_fallback_lse(q) -> bool:
    return _on_cuda_kernels(q) and q.shape[1] > CUDA_LSE_MAX_DIM.get(q.dtype, 0)


def _cuda_fallback_topk(query, k) -> bool:
    return _on_cuda_kernels(query) and (k > CUDA_TOPK_MAX_K or query.shape[1] > CUDA_TOPK_MAX_DIM)


def lse_stats(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
              gammas: Sequence[float] = (1.0,), exclude=None, q_labels=None, k_labels=None,
              want_col_lse=False):
    """reference.lse_stats, fused: one pass over the key tiles with the softmax statistics kept in
    registers. When only the query side needs a gradient (a queue or a frozen bank), the forward
    pass also accumulates the softmax-weighted key sums, so backward is O(B D) (row-only mode, as in
    chunked.py); otherwise backward is a second fused pass (lse_bwd)."""
    if _cuda_fallback_lse(q):
        return chunked.lse_stats(q, k, row_scale, col_scale, row_bias, col_bias, gammas=gammas,
                                 exclude=exclude, q_labels=q_labels, k_labels=k_labels,
                                 want_col_lse=want_col_lse)
    row_only = query_side_only(q, k, row_scale, col_scale, row_bias, col_bias) and not want_col_lse
    out = _ops().lse_fwd(q, k, row_scale, col_scale, row_bias, col_bias, [float(g) for g in gammas],
                         exclude, q_labels, k_labels, bool(want_col_lse), bool(row_only))
    return out[0], out[1], out[2], out[3]


def cpu_fused_topk_reason(q, k, n_hard: int) -> Optional[str]:
    """None when ``lse_stats_topk`` can take the hard negatives from the CPU loss kernel's pass."""
    why = _loss_topk.common_reason(q, k, n_hard)
    if why is not None:
        return why
    if _on_cuda_kernels(q):
        return "lse_topk_fwd has CPU kernels only"
    cap = _loss_topk.candidate_plan(int(k.shape[0]), n_hard)[2]
    # per column part (one per thread) a list of cap int64 keys per row
    if 8 * cap * q.shape[0] * torch.get_num_threads() > CPU_TOPK_BUFFER_BYTES:
        return "candidate lists over CK_TOPK_BUFFER_MB"
    return None


def lse_stats_topk(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
                   gammas: Sequence[float] = (1.0,), n_hard: int):
    """(row_lse (G, B), hard (B, n_hard) int64): ``lse_stats(...)[0]`` over the queue k and
    ``topk(q.detach(), k.detach(), n_hard, similarity="dot").indices``, the hard negatives taken
    from the loss kernel's own pass over the queue (op lse_topk_fwd; _loss_topk.py) where
    ``cpu_fused_topk_reason`` allows: the CPU kernel's raw dot is the top-k kernel's, bitwise
    (the same microkernel over the same fp32 operands). CPU backend only."""
    def fused(kth, cap):
        out = _ops().lse_topk_fwd(q, k, row_scale, col_scale, row_bias, col_bias, [float(g) for g in gammas],
                                  None, None, None, False, query_side_only(q, k, row_scale, col_scale, row_bias, col_bias),
                                  _loss_topk.lower_threshold(kth), cap, n_hard)
        return out[0], out[6], _loss_topk.inexact_rows(out[0], out[7], n_hard, cap)

    return _loss_topk.lse_stats_topk(
        "cpu", cpu_fused_topk_reason(q, k, n_hard), q, k, gammas, n_hard,
        (col_scale is not None, row_bias is not None, col_bias is not None), fused,
        lambda: lse_stats(q, k, row_scale, col_scale, row_bias, col_bias, gammas=gammas)[0],
        lambda a, b, n: topk(a, b, n, similarity="dot")[1],
        # the threshold sample's k-th score by this top-k too: half the time of mm + torch.topk
        lambda a, sample, n: topk(a, sample.contiguous(), n, similarity="dot")[0][:, -1])


# The CPU kernel's candidate buffers take 16 k bytes per query row (2k int64 keys): query rows go
# in blocks that keep them under the top-k budget (each block reads the bank once more, which is
# small next to its M_block N D multiply-adds).
CPU_TOPK_BUFFER_BYTES = _bank_chunks.TOPK_BUFFER_BYTES


def _topk_on_device(query, bank, k, similarity, exclude_index, query_labels, bank_labels):
    query, bank = query.detach(), bank.detach()
    m = query.shape[0]
    step = m if _on_cuda_kernels(query) else max(256, CPU_TOPK_BUFFER_BYTES // (16 * k))
    if m <= step:
        return _ops().topk(query, bank, k, similarity, exclude_index, query_labels, bank_labels)
    parts = [_ops().topk(query[i0:i0 + step], bank, k, similarity,
                         None if exclude_index is None else exclude_index[i0:i0 + step],
                         None if query_labels is None else query_labels[i0:i0 + step], bank_labels)
             for i0 in range(0, m, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def topk(query, bank, k, *, similarity="dot", exclude_index=None, query_labels=None,
         bank_labels=None, _chunk_rows=None):
    """Exact top-k (values fp32, int64 indices; ties to the lower index). A bank on another device
    than the query (a host bank for a GPU query) is streamed in chunks (_bank_chunks.HostChunks:
    copies on a side stream overlap the kernels), each chunk's top-k merged into the running one
    by packed keys (chunked.pack_keys), which keeps the tie rule exact. ``_chunk_rows`` (tests)
    runs the same merge over a bank already on the query's device, in chunks of that many rows."""
    if _cuda_fallback_topk(query, k):
        return chunked.topk(query, bank, k, similarity=similarity, exclude_index=exclude_index,
                            query_labels=query_labels, bank_labels=bank_labels)
    if bank.device == query.device and _chunk_rows is None:
        return _topk_on_device(query, bank, k, similarity, exclude_index, query_labels, bank_labels)
    if bank.device != query.device:
        rows = _chunk_rows or max(k, _bank_chunks.host_chunk_rows(bank))
        chunks = _bank_chunks.HostChunks(bank, bank_labels, rows, query.device)
    else:
        chunks = _bank_chunks.DeviceChunks(bank, bank_labels, _chunk_rows)
    running = None
    for j0, data, labels in chunks:
        ex = None
        if exclude_index is not None:  # chunk-local rows; other chunks' rows match no column
            ex = torch.where(exclude_index >= 0, exclude_index - j0, torch.full_like(exclude_index, -1))
        values, indices = _topk_on_device(query, data, min(k, data.shape[0]), similarity, ex,
                                          query_labels, labels)
        chunks.consumed()
        keys = chunked.pack_keys(values, 0)
        # pack_keys numbers columns from 0; re-pack with the bank indices (missing: -1 -> excluded)
        keys = (keys & ~chunked._LOW_MASK) | (chunked._LOW_MASK - (indices + j0))
        keys = torch.where(indices >= 0, keys, torch.full_like(keys, chunked._EXCLUDED))
        running = keys if running is None else torch.cat([running, keys], 1)
        if running.shape[1] > k:
            running = running.topk(k, dim=1, sorted=False).values
    running = running.sort(dim=1, descending=True).values
    return chunked.unpack_keys(running)


def mix(query, negatives, hard_index, draws: MixingDraws):
    """The synthetic points (B, s+s', D), without gradient (reference.mix_points)."""
    return _ops().mix(query.detach(), negatives.detach(), hard_index, draws.pair_index, draws.alpha, draws.query_index,
                      draws.query_weight)


def mixed_lse(q, mix_query, negatives, hard_index, draws: MixingDraws, row_scale, row_bias=None, *,
              gammas: Sequence[float] = (1.0,)):
    """The log-sum-exp (G, B) over t of gamma_g (row_scale_i u_it + row_bias_i), u = mixed_dots(...),
    in one pass over the points that also keeps the softmax-weighted sums its gradient needs, so
    that backward gathers nothing (op mixed_lse; CPU and CUDA kernels). Gradients to q, row_scale and
    row_bias."""
    return _ops().mixed_lse(q, mix_query.detach(), negatives.detach(), hard_index, draws.pair_index, draws.alpha,
                            draws.query_index, draws.query_weight, row_scale, row_bias,
                            [float(g) for g in gammas])[0]


def mixed_dots(q, mix_query, negatives, hard_index, draws: MixingDraws):
    """u_it = <q_i, h_it> with h = mix(mix_query, negatives, hard_index, draws), the points never
    stored; differentiable in q (the synthetic points are constants, as in MoCHi)."""
    return _ops().mixed_dots(q, mix_query.detach(), negatives.detach(), hard_index, draws.pair_index,
                             draws.alpha, draws.query_index, draws.query_weight)
