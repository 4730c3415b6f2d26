"""The hard negatives of ``info_nce(mixing=)`` from the loss's own pass over the queue, the part
every backend shares (the Triton and the C++ CPU backends; their kernels: triton/mixing.py and
csrc/cpu/infonce_kernel.h).

A backend's ``lse_stats_topk(q, k, ...)`` returns the loss's ``row_lse`` AND exactly
``topk(q.detach(), k.detach(), n_hard, similarity="dot").indices``, reading the queue once:

1. Threshold: t_i (``sample_kth``) = the k_s-th largest score of row i over a strided sample of
   the queue (every f-th row, ``candidate_plan``): one (B x K/f) matmul and one k-th value. The
   backend lowers it by a small margin (``lower_threshold``: T_i = t_i - 2^-7 |t_i|; the Triton
   loss kernel does it as it loads t_i, the CPU backend on the host). About f * k_s >= n_hard
   queue rows score above it. Queues too short for f >= 2 (``MIN_SAMPLE_STRIDE``) take the
   separate top-k.
2. The loss kernel tests each raw dot <q_i, k_j> (before any scaling) against T_i (Triton:
   s >= T_i; CPU: s > T_i) and lists the passing columns of each row, at most ``capacity`` of
   them (per row; on the CPU per row and thread, whose column ranges are disjoint), and counts
   them all.
3. The n_hard best listed columns, in topk's order (score, then the lower index).

Exactness is checked, not assumed: row i is exact when n_hard <= count_i <= capacity and its
log-sum-exp is finite (the Triton candidate-merge kernel flags the rows that are not, the CPU
backend ``inexact_rows``). Then every unlisted score is strictly below every listed one (Triton:
unlisted < T_i <= listed; CPU: unlisted <= T_i < listed), so the list holds the whole
top-n_hard, ties included. Other rows (an unlucky sample, ties piled on the threshold,
non-finite features) are recomputed by the backend's ``topk``. The threshold only sizes the
lists, never the result.

Equality with ``topk`` also needs the loss kernel's dot to be bitwise the top-k kernel's. Each
backend states where it is (``reason``), and the first call of each shape key compares the
fused hard set with ``topk``'s and, on any difference, warns and uses ``topk`` for that key from
then on. ``CK_MIXING_FUSED_TOPK=0`` turns the fused path off everywhere.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Optional, Sequence

import torch

# Threshold sample: every f-th queue row, about SAMPLE_ROWS_PER_HARD * n_hard rows; where that
# sample would expect more than SAMPLE_HITS rows of the true top n_hard, a sparser one (down to
# MIN_SAMPLE_ROWS_PER_HARD * n_hard rows) that still expects SAMPLE_HITS: it costs less and lists
# a few more candidates (n_hard + 4 sqrt(n_hard f) + 4f; at n_hard=1024, K=65536, f = 32: 1.84
# n_hard, against 1.39 at f = 8). On the CPU, B=256, n_hard=1024, the MoCHi step (2026-11-25):
# K=65536 70 ms at f = 8, 63 at f = 32; K=8192 19 ms at f = 4 (28.9 by the separate top-k, where
# f = 1 sent it). A sample with fewer expected hits spreads the candidate count more (relatively,
# about 1/sqrt(k_s)) and overflows the lists more often: never below SAMPLE_HITS where the
# default sample was above it, so large queues keep the default.
SAMPLE_ROWS_PER_HARD = 8
MIN_SAMPLE_ROWS_PER_HARD = 2
SAMPLE_HITS = 32
# The fused path only where the sample takes at most every MIN_SAMPLE_STRIDE-th queue row: on a
# shorter queue the sample is the whole queue, so the threshold alone is a full top-k (CPU,
# B=256, n_hard=1024, MoCHi step: K=2048, f = 1, fused 15.5 ms vs separate 16.8, close; K=4096,
# f = 2, 16.7 vs 21.2).
MIN_SAMPLE_STRIDE = 2
FUSED_TOPK = os.environ.get("CK_MIXING_FUSED_TOPK", "1") != "0"

# Diagnostics (tests, benchmarks): calls that took the fused path or the separate top-k, rows
# recomputed by ``topk``; and per shape key the outcome of the first-call comparison (the first
# call of a key also runs ``topk``).
STATS = {"fused_calls": 0, "separate_calls": 0, "fallback_rows": 0}
_checked_keys: dict = {}   # shape key -> True (fused == topk on its first call) / False


def candidate_plan(n_rows: int, n_hard: int):
    """(f, k_s, capacity): the threshold sample takes every f-th queue row and its k_s-th largest
    score; about f * k_s rows pass it, and each row keeps at most ``capacity`` candidates.
    Depends on shapes only (fake kernels need the capacity)."""
    f_default = n_rows // max(1, SAMPLE_ROWS_PER_HARD * n_hard)
    f_sparse = min(n_rows // max(1, MIN_SAMPLE_ROWS_PER_HARD * n_hard), n_hard // SAMPLE_HITS)
    f = max(1, f_default, f_sparse)
    n_sample = -(-n_rows // f)
    mean = n_hard * n_sample / n_rows  # sample rows among the true top n_hard
    k_s = int(min(n_sample, math.ceil(mean + 4.0 * math.sqrt(mean) + 4.0)))
    expected = k_s * n_rows / n_sample
    cap = int(math.ceil(1.5 * expected + 6.0 * math.sqrt(expected) + 32.0))
    cap = min(n_rows, -(-cap // 16) * 16)
    return f, k_s, max(cap, n_hard)


# T_i = t_i - THRESHOLD_MARGIN |t_i|: the sample's product rounds differently from the loss
# kernel's, and a 16-bit t_i is rounded; a candidate at the margin must not be missed
THRESHOLD_MARGIN = 2.0 ** -7


def _kth_by_matmul(q, sample, k_s):
    # selected in the product's dtype (exact either way); one op, contiguous
    return torch.kthvalue(q @ sample.T, sample.shape[0] - k_s + 1, dim=1).values


@torch.no_grad()
def sample_kth(q, k, f: int, k_s: int, kth: Optional[Callable] = None) -> torch.Tensor:
    """t (B,), in the product's dtype: the k_s-th largest <q_i, k_j> over the sample k[::f]; -inf
    when k_s is the whole sample. ``kth(q, sample, k_s)`` -> the k_s-th largest score per row
    (default: a matmul and torch.kthvalue; a backend may pass its own top-k). Any arithmetic will
    do: the threshold only sizes the candidate lists, the check decides."""
    sample = k.detach()[::f]
    if k_s >= sample.shape[0]:
        return torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
    return (kth or _kth_by_matmul)(q.detach(), sample, k_s)


def lower_threshold(t: torch.Tensor) -> torch.Tensor:
    """T = t - THRESHOLD_MARGIN |t| in fp32, contiguous (-inf stays -inf). The Triton loss kernel
    computes the same as it loads t."""
    t = t.float()
    return torch.add(t, t.abs(), alpha=-THRESHOLD_MARGIN).contiguous()


def common_reason(q: torch.Tensor, k: torch.Tensor, n_hard: int) -> Optional[str]:
    """Why no backend can take the hard negatives from the loss pass here (None: they can)."""
    if not FUSED_TOPK:
        return "CK_MIXING_FUSED_TOPK=0"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{q.dtype}: the top-k kernels score fp64 in fp32"
    if n_hard > k.shape[0]:
        return "n_hard exceeds the queue"
    if candidate_plan(int(k.shape[0]), n_hard)[0] < MIN_SAMPLE_STRIDE:
        return ("queue too short for a threshold sample of every 2nd row (candidate_plan): the sample "
                "would be the whole queue, and the separate top-k is cheaper")
    if k.device != q.device:
        return "queue on another device"
    return None


def inexact_rows(row_lse: torch.Tensor, count: torch.Tensor, n_hard: int, capacity: int) -> torch.Tensor:
    """(B,) bool: the rows whose candidate list may not hold their top n_hard (module docstring)."""
    return (count < n_hard) | (count > capacity) | ~torch.isfinite(row_lse).all(0)


def lse_stats_topk(backend: str, reason: Optional[str], q, k, gammas: Sequence[float], n_hard: int,
                   flags: tuple, fused: Callable, separate_lse: Callable, topk: Callable,
                   kth: Optional[Callable] = None):
    """(row_lse, hard) of a backend's ``lse_stats_topk``. ``fused(t, capacity)`` runs the loss pass
    with candidates, the columns scoring above ``lower_threshold(t)`` (t: ``sample_kth``'s) ->
    (row_lse, best (B, n_hard) int64, inexact (B,): nonzero for the rows to recompute, see
    ``inexact_rows``); ``separate_lse()`` -> row_lse without them; ``topk(q, k, n)`` -> the
    backend's exact top-k indices. ``reason``: why the fused path cannot run (None: it can);
    ``flags`` tell the affine forms apart; ``kth`` goes to ``sample_kth``."""
    key = (backend, str(q.device), str(q.dtype), int(q.shape[0]), int(k.shape[0]), int(q.shape[1]),
           len(gammas), n_hard, flags)
    if reason is not None or _checked_keys.get(key) is False:
        STATS["separate_calls"] += 1
        return separate_lse(), topk(q.detach(), k.detach(), n_hard)
    STATS["fused_calls"] += 1
    f, k_s, cap = candidate_plan(int(k.shape[0]), n_hard)
    row_lse, hard, inexact = fused(sample_kth(q, k, f, k_s, kth), cap)
    redo = torch.nonzero(inexact).flatten()  # the one synchronization
    if redo.numel():
        STATS["fallback_rows"] += int(redo.numel())
        hard[redo] = topk(q.detach()[redo], k.detach(), n_hard)
    if key not in _checked_keys and not torch.compiler.is_compiling():
        want = topk(q.detach(), k.detach(), n_hard)
        _checked_keys[key] = bool(torch.equal(hard, want))
        if not _checked_keys[key]:
            warnings.warn(f"contrastive_kernels: the hard negatives taken from the {backend} loss kernel "
                          "differ from topk_similarity's on this device/shape; using the separate top-k "
                          f"for {key} from now on", RuntimeWarning, stacklevel=3)
            hard = want
    return row_lse, hard
