"""Triton kernels for the streaming op behind every InfoNCE-family loss (``lse_stats``).

The op (spec: ``reference.lse_stats``). With the logits of a (row block x key block) tile

    l_ij = a_i * b_j * <q_i, k_j> + c_i + d_j          (a = row_scale, b = col_scale,
                                                         c = row_bias,  d = col_bias)

valid_ij = (j not in exclude[i]) and pos_ij = valid_ij and (labels of i and j match: equal int
labels, or int64 bitsets with a common bit), the forward pass returns

    row_lse[g, i] = log sum_{j valid} exp(gamma_g l_ij)      for 1 or 2 gammas
    pos_sum[i]    = sum_{j pos} l_ij,   pos_count[i] = #{j pos}
    col_lse[j]    = log sum_{i valid} exp(l_ij)              (symmetric CLIP only)

and the backward pass, with G_ij = valid_ij * (sum_g dR_gi gamma_g exp(gamma_g l_ij - R_gi)
+ dP_i pos_ij + dC_j exp(l_ij - C_j)),

    dq_i = a_i sum_j G_ij b_j k_j              d a_i = <q_i, sum_j G_ij b_j k_j>   d c_i = sum_j G_ij
    dk_j = b_j sum_i G_ij a_i q_i              d b_j = <k_j, sum_i G_ij a_i q_i>   d d_j = sum_i G_ij

Kernels (all statistics and accumulators fp32, fp64 for fp64 inputs; tiles of q and k go through
``tl.dot`` in the input dtype, fp32 inputs with 3xTF32 unless TF32 matmuls are allowed):

``_lse_fwd_kernel``  grid (row groups, key splits), flash-decoding style. A program walks the
    tiles of its rectangle (its rows x its key range), keeping per-row online (max, sum) pairs in
    registers:  m' = max(m, max_j z_ij),  s' = s exp(m - m') + sum_j exp(z_ij - m')  (z = gamma l,
    -inf where invalid). It writes one partial (m, s) per (split, row) -- and partial label sums.
    Column statistics (CLIP) come from the SAME pass over the tiles: per (row group, column) the
    program updates a running (max, sum) pair in global memory once per tile (each pair is owned by
    one program, so no atomics; a CTA barrier after each row block orders its own writes and
    reads). Row-only mode (only the query side needs gradients: MoCo queue, frozen bank) also
    accumulates E_i = sum_j exp(l_ij - m_i) b_j k_j like the output of attention with the keys as
    values, so that backward is O(B D):  dq_i = a_i w_i E_i / s_i  with w_i = dR_i (4 B K D flops
    in all instead of 6).
    CAND mode (the hard negatives of MoCHi mixing, triton/mixing.py): in the same pass, every
    valid (i, j) whose raw dot <q_i, k_j> (the tile's fp32 tl.dot result, before any scaling)
    reaches a per-row threshold is appended to row i's candidate list: one atomic add per row and
    tile reserves the slots, a prefix sum over the tile's columns places the top-k key of (score,
    j). Off (the constexpr is False) it compiles to the kernel without it.
``_row_merge_kernel`` / ``_col_merge_kernel``  merge the partials of the splits / row groups:
    M = max_s m_s, S = sum_s s_s exp(m_s - M), lse = M + log S (and E = sum_s exp(m_s - M) E_s / S).
``_lse_bwd_q_kernel``  grid (row blocks, key splits): recomputes the tiles of a row block, forms
    G and accumulates sum_j G_ij b_j k_j (registers) and sum_j G_ij; partials per split.
``_lse_bwd_k_kernel``  grid (key blocks, row splits): recomputes the TRANSPOSED tile
    l^T = (k q^T) (keys x rows), so that sum_i G_ij a_i q_i = (G^T a) @ q takes G^T as the left
    operand straight from registers (no transpose; wgmma on sm_90), plus sum_i G_ij. With FUSED_DQ
    it also adds each tile's (G b) @ k into the query-side accumulator with fp32 atomics, so that
    dQ and dK come from ONE recompute (8 N^2 D flops for symmetric CLIP instead of 10); used unless
    ``torch.use_deterministic_algorithms(True)`` is on, in which case the two deterministic
    kernels run (fixed summation order: bitwise reproducible).
``_grad_finish_kernel``  sums the split partials and applies the scales: dx = scale * acc,
    d scale = <x, acc>, d bias = sum.

fp16 tiles of G are scaled by their per-row (per-column) max before the cast to fp16, so that
small weights do not flush to zero; bf16 needs no scaling. Feature dims up to 512 bytes per row
(256 fp16/bf16 features, 128 fp32, 64 fp64) keep the q (k) tile and the accumulators resident;
wider D loops over 128-wide chunks of the features and keeps the accumulators in the program's own
slice of the partial buffers (read-modify-write, ordered by a CTA barrier). Launch plans (how many
row groups and key splits) come from the SM count (``_fwd_plan`` / ``_bwd_plan``: about two
programs per SM, at least MIN_SPLIT_COLS keys per split); tile shapes and warps are autotuned per
shape key among configs chosen with ``scripts/triton_aot_check.py``'s register/spill report.
All offsets are int64. On CPU tensors the kernels run under Triton's interpreter (tests only).
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from .._common import query_side_only
from . import INTERPRETER, cdiv, dot_dtype, launcher, next_power_of_2
from .topk import _pack, _unpack_index  # the top-k key; plain globals for inductor

# Widest feature dim whose q / k tiles and accumulators stay resident (bytes per row of a tile:
# 256 features of fp16/bf16, 128 of fp32, 64 of fp64); wider D loops over CHUNK_D-wide chunks.
MAX_REG_D_BYTES = 512
CHUNK_D = 128
# Every tile config's BLOCK_M / BLOCK_N divides these (row groups and key splits are multiples).
ALIGN_M, ALIGN_N = (16, 32) if INTERPRETER else (128, 128)
# _row_merge_kernel's (BLOCK_R, BLOCK_D, BLOCK_S): row-only spreads E over row x feature blocks;
# the interpreter's are small so that the tests' shapes span several of each
_MERGE_BLOCKS = ({"row_only": (8, 16, 4), "rows": (32, 16, 4)} if INTERPRETER else
                 {"row_only": (16, 32, 8), "rows": (128, 16, 8)})

# -inf is written float("-inf") inside the kernels, not as a global tl.constexpr: inductor (torch
# 2.11) re-emits a user kernel's global constexprs by repr, and repr(-inf) is not Python


# ------------------------------------------------------------------------------------------------
# tile helpers (inlined into the kernels)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _tile_logits(Q, K, A, BS, CB, DB, EXCL, QL, KL, q, k, rows, cols, row_ok, col_ok,
                 D, stride_q, stride_k, n_words,
                 HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_D: tl.constexpr,
                 N_EXCL: tl.constexpr, LABELS: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 D_CHUNKS: tl.constexpr):
    """(l, valid, pos, s) of the tile rows x cols (int64 indices), s = <q_i, k_j> the raw dot.
    q (BLOCK_M, BLOCK_D) and k (BLOCK_N, BLOCK_D) are the resident tiles when D_CHUNKS == 1 (else
    unused)."""
    acc_ty = A.dtype.element_ty
    if D_CHUNKS == 1:
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=acc_ty)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
        for c in range(D_CHUNKS):
            dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
            dm = dd < D
            qc = tl.load(Q + rows[:, None] * stride_q + dd[None, :],
                         mask=row_ok[:, None] & dm[None, :], other=0.0)
            kc = tl.load(K + cols[:, None] * stride_k + dd[None, :],
                         mask=col_ok[:, None] & dm[None, :], other=0.0)
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC, out_dtype=acc_ty)
    a = tl.load(A + rows, mask=row_ok, other=0.0)
    l = s * a[:, None]
    if HAS_B:
        l = l * tl.load(BS + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_C:
        l = l + tl.load(CB + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_D:
        l = l + tl.load(DB + cols, mask=col_ok, other=0.0)[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    for e in tl.static_range(N_EXCL):
        ex = tl.load(EXCL + rows * N_EXCL + e, mask=row_ok, other=-1)
        valid = valid & (cols[None, :] != ex[:, None])
    pos = valid
    if LABELS == 1:
        ql = tl.load(QL + rows, mask=row_ok, other=0)
        kl = tl.load(KL + cols, mask=col_ok, other=0)
        pos = valid & (ql[:, None] == kl[None, :])
    if LABELS == 2:
        hit = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for w in range(n_words):
            qw = tl.load(QL + rows * n_words + w, mask=row_ok, other=0)
            kw = tl.load(KL + cols * n_words + w, mask=col_ok, other=0)
            hit = hit | ((qw[:, None] & kw[None, :]) != 0).to(tl.int32)
        pos = valid & (hit != 0)
    return l, valid, pos, s


@triton.jit
def _grad_tile(l, valid, pos, r0, w0, r1, w1, dp, cl, dc, g0, g1,
               N_GAMMA: tl.constexpr, LABELS: tl.constexpr, WANT_COL: tl.constexpr):
    """G_ij = valid * (w0_i exp(g0 l - r0_i) [+ w1_i exp(g1 l - r1_i)] [+ dp_i pos_ij]
    [+ dc_j exp(l - cl_j)]) with w = dR * gamma."""
    g = w0[:, None] * tl.exp(tl.where(valid, g0 * l - r0[:, None], float("-inf")))
    if N_GAMMA == 2:
        g += w1[:, None] * tl.exp(tl.where(valid, g1 * l - r1[:, None], float("-inf")))
    if LABELS != 0:
        g += tl.where(pos, dp[:, None], 0.0)
    if WANT_COL:
        g += dc[None, :] * tl.exp(tl.where(valid, l - cl[None, :], float("-inf")))
    return tl.where(valid, g, 0.0)


@triton.jit
def _tile_logits_t(Q, K, A, BS, CB, DB, EXCL, QL, KL, q, k, rows, cols, row_ok, col_ok,
                   D, stride_q, stride_k, n_words,
                   HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_D: tl.constexpr,
                   N_EXCL: tl.constexpr, LABELS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D_CHUNKS: tl.constexpr):
    """``_tile_logits`` transposed: (l^T, valid^T, pos^T) of shape (BLOCK_N, BLOCK_M), so that the
    key-side products G^T @ q take G^T as the left operand without a transpose."""
    acc_ty = A.dtype.element_ty
    if D_CHUNKS == 1:
        s = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=acc_ty)
    else:
        s = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_ty)
        for c in range(D_CHUNKS):
            dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
            dm = dd < D
            qc = tl.load(Q + rows[:, None] * stride_q + dd[None, :],
                         mask=row_ok[:, None] & dm[None, :], other=0.0)
            kc = tl.load(K + cols[:, None] * stride_k + dd[None, :],
                         mask=col_ok[:, None] & dm[None, :], other=0.0)
            s = tl.dot(kc, tl.trans(qc), s, input_precision=PREC, out_dtype=acc_ty)
    a = tl.load(A + rows, mask=row_ok, other=0.0)
    l = s * a[None, :]
    if HAS_B:
        l = l * tl.load(BS + cols, mask=col_ok, other=0.0)[:, None]
    if HAS_C:
        l = l + tl.load(CB + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_D:
        l = l + tl.load(DB + cols, mask=col_ok, other=0.0)[:, None]
    valid = col_ok[:, None] & row_ok[None, :]
    for e in tl.static_range(N_EXCL):
        ex = tl.load(EXCL + rows * N_EXCL + e, mask=row_ok, other=-1)
        valid = valid & (cols[:, None] != ex[None, :])
    pos = valid
    if LABELS == 1:
        ql = tl.load(QL + rows, mask=row_ok, other=0)
        kl = tl.load(KL + cols, mask=col_ok, other=0)
        pos = valid & (kl[:, None] == ql[None, :])
    if LABELS == 2:
        hit = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        for w in range(n_words):
            qw = tl.load(QL + rows * n_words + w, mask=row_ok, other=0)
            kw = tl.load(KL + cols * n_words + w, mask=col_ok, other=0)
            hit = hit | ((kw[:, None] & qw[None, :]) != 0).to(tl.int32)
        pos = valid & (hit != 0)
    return l, valid, pos


@triton.jit
def _grad_tile_t(l, valid, pos, r0, w0, r1, w1, dp, cl, dc, g0, g1,
                 N_GAMMA: tl.constexpr, LABELS: tl.constexpr, WANT_COL: tl.constexpr):
    """``_grad_tile`` on the transposed tile: G^T (keys x rows)."""
    g = w0[None, :] * tl.exp(tl.where(valid, g0 * l - r0[None, :], float("-inf")))
    if N_GAMMA == 2:
        g += w1[None, :] * tl.exp(tl.where(valid, g1 * l - r1[None, :], float("-inf")))
    if LABELS != 0:
        g += tl.where(pos, dp[None, :], 0.0)
    if WANT_COL:
        g += dc[:, None] * tl.exp(tl.where(valid, l - cl[:, None], float("-inf")))
    return tl.where(valid, g, 0.0)


@triton.jit
def _dot_rows(g, k, SCALE_G: tl.constexpr, PREC: tl.constexpr):
    """g (M, N) @ k (N, D) in the dtype of k, fp32/fp64 out. With SCALE_G each row of g is
    divided by its max |g| before the cast (fp16: no underflow) and multiplied back after."""
    acc_ty = g.dtype
    if SCALE_G:
        gmax = tl.max(tl.abs(g), 1)
        gmax = tl.where(gmax > 0, gmax, 1.0)
        h = (g / gmax[:, None]).to(k.dtype)
        return tl.dot(h, k, input_precision=PREC, out_dtype=acc_ty) * gmax[:, None]
    else:
        return tl.dot(g.to(k.dtype), k, input_precision=PREC, out_dtype=acc_ty)


@triton.jit
def _dot_cols(g, q, SCALE_G: tl.constexpr, PREC: tl.constexpr):
    """g^T (N, M) @ q (M, D), with per-column scaling of g under SCALE_G."""
    acc_ty = g.dtype
    if SCALE_G:
        gmax = tl.max(tl.abs(g), 0)
        gmax = tl.where(gmax > 0, gmax, 1.0)
        h = (g / gmax[None, :]).to(q.dtype)
        return tl.dot(tl.trans(h), q, input_precision=PREC, out_dtype=acc_ty) * gmax[:, None]
    else:
        return tl.dot(tl.trans(g.to(q.dtype)), q, input_precision=PREC, out_dtype=acc_ty)


@triton.jit
def _gammas(g0_hi, g0_lo, g1_hi, g1_lo, acc_ty: tl.constexpr):
    """The two gammas, passed as fp32 (hi, lo) pairs: ~48-bit exact for fp64."""
    # cast each part: inductor may pass the float arguments as fp64 scalars
    zero = tl.zeros([], dtype=acc_ty)
    return (((g0_hi + zero).to(acc_ty) + (g0_lo + zero).to(acc_ty)),
            ((g1_hi + zero).to(acc_ty) + (g1_lo + zero).to(acc_ty)))


@triton.jit
def _resident_tile(X, idx, ok, stride, offs_d, d_ok, D_CHUNKS: tl.constexpr):
    """The (len(idx), D) rows of X when the feature dim is resident in one chunk, else 0.0 (the
    chunked-D paths load each chunk where it is used)."""
    x = 0.0
    if D_CHUNKS == 1:
        x = tl.load(X + idx[:, None] * stride + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.0)
    return x


@triton.jit
def _row_stats(ROW_LSE, D_ROW, D_POS, rows, row_ok, B, g0, g1,
               N_GAMMA: tl.constexpr, LABELS: tl.constexpr):
    """What backward needs of a block of rows: the saved log-sum-exps r (per gamma), the
    incoming gradients scaled by their gamma w, and the gradient of the positive term dp."""
    r0 = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
    w0 = tl.load(D_ROW + rows, mask=row_ok, other=0.0) * g0
    r1 = r0
    w1 = w0
    if N_GAMMA == 2:
        r1 = tl.load(ROW_LSE + B + rows, mask=row_ok, other=0.0)
        w1 = tl.load(D_ROW + B + rows, mask=row_ok, other=0.0) * g1
    dp = w0
    if LABELS != 0:
        dp = tl.load(D_POS + rows, mask=row_ok, other=0.0)
    return r0, w0, r1, w1, dp


@triton.jit
def _add_chunked(OUT, out_idx, out_ok, X, x_idx, x_ok, stride_x, g, keep_old, offs_d, D,
                 SCALE_G: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                 D_CHUNKS: tl.constexpr):
    """OUT[out_idx] (+)= g @ X[x_idx], one BLOCK_D chunk of the feature dim at a time, for the
    non-resident D paths (``keep_old``, per output row: false on the program's first tile, which
    stores instead of adding)."""
    for c in range(D_CHUNKS):
        dd = c * BLOCK_D + offs_d
        dm = dd < D
        xc = tl.load(X + x_idx[:, None] * stride_x + dd[None, :], mask=x_ok[:, None] & dm[None, :],
                     other=0.0)
        ptr = OUT + out_idx[:, None] * D + dd[None, :]
        msk = out_ok[:, None] & dm[None, :]
        old = tl.load(ptr, mask=msk & keep_old[:, None], other=0.0)
        tl.store(ptr, old + _dot_rows(g, xc, SCALE_G, PREC), mask=msk)
    tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# autotuning
# ------------------------------------------------------------------------------------------------


def _configs(kind: str):
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": ALIGN_M, "BLOCK_N": ALIGN_N}, num_warps=1, num_stages=1)]
    # (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from scripts/triton_aot_check.py's sm_90
    # register / spill report: configs that spill on the common variants are left out
    shapes = {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (64, 64, 4, 3),
                (64, 32, 4, 2)],
        "bwd_q": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2)],
        # key side: BLOCK_N is the M of its products (G^T @ q): wgmma wants it >= 64
        "bwd_k": [(32, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# Autotuning on (default): every config is timed once per key (Triton skips configs that exceed
# the shared memory). Off (CK_TRITON_AUTOTUNE=0 or set_autotune(False), e.g. for correctness
# tests): the first 64 x 64 config of each list, with fewer pipeline stages where its estimated
# shared memory exceeds the device's (fp32 with a resident D of 128 on the key side, on an H100:
# 258 KiB at 3 stages against 227 KiB).
_AUTOTUNE = os.environ.get("CK_TRITON_AUTOTUNE", "1") != "0"
_DEFAULT_TILE = (64, 64)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)


def _smem_estimate(config, block_d: int, elem_bytes: int) -> int:
    """An upper estimate of a tile config's shared memory: the pipelined (q, k) tiles of every stage
    plus fp32 staging of a key tile pair and of the score tile (calibrated on the sm_90 reports of
    the key-side kernel, whose fp32 variants need 258-262 KiB at (64, 64, 3 stages), D=128)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return config.num_stages * (bm + bn) * block_d * elem_bytes + 2 * bn * block_d * 4 + bm * bn * 4


def _fit_stages(config, named_args, kwargs):
    """``config`` with as many pipeline stages as fit the device's shared memory (at least 1)."""
    q, block_d = named_args.get("Q"), kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if not (torch.is_tensor(q) and q.is_cuda and block_d):
        return config
    limit = _smem_limit(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return stages_that_fit(config, block_d, q.element_size(), limit)


def stages_that_fit(config, block_d: int, elem_bytes: int, limit: int):
    """``config`` with its pipeline stages lowered until the estimate fits ``limit`` (at least 1)."""
    stages = config.num_stages
    while stages > 1 and _smem_estimate(_with_stages(config, stages), block_d, elem_bytes) > limit:
        stages -= 1
    return config if stages == config.num_stages else _with_stages(config, stages)


def _with_stages(config, stages: int):
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages)


def set_autotune(enabled: bool) -> None:
    """Time every tile config on the first call of each shape key (True), or use one default."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def _prune(configs, named_args, **kwargs):
    if _AUTOTUNE or len(configs) == 1:
        return configs
    for c in configs:
        if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N")) == _DEFAULT_TILE:
            return [_fit_stages(c, named_args, kwargs)]
    return [_fit_stages(configs[-1], named_args, kwargs)]


_PRUNE = {"early_config_prune": _prune}

_KEY = ["D", "rows_per_group", "cols_per_split", "HAS_B", "HAS_C", "HAS_D", "N_EXCL", "LABELS",
        "N_GAMMA", "WANT_COL", "PREC", "BLOCK_D", "D_CHUNKS"]


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


# reset_to_zero: the candidate counters (CAND) are atomics; the autotuner's timing runs must not
# accumulate into them (for other variants CAND_CNT is a scratch buffer)
@triton.autotune(configs=_configs("fwd"), key=_KEY + ["ROW_ONLY", "CAND"], prune_configs_by=_PRUNE,
                 reset_to_zero=["CAND_CNT"])
@triton.jit
def _lse_fwd_kernel(Q, K, A, BS, CB, DB, EXCL, QL, KL, g0_hi, g0_lo, g1_hi, g1_lo,
                  ROW_M, ROW_S, POS_P, CNT_P, COL_M, COL_S, ROW_E, THR, CAND_K, CAND_CNT,
                  B, N, D, stride_q, stride_k, n_words, rows_per_group, cols_per_split, cand_cap,
                  HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_D: tl.constexpr,
                  N_EXCL: tl.constexpr, LABELS: tl.constexpr, N_GAMMA: tl.constexpr,
                  WANT_COL: tl.constexpr, ROW_ONLY: tl.constexpr, CAND: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K forward (module docstring). CAND (the hard negatives of mixing, triton/mixing.py):
    also append to row i's list (CAND_K: int64 top-k keys of triton/topk.py, the order-preserving
    bits of the raw fp32 dot in the high word and the complemented column in the low word) every
    valid column with the raw dot s_ij >= T_i = t - 2^-7 |t|, t = THR[i] in fp32
    (_loss_topk.lower_threshold; THR in any float dtype): per tile one atomic add on CAND_CNT[i]
    reserves the slots, a prefix sum over the columns places them; slots at or past cand_cap are
    dropped (CAND_CNT still counts them, so the caller sees the overflow)."""
    rg = tl.program_id(0)
    sp = tl.program_id(1)
    acc_ty = A.dtype.element_ty
    row_lo = rg * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, B)
    col_lo = sp * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g0, g1 = _gammas(g0_hi, g0_lo, g1_hi, g1_lo, acc_ty)
    for i0 in range(row_lo, row_hi, BLOCK_M):
        rows = (i0 + offs_m).to(tl.int64)
        row_ok = rows < row_hi
        q = _resident_tile(Q, rows, row_ok, stride_q, offs_d, d_ok, D_CHUNKS)
        m0 = tl.full([BLOCK_M], float("-inf"), acc_ty)
        s0 = tl.zeros([BLOCK_M], dtype=acc_ty)
        m1 = tl.full([BLOCK_M], float("-inf"), acc_ty)
        s1 = tl.zeros([BLOCK_M], dtype=acc_ty)
        psum = tl.zeros([BLOCK_M], dtype=acc_ty)
        pcnt = tl.zeros([BLOCK_M], dtype=acc_ty)
        e_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_ty)
        thr = tl.zeros([BLOCK_M], dtype=tl.float32)
        if CAND:
            t_s = tl.load(THR + rows, mask=row_ok, other=float("inf")).to(tl.float32)
            thr = t_s - tl.abs(t_s) * 0.0078125  # 2^-7: _loss_topk.THRESHOLD_MARGIN
        for j0 in range(col_lo, col_hi, BLOCK_N):
            cols = (j0 + offs_n).to(tl.int64)
            col_ok = cols < col_hi
            k = _resident_tile(K, cols, col_ok, stride_k, offs_d, d_ok, D_CHUNKS)
            l, valid, pos, s = _tile_logits(Q, K, A, BS, CB, DB, EXCL, QL, KL, q, k, rows, cols,
                                            row_ok, col_ok, D, stride_q, stride_k, n_words,
                                            HAS_B, HAS_C, HAS_D, N_EXCL, LABELS, PREC,
                                            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS)
            z = tl.where(valid, l * g0, float("-inf"))
            m_new = tl.maximum(m0, tl.max(z, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m0 - shift)
            p = tl.exp(z - shift[:, None])
            s0 = s0 * alpha + tl.sum(p, 1)
            m0 = m_new
            if ROW_ONLY:
                if HAS_B:
                    p = p * tl.load(BS + cols, mask=col_ok, other=0.0)[None, :]
                e_acc = e_acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC,
                                                        out_dtype=acc_ty)
            if N_GAMMA == 2:
                z = tl.where(valid, l * g1, float("-inf"))
                m_new = tl.maximum(m1, tl.max(z, 1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s1 = s1 * tl.exp(m1 - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
                m1 = m_new
            if LABELS != 0:
                psum += tl.sum(tl.where(pos, l, 0.0), 1)
                pcnt += tl.sum(pos.to(acc_ty), 1)
            if CAND:
                hit = (valid & (s >= thr[:, None])).to(tl.int32)
                n_hit = tl.sum(hit, 1)
                if tl.max(n_hit, 0) > 0:
                    base = tl.atomic_add(CAND_CNT + rows, n_hit, mask=n_hit > 0)
                    slot = base[:, None] + tl.cumsum(hit, 1) - 1
                    ptr = rows[:, None] * cand_cap + slot
                    keep = (hit != 0) & (slot < cand_cap)
                    key = _pack(s.to(tl.float32), tl.broadcast_to(cols[None, :], [BLOCK_M, BLOCK_N]))
                    tl.store(CAND_K + ptr, key, mask=keep)
            if WANT_COL:
                # running (max, sum) of this row group for these columns; fresh at its first row block
                zc = tl.where(valid, l, float("-inf"))
                c_ptr = rg.to(tl.int64) * N + cols
                keep = col_ok & ((offs_n * 0 + i0) != row_lo)
                cm = tl.load(COL_M + c_ptr, mask=keep, other=float("-inf"))
                cs = tl.load(COL_S + c_ptr, mask=keep, other=0.0)
                cm_new = tl.maximum(cm, tl.max(zc, 0))
                cshift = tl.where(cm_new == float("-inf"), 0.0, cm_new)
                cs = cs * tl.exp(cm - cshift) + tl.sum(tl.exp(zc - cshift[None, :]), 0)
                tl.store(COL_M + c_ptr, cm_new, mask=col_ok)
                tl.store(COL_S + c_ptr, cs, mask=col_ok)
        if WANT_COL:
            tl.debug_barrier()  # this row block's column updates, before the next block reads them
        out = (sp * N_GAMMA).to(tl.int64) * B + rows
        tl.store(ROW_M + out, m0, mask=row_ok)
        tl.store(ROW_S + out, s0, mask=row_ok)
        if N_GAMMA == 2:
            tl.store(ROW_M + out + B, m1, mask=row_ok)
            tl.store(ROW_S + out + B, s1, mask=row_ok)
        if LABELS != 0:
            tl.store(POS_P + sp.to(tl.int64) * B + rows, psum, mask=row_ok)
            tl.store(CNT_P + sp.to(tl.int64) * B + rows, pcnt, mask=row_ok)
        if ROW_ONLY:
            e_ptr = ROW_E + (sp.to(tl.int64) * B + rows)[:, None] * D + offs_d[None, :]
            tl.store(e_ptr, e_acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _log_total(mx, tot):
    """mx + log(tot): -inf for an empty sum (without evaluating log 0), NaN stays NaN."""
    return tl.where(tot == 0, float("-inf"), mx + tl.log(tl.where(tot == 0, 1.0, tot)))


@triton.jit
def _row_merge_kernel(ROW_M, ROW_S, POS_P, CNT_P, ROW_E, OUT_LSE, OUT_POS, OUT_CNT, OUT_E,
                      EXTRA, S, B, D, N_GAMMA: tl.constexpr, LABELS: tl.constexpr,
                      ROW_ONLY: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the (m, s) partials of S key splits: lse = M + log sum_s s_s exp(m_s - M); label
    sums add up (zeros without labels); with ROW_ONLY the normalized E = sum_s exp(m_s - M) E_s /
    sum, BLOCK_D features per program (grid axis 1). HAS_EXTRA (one gamma): EXTRA[i] is one more
    logit of row i (InfoNCE's positive), merged as a split (EXTRA[i], 1): the lse and the
    normalization of E include it.

    The splits are read BLOCK_S at a time (independent loads in flight instead of a chain of S
    dependent ones), and E's B D S values are spread over row x feature blocks: at MoCo's B = 256
    row blocks alone are a handful of programs (8 of them, S = 66: 32 us on an H100). The
    programs of axis 1 = 0 write the row statistics."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < B
    head = row_ok & (rows * 0 + tl.program_id(1) == 0)  # the rows this program writes statistics of
    splits = tl.arange(0, BLOCK_S)
    acc_ty = OUT_LSE.dtype.element_ty
    for g in tl.static_range(N_GAMMA):
        mx = tl.full([BLOCK_R], float("-inf"), acc_ty)
        tot = tl.zeros([BLOCK_R], dtype=acc_ty)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + splits
            ok = (ss < S)[:, None] & row_ok[None, :]
            ptr = (ss[:, None] * N_GAMMA + g) * B + rows[None, :]
            m = tl.load(ROW_M + ptr, mask=ok, other=float("-inf"))  # (BLOCK_S, BLOCK_R)
            t = tl.load(ROW_S + ptr, mask=ok, other=0.0)
            new = tl.maximum(mx, tl.max(m, 0))
            shift = tl.where(new == float("-inf"), 0.0, new)
            tot = tot * tl.exp(mx - shift) + tl.sum(t * tl.exp(m - shift[None, :]), 0)
            mx = new
        if HAS_EXTRA and g == 0:
            x = tl.load(EXTRA + rows, mask=row_ok, other=float("-inf")).to(acc_ty)
            new = tl.maximum(mx, x)
            shift = tl.where(new == float("-inf"), 0.0, new)
            tot = tot * tl.exp(mx - shift) + tl.exp(x - shift)
            mx = new
        lse = _log_total(mx, tot)
        tl.store(OUT_LSE + g * B + rows, lse, mask=head)
        if ROW_ONLY and g == 0:
            offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            shift = tl.where(mx == float("-inf"), 0.0, mx)
            inv = tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)
            e = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_ty)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + splits
                ok = (ss < S)[:, None] & row_ok[None, :]
                m = tl.load(ROW_M + ss[:, None] * N_GAMMA * B + rows[None, :], mask=ok,
                            other=float("-inf"))
                w = tl.exp(m - shift[None, :]) * inv[None, :]  # (BLOCK_S, BLOCK_R)
                e_ptr = ROW_E + (ss[:, None] * B + rows[None, :])[:, :, None] * D + offs_d[None, None, :]
                part = tl.load(e_ptr, mask=(ok & (w > 0))[:, :, None] & d_ok[None, None, :], other=0.0)
                e += tl.sum(w[:, :, None] * part, 0)
            tl.store(OUT_E + rows[:, None] * D + offs_d[None, :], e,
                     mask=row_ok[:, None] & d_ok[None, :])
    # without labels the sums are zeros: written here, not by two fills on the host
    ps = tl.zeros([BLOCK_R], dtype=acc_ty)
    pc = tl.zeros([BLOCK_R], dtype=acc_ty)
    if LABELS != 0:
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + splits
            ok = (ss < S)[:, None] & row_ok[None, :]
            ps += tl.sum(tl.load(POS_P + ss[:, None] * B + rows[None, :], mask=ok, other=0.0), 0)
            pc += tl.sum(tl.load(CNT_P + ss[:, None] * B + rows[None, :], mask=ok, other=0.0), 0)
    tl.store(OUT_POS + rows, ps, mask=head)
    tl.store(OUT_CNT + rows, pc, mask=head)


@triton.jit
def _col_merge_kernel(COL_M, COL_S, OUT, R, N, BLOCK: tl.constexpr):
    """col_lse[j] = merge over the R row groups of their (max, sum) pairs."""
    cols = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = cols < N
    acc_ty = OUT.dtype.element_ty
    mx = tl.full([BLOCK], float("-inf"), acc_ty)
    tot = tl.zeros([BLOCK], dtype=acc_ty)
    for r in range(R):
        m = tl.load(COL_M + r * N + cols, mask=ok, other=float("-inf"))
        t = tl.load(COL_S + r * N + cols, mask=ok, other=0.0)
        new = tl.maximum(mx, m)
        shift = tl.where(new == float("-inf"), 0.0, new)
        tot = tot * tl.exp(mx - shift) + t * tl.exp(m - shift)
        mx = new
    tl.store(OUT + cols, _log_total(mx, tot), mask=ok)


# The widest candidate list the merge sorts in one program (registers: 16 warps of 16384 int64)
CAND_MERGE_MAX_WIDTH = 16384


def cand_merge_width(capacity: int, n_hard: int) -> int:
    """The merge's WIDTH for a plan (mixing.fused_topk_reason refuses those over the maximum)."""
    return next_power_of_2(max(int(capacity), int(n_hard)))


@triton.jit
def _cand_merge_kernel(CAND_K, CAND_CNT, LSE, HARD, INEXACT, B, cand_cap, n_hard,
                       N_GAMMA: tl.constexpr, WIDTH: tl.constexpr):
    """CAND mode's hard negatives, one program per row i: the n_hard largest of its first
    min(count_i, cand_cap) keys (the slots the loss kernel reserved and wrote; the rest of the
    row is never read, so the buffer needs no fill), sorted largest first (WIDTH: cand_cap
    rounded up to a power of two, padded with INT64_MIN), as columns j = 2^32 - 1 - (key &
    (2^32 - 1)): topk's order (score, then the lower column). INEXACT[i] = 1 unless n_hard <=
    count_i <= cand_cap and every lse of the row is finite (_loss_topk.py): the host finds the
    rows to redo with one nonzero."""
    row = tl.program_id(0).to(tl.int64)
    cnt = tl.load(CAND_CNT + row)
    offs = tl.arange(0, WIDTH)
    keys = tl.load(CAND_K + row * cand_cap + offs, mask=offs < tl.minimum(cnt, cand_cap),
                   other=-9223372036854775808)  # topk.INT64_MIN (a literal: not a jit global)
    keys = tl.sort(keys, descending=True)
    tl.store(HARD + row * n_hard + offs, _unpack_index(keys), mask=offs < n_hard)
    exact = (cnt >= n_hard) & (cnt <= cand_cap)
    for g in tl.static_range(N_GAMMA):
        exact = exact & (tl.abs(tl.load(LSE + g * B + row)) < float("inf"))  # false for NaN too
    tl.store(INEXACT + row, tl.where(exact, 0, 1).to(tl.int32))


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs("bwd_q"), key=_KEY + ["SCALE_G"], prune_configs_by=_PRUNE)
@triton.jit
def _lse_bwd_q_kernel(Q, K, A, BS, CB, DB, EXCL, QL, KL, g0_hi, g0_lo, g1_hi, g1_lo, ROW_LSE, D_ROW, D_POS, COL_LSE, D_COL,
                    DQ_P, GS_P, B, N, D, stride_q, stride_k, n_words, rows_per_group, cols_per_split,
                    HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_D: tl.constexpr,
                    N_EXCL: tl.constexpr, LABELS: tl.constexpr, N_GAMMA: tl.constexpr,
                    WANT_COL: tl.constexpr, SCALE_G: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query side: per split sp, DQ_P[sp, i] = sum_j G_ij b_j k_j and GS_P[sp, i] = sum_j G_ij."""
    rg = tl.program_id(0)
    sp = tl.program_id(1)
    acc_ty = A.dtype.element_ty
    row_lo = rg * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, B)
    col_lo = sp * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g0, g1 = _gammas(g0_hi, g0_lo, g1_hi, g1_lo, acc_ty)
    for i0 in range(row_lo, row_hi, BLOCK_M):
        rows = (i0 + offs_m).to(tl.int64)
        row_ok = rows < row_hi
        q = _resident_tile(Q, rows, row_ok, stride_q, offs_d, d_ok, D_CHUNKS)
        r0, w0, r1, w1, dp = _row_stats(ROW_LSE, D_ROW, D_POS, rows, row_ok, B, g0, g1,
                                        N_GAMMA, LABELS)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_ty)
        gs = tl.zeros([BLOCK_M], dtype=acc_ty)
        out_rows = sp.to(tl.int64) * B + rows
        for j0 in range(col_lo, col_hi, BLOCK_N):
            cols = (j0 + offs_n).to(tl.int64)
            col_ok = cols < col_hi
            k = _resident_tile(K, cols, col_ok, stride_k, offs_d, d_ok, D_CHUNKS)
            l, valid, pos, s = _tile_logits(Q, K, A, BS, CB, DB, EXCL, QL, KL, q, k, rows, cols,
                                            row_ok, col_ok, D, stride_q, stride_k, n_words,
                                            HAS_B, HAS_C, HAS_D, N_EXCL, LABELS, PREC,
                                            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS)
            cl = r0
            dc = r0
            if WANT_COL:
                cl = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
                dc = tl.load(D_COL + cols, mask=col_ok, other=0.0)
            g = _grad_tile(l, valid, pos, r0, w0, r1, w1, dp, cl, dc, g0, g1, N_GAMMA, LABELS, WANT_COL)
            gs += tl.sum(g, 1)
            if HAS_B:
                g = g * tl.load(BS + cols, mask=col_ok, other=0.0)[None, :]
            if D_CHUNKS == 1:
                acc += _dot_rows(g, k, SCALE_G, PREC)
            else:
                _add_chunked(DQ_P, out_rows, row_ok, K, cols, col_ok, stride_k, g,
                             (offs_m * 0 + j0) != col_lo, offs_d, D, SCALE_G, PREC, BLOCK_D,
                             D_CHUNKS)
        if D_CHUNKS == 1:
            tl.store(DQ_P + out_rows[:, None] * D + offs_d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])
        tl.store(GS_P + out_rows, gs, mask=row_ok)


@triton.autotune(configs=_configs("bwd_k"), key=_KEY + ["SCALE_G", "FUSED_DQ"],
                 reset_to_zero=["DQ_A", "GS_A"], prune_configs_by=_PRUNE)
@triton.jit
def _lse_bwd_k_kernel(Q, K, A, BS, CB, DB, EXCL, QL, KL, g0_hi, g0_lo, g1_hi, g1_lo, ROW_LSE, D_ROW, D_POS, COL_LSE, D_COL,
                    DK_P, CS_P, DQ_A, GS_A, B, N, D, stride_q, stride_k, n_words,
                    rows_per_group, cols_per_split,
                    HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_D: tl.constexpr,
                    N_EXCL: tl.constexpr, LABELS: tl.constexpr, N_GAMMA: tl.constexpr,
                    WANT_COL: tl.constexpr, SCALE_G: tl.constexpr, FUSED_DQ: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key side: per row split sp, DK_P[sp, j] = sum_i G_ij a_i q_i and CS_P[sp, j] = sum_i G_ij.
    Grid (key groups, row splits): here cols_per_split is the key-group width and rows_per_group
    the row-split height. FUSED_DQ: also DQ_A[i] += sum_j G_ij b_j k_j, GS_A[i] += sum_j G_ij
    (fp32 atomics; D_CHUNKS == 1 only)."""
    cg = tl.program_id(0)
    sp = tl.program_id(1)
    acc_ty = A.dtype.element_ty
    col_lo = cg * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    row_lo = sp * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, B)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g0, g1 = _gammas(g0_hi, g0_lo, g1_hi, g1_lo, acc_ty)
    for j0 in range(col_lo, col_hi, BLOCK_N):
        cols = (j0 + offs_n).to(tl.int64)
        col_ok = cols < col_hi
        k = _resident_tile(K, cols, col_ok, stride_k, offs_d, d_ok, D_CHUNKS)
        cl = tl.zeros([BLOCK_N], dtype=acc_ty)
        dc = cl
        if WANT_COL:
            cl = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
            dc = tl.load(D_COL + cols, mask=col_ok, other=0.0)
        bj = cl
        if HAS_B:
            bj = tl.load(BS + cols, mask=col_ok, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_ty)
        cs = tl.zeros([BLOCK_N], dtype=acc_ty)
        out_cols = sp.to(tl.int64) * N + cols
        for i0 in range(row_lo, row_hi, BLOCK_M):
            rows = (i0 + offs_m).to(tl.int64)
            row_ok = rows < row_hi
            q = _resident_tile(Q, rows, row_ok, stride_q, offs_d, d_ok, D_CHUNKS)
            r0, w0, r1, w1, dp = _row_stats(ROW_LSE, D_ROW, D_POS, rows, row_ok, B, g0, g1,
                                            N_GAMMA, LABELS)
            lt, valid, pos = _tile_logits_t(Q, K, A, BS, CB, DB, EXCL, QL, KL, q, k, rows, cols,
                                            row_ok, col_ok, D, stride_q, stride_k, n_words,
                                            HAS_B, HAS_C, HAS_D, N_EXCL, LABELS, PREC,
                                            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS)
            gt = _grad_tile_t(lt, valid, pos, r0, w0, r1, w1, dp, cl, dc, g0, g1, N_GAMMA, LABELS,
                              WANT_COL)  # G^T: (keys, rows)
            cs += tl.sum(gt, 1)
            if FUSED_DQ:
                tl.atomic_add(GS_A + rows, tl.sum(gt, 0), mask=row_ok)
                gbt = gt
                if HAS_B:
                    gbt = gt * bj[:, None]
                tl.atomic_add(DQ_A + rows[:, None] * D + offs_d[None, :],
                              _dot_cols(gbt, k, SCALE_G, PREC), mask=row_ok[:, None] & d_ok[None, :])
            gat = gt * tl.load(A + rows, mask=row_ok, other=0.0)[None, :]
            if D_CHUNKS == 1:
                acc += _dot_rows(gat, q, SCALE_G, PREC)
            else:
                _add_chunked(DK_P, out_cols, col_ok, Q, rows, row_ok, stride_q, gat,
                             (offs_n * 0 + i0) != row_lo, offs_d, D, SCALE_G, PREC, BLOCK_D,
                             D_CHUNKS)
        if D_CHUNKS == 1:
            tl.store(DK_P + out_cols[:, None] * D + offs_d[None, :], acc,
                     mask=col_ok[:, None] & d_ok[None, :])
        tl.store(CS_P + out_cols, cs, mask=col_ok)


@triton.jit
def _grad_finish_kernel(ACC, GS, X, SC, DX, DSC, DBI, S, n, D, stride_x,
                        HAS_SC: tl.constexpr, WANT_DX: tl.constexpr, WANT_DSC: tl.constexpr,
                        WANT_DBI: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        D_CHUNKS: tl.constexpr):
    """acc = sum_s ACC[s]: DX = SC * acc (in the dtype of DX), DSC = <X, acc>, DBI = sum_s GS[s]."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n
    acc_ty = ACC.dtype.element_ty
    sc = tl.zeros([BLOCK_R], dtype=acc_ty) + 1.0
    if HAS_SC:
        sc = tl.load(SC + rows, mask=row_ok, other=0.0)
    dsc = tl.zeros([BLOCK_R], dtype=acc_ty)
    if WANT_DX or WANT_DSC:
        for c in range(D_CHUNKS):
            dd = c * BLOCK_D + tl.arange(0, BLOCK_D)
            msk = row_ok[:, None] & (dd < D)[None, :]
            tot = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_ty)
            for s in range(S):
                tot += tl.load(ACC + (s * n + rows)[:, None] * D + dd[None, :], mask=msk, other=0.0)
            if WANT_DX:
                tl.store(DX + rows[:, None] * D + dd[None, :],
                         (tot * sc[:, None]).to(DX.dtype.element_ty), mask=msk)
            if WANT_DSC:
                x = tl.load(X + rows[:, None] * stride_x + dd[None, :], mask=msk, other=0.0)
                dsc += tl.sum(x.to(acc_ty) * tot, 1)
    if WANT_DSC:
        tl.store(DSC + rows, dsc, mask=row_ok)
    if WANT_DBI:
        gs = tl.zeros([BLOCK_R], dtype=acc_ty)
        for s in range(S):
            gs += tl.load(GS + s * n + rows, mask=row_ok, other=0.0)
        tl.store(DBI + rows, gs, mask=row_ok)


@triton.jit
def _row_dot_kernel(A, B, OUT, n, D, stride_a, stride_b, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """OUT[i] = sum_d A[i, d] B[i, d], products and sum in OUT's dtype (fp32): the positive logits'
    dot products in one launch (``paired_dot``)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n
    acc_ty = OUT.dtype.element_ty
    acc = tl.zeros([BLOCK_R], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        msk = row_ok[:, None] & (dd < D)[None, :]
        a = tl.load(A + rows[:, None] * stride_a + dd[None, :], mask=msk, other=0.0).to(acc_ty)
        b = tl.load(B + rows[:, None] * stride_b + dd[None, :], mask=msk, other=0.0).to(acc_ty)
        acc += tl.sum(a * b, 1)
    tl.store(OUT + rows, acc, mask=row_ok)


@triton.jit
def _row_dot_bwd_kernel(G, A, B, DA, DB, n, D, stride_a, stride_b, WANT_A: tl.constexpr,
                        WANT_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DA[i] = G[i] B[i] and DB[i] = G[i] A[i], formed in G's dtype (fp32) and rounded to the
    dtype of DA / DB."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n
    acc_ty = G.dtype.element_ty
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        msk = row_ok[:, None] & (dd < D)[None, :]
        if WANT_A:
            b = tl.load(B + rows[:, None] * stride_b + dd[None, :], mask=msk, other=0.0).to(acc_ty)
            tl.store(DA + rows[:, None] * D + dd[None, :], (g[:, None] * b).to(DA.dtype.element_ty),
                     mask=msk)
        if WANT_B:
            a = tl.load(A + rows[:, None] * stride_a + dd[None, :], mask=msk, other=0.0).to(acc_ty)
            tl.store(DB + rows[:, None] * D + dd[None, :], (g[:, None] * a).to(DB.dtype.element_ty),
                     mask=msk)


# ------------------------------------------------------------------------------------------------
# host side: plans, launches, the family op
# ------------------------------------------------------------------------------------------------

# Per-split work below which splitting the key axis further only adds merge traffic.
MIN_SPLIT_COLS = 1024
MIN_SPLIT_ROWS = 1024
_plan_overrides: dict = {}


@contextlib.contextmanager
def plan_override(**kw):
    """Force parts of the launch plan (tests, tuning experiments): ``fwd=(rows_per_group,
    cols_per_split)``, ``q=(rows, cols)``, ``k=(rows, cols)`` (each a multiple of the tile),
    ``max_reg_d`` / ``chunk_d`` (feature-dim chunking), ``fused`` (bool: the atomic dQ path)."""
    old = dict(_plan_overrides)
    _plan_overrides.update(kw)
    try:
        yield
    finally:
        _plan_overrides.clear()
        _plan_overrides.update(old)


_sm_counts: dict = {}


def _n_sm(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 tiles use 3xTF32 (fp32-like accuracy on tensor cores) unless
    the user allowed TF32 matmuls; other dtypes are exact products."""
    if dtype == torch.float32 and not INTERPRETER:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def _d_blocks(d: int, dtype: torch.dtype):
    """(BLOCK_D, D_CHUNKS): the whole feature dim resident up to MAX_REG_D_BYTES per row, else
    chunks of CHUNK_D (of MAX_REG_D_BYTES / itemsize when that is smaller)."""
    itemsize = dtype.itemsize
    max_reg = _plan_overrides.get("max_reg_d", MAX_REG_D_BYTES // itemsize)
    if d <= max_reg:
        return max(16, next_power_of_2(d)), 1
    chunk = _plan_overrides.get("chunk_d", min(CHUNK_D, max(16, MAX_REG_D_BYTES // itemsize)))
    return chunk, cdiv(d, chunk)


def row_only_supported(d: int, dtype: torch.dtype, n_gamma: int, has_labels: bool) -> bool:
    """The forward accumulation of E needs the feature dim resident and one gamma, no labels
    (the MoCo / QK bank case); otherwise the row-only case uses the recompute backward."""
    return _d_blocks(d, dtype)[1] == 1 and n_gamma == 1 and not has_labels


def _split(n: int, align: int, parts: int):
    """Cut n into at most ``parts`` pieces of a width that is a multiple of ``align``:
    (width, count), every piece non-empty."""
    blocks = max(1, cdiv(n, align))
    parts = max(1, min(parts, blocks))
    width = cdiv(blocks, parts) * align
    return width, max(1, cdiv(n, width))


def _fwd_plan(b: int, n: int, want_col: bool, device, waves: int = 2):
    """(rows_per_group, R, cols_per_split, S) of the forward grid (R, S), about ``waves``
    programs per SM."""
    if "fwd" in _plan_overrides:
        rows, cols = _plan_overrides["fwd"]
        return (*_split(b, rows, cdiv(b, rows)), *_split(n, cols, cdiv(n, cols)))
    if INTERPRETER:  # two tiles per group / split by default: exercises the loops and the merges
        return (*_split(b, 2 * ALIGN_M, b), *_split(n, waves * ALIGN_N, n))
    target = waves * _n_sm(device)
    n_rb, n_cb = cdiv(b, ALIGN_M), cdiv(n, ALIGN_N)
    if want_col:  # a balanced rectangle per program: R x N column partials stay small
        r = int(round((target * n_rb / max(1, n_cb)) ** 0.5))
        r = max(1, min(n_rb, r))
    else:
        r = n_rb
    s = max(1, min(cdiv(target, r), cdiv(n, MIN_SPLIT_COLS)))
    return (*_split(b, ALIGN_M, r), *_split(n, ALIGN_N, s))


def _bwd_plan(side: str, b: int, n: int, device, waves: int = 2):
    """Query side: (rows_per_group, R, cols_per_split, S) of grid (R, S); key side: (rows per
    split, S, cols per group, C) of grid (C, S); about ``waves`` programs per SM."""
    if side in _plan_overrides:
        rows, cols = _plan_overrides[side]
        return (*_split(b, rows, cdiv(b, rows)), *_split(n, cols, cdiv(n, cols)))
    if INTERPRETER:
        if side == "q":
            return (*_split(b, ALIGN_M, b), *_split(n, waves * ALIGN_N, n))
        return (*_split(b, waves * ALIGN_M, b), *_split(n, ALIGN_N, n))
    target = waves * _n_sm(device)
    if side == "q":
        r = cdiv(b, ALIGN_M)
        s = max(1, min(cdiv(target, r), cdiv(n, MIN_SPLIT_COLS)))
        return (*_split(b, ALIGN_M, r), *_split(n, ALIGN_N, s))
    c = cdiv(n, ALIGN_N)
    s = max(1, min(cdiv(target, c), cdiv(b, MIN_SPLIT_ROWS)))
    return (*_split(b, ALIGN_M, s), *_split(n, ALIGN_N, c))


# Split-count tuning: on the first eager CUDA call of each shape key the launch plans are timed
# at SPLIT_WAVES programs per SM (more splits: more parallelism, more partials to merge) and the
# fastest is kept; traced / captured / CPU calls use the cached choice or the default of 2.
# CK_TRITON_TUNE_SPLITS=0 turns it off.
SPLIT_WAVES = (1, 2, 4)
_TUNE_SPLITS = os.environ.get("CK_TRITON_TUNE_SPLITS", "1") != "0"
_waves_cache: dict = {}
_forced_waves = None


def _bench(fn, reps: int = 10) -> float:
    """Median ms of ``fn`` over CUDA-event-timed calls. No L2 flush between calls, unlike
    triton.testing.do_bench, whose 256 MB flush buffer would be a first-call memory spike; the
    plans compared here differ by more than the cache effect."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def _can_tune(t: torch.Tensor) -> bool:
    if not _TUNE_SPLITS or "fwd" in _plan_overrides:
        return False
    if t.device.type != "cuda" and not _plan_overrides.get("tune_on_cpu", False):
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _waves(key, t: torch.Tensor, run) -> int:
    """Programs per SM for this shape key: timed once over SPLIT_WAVES (see above)."""
    global _forced_waves
    if _forced_waves is not None:
        return _forced_waves
    if key in _waves_cache:
        return _waves_cache[key]
    if not _can_tune(t):
        return 2
    times = {}
    try:
        for w in SPLIT_WAVES:
            _forced_waves = w
            run()  # first call: compiles and autotunes the tiles of this plan
            times[w] = _bench(run)
    finally:
        _forced_waves = None
    _waves_cache[key] = min(times, key=times.get)
    return _waves_cache[key]


def _label_mode(q_labels) -> tuple:
    if q_labels is None:
        return 0, 1
    if q_labels.dim() == 1:
        return 1, 1
    return 2, q_labels.shape[1]


def forward_topk_outputs(q, k, gammas, row_only, n_hard):
    """``forward_outputs`` plus the hard negatives of ``lse_forward_topk`` (also its fake kernel):
    hard (B, n_hard) int64, inexact flags (B,) int32."""
    b = q.shape[0]
    return (*forward_outputs(q, k, gammas, False, row_only),
            q.new_empty((b, n_hard), dtype=torch.int64), q.new_empty((b,), dtype=torch.int32))


def forward_outputs(q, k, gammas, want_col_lse, row_only):
    """Empty outputs of the forward op (also its fake kernel): row_lse (G, B), pos_sum (B,),
    pos_count (B,), col_lse (N,) or (0,), row_e (B, D) or (0, D) -- all in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    b, d = q.shape
    n = k.shape[0]
    new = lambda *shape: q.new_empty(shape, dtype=acc)  # noqa: E731
    return (new(len(gammas), b), new(b), new(b), new(n if want_col_lse else 0),
            new(b if row_only else 0, d))


def backward_outputs(q, k, row_scale, col_scale, row_bias, col_bias, need):
    """Empty gradients of the backward op (also its fake kernel), each in its input's dtype;
    gradients not asked for are empty (0,) tensors."""
    like = (q, k, row_scale, col_scale, row_bias, col_bias)
    out = []
    for t, wanted in zip(like, need):
        if wanted and t is not None:
            out.append(torch.empty_like(t, memory_format=torch.contiguous_format))
        else:
            out.append(q.new_empty((0,), dtype=_acc_dtype(q.dtype)))
    return tuple(out)


def gamma_pairs(gammas):
    """One or two gammas as the kernels' scalar arguments (g0_hi, g0_lo, g1_hi, g1_lo): each an
    exact fp32 pair (``_gammas`` adds them back), a missing second one 0; no H2D copy."""
    gam = []
    for g in list(gammas) + [0.0] * (2 - len(gammas)):
        hi = struct.unpack("f", struct.pack("f", float(g)))[0]
        gam += [hi, float(g) - hi]
    return gam


def _prep(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels):
    acc = _acc_dtype(q.dtype)
    q = q.contiguous()
    k = k.contiguous()
    if dot_dtype(q.dtype) != q.dtype:
        q, k = q.to(dot_dtype(q.dtype)), k.to(dot_dtype(q.dtype))
    vec = lambda t: t.to(acc).contiguous() if t is not None else None  # noqa: E731
    a, b, c, d = vec(row_scale), vec(col_scale), vec(row_bias), vec(col_bias)
    gam = gamma_pairs(gammas)
    excl = exclude.to(torch.int64).contiguous() if exclude is not None else None
    ql = q_labels.to(torch.int64).contiguous() if q_labels is not None else None
    kl = k_labels.to(torch.int64).contiguous() if k_labels is not None else None
    return q, k, a, b, c, d, gam, excl, ql, kl


def _flags(q, in_dtype, b, c, d, excl, ql, gammas):
    """Constexprs of a launch; tile widths follow the caller's dtype ``in_dtype`` (q itself may
    have been upcast for the interpreter)."""
    labels, n_words = _label_mode(ql)
    block_d, d_chunks = _d_blocks(int(q.shape[1]), in_dtype)
    flags = dict(HAS_B=b is not None, HAS_C=c is not None, HAS_D=d is not None,
                 N_EXCL=excl.shape[1] if excl is not None else 0, LABELS=labels,
                 N_GAMMA=len(gammas), PREC=_precision(q.dtype), BLOCK_D=block_d, D_CHUNKS=d_chunks)
    return flags, n_words


def lse_forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                want_col_lse, row_only, row_extra=None):
    """Host side of the forward op: see the module docstring. Returns (row_lse, pos_sum, pos_count,
    col_lse, row_e); row_e is the normalized E of the row-only mode ((0, D) otherwise).
    ``row_extra`` (B,), one gamma only: one more logit per row merged into row_lse (and E's
    normalization); InfoNCE's positive, so that the loss needs no log-sum-exp of its own."""
    return _forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels,
                    k_labels, want_col_lse, row_only, None, 0, 0, row_extra)


def lse_forward_topk(q, k, row_scale, col_scale, row_bias, col_bias, gammas, row_only, threshold,
                     capacity, n_hard, row_extra=None, *, lists=False):
    """``lse_forward`` over a queue (no exclusions, labels or column statistics) with the CAND mode
    of the kernel, which lists the columns j with <q_i, k_j> >= lower_threshold(threshold)[i] of
    each row i (at most ``capacity``), then ``_cand_merge_kernel``: returns lse_forward's outputs
    and (hard (B, n_hard) int64: the columns of the n_hard largest listed scores, topk's order;
    inexact (B,) int32: 1 where the list may not hold the row's top ``n_hard``, i.e. unless
    n_hard <= count <= capacity and the row's lse are finite; such a row's hard is arbitrary).
    ``lists`` (tests): (keys (B, capacity) int64, triton/topk.py's encoding, only the first
    min(count, capacity) of a row written, in no particular order; count (B,) int32) instead.
    Needs the feature dim resident (D_CHUNKS == 1)."""
    out = _forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, None, None, None,
                   False, row_only, threshold, int(capacity), int(n_hard), row_extra)
    if lists:
        return out
    (cand_k, count), cap, n_hard = out[5:], int(capacity), int(n_hard)
    hard = q.new_empty((q.shape[0], n_hard), dtype=torch.int64)
    inexact = torch.empty_like(count)
    width = cand_merge_width(cap, n_hard)
    if width > CAND_MERGE_MAX_WIDTH:  # mixing.fused_topk_reason sends such plans to the separate top-k
        raise ValueError(f"candidate capacity {cap} too large for the candidate merge")
    launcher(_cand_merge_kernel)[(int(q.shape[0]),)](
        cand_k, count, out[0], hard, inexact, int(q.shape[0]), cap, n_hard,
        N_GAMMA=len(gammas), WIDTH=width, num_warps=max(4, min(16, width // 256)))
    return (*out[:5], hard, inexact)


def _forward(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
             want_col_lse, row_only, threshold, capacity, n_hard, row_extra):
    if len(gammas) not in (1, 2):
        raise ValueError(f"the Triton lse_stats supports 1 or 2 gammas, got {len(gammas)}")
    if row_extra is not None and len(gammas) != 1:
        raise ValueError("row_extra needs one gamma")
    cand = threshold is not None
    args = (q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
            want_col_lse, row_only, threshold, capacity, n_hard, row_extra)
    row_lse, pos_sum, pos_count, col_lse, row_e = forward_outputs(q, k, gammas, want_col_lse,
                                                                  row_only)
    bsz, dim, n = int(q.shape[0]), int(q.shape[1]), int(k.shape[0])  # launch plans need ints
    extra = ()
    if cand:  # (keys, count): only the slots below count are written (no fill needed)
        extra = (q.new_empty((bsz, max(1, capacity)), dtype=torch.int64),
                 q.new_zeros((bsz,), dtype=torch.int32))
    if n == 0:
        empty = (torch.full_like(row_lse, float("-inf")) if row_extra is None
                 else row_extra.to(row_lse.dtype)[None].clone())
        return (empty, torch.zeros_like(pos_sum),
                torch.zeros_like(pos_count), col_lse, torch.zeros_like(row_e), *extra)
    in_dtype = q.dtype
    q, k, a, b, c, d, gam, excl, ql, kl = _prep(q, k, row_scale, col_scale, row_bias, col_bias,
                                                gammas, exclude, q_labels, k_labels)
    flags, n_words = _flags(q, in_dtype, b, c, d, excl, ql, gammas)
    if (row_only or cand) and flags["D_CHUNKS"] != 1:
        raise ValueError("row_only and the candidate mode need the feature dim in registers "
                         "(see row_only_supported)")
    key = ("fwd", bsz, n, dim, str(in_dtype), want_col_lse, row_only, cand, tuple(flags.items()))
    waves = _waves(key, q, lambda: _forward(*args))
    rows, n_rg, cols, n_sp = _fwd_plan(bsz, n, want_col_lse, q.device, waves)
    n_g = len(gammas)
    acc = row_lse.dtype
    part = lambda *shape: q.new_empty(shape, dtype=acc)  # noqa: E731
    row_m, row_s = part(n_sp, n_g, bsz), part(n_sp, n_g, bsz)
    labels = flags["LABELS"] != 0
    # outputs a variant does not write get a scratch buffer, never an input: torch.compile's
    # mutation analysis must not see an input passed where the kernel may store
    scratch = part(1)
    pos_p, cnt_p = (part(n_sp, bsz), part(n_sp, bsz)) if labels else (scratch, scratch)
    col_m, col_s = (part(n_rg, n), part(n_rg, n)) if want_col_lse else (scratch, scratch)
    e_p = part(n_sp, bsz, dim) if row_only else scratch
    if cand:
        thr, cand_k, count = threshold.contiguous(), *extra  # lowered in the kernel
    else:  # the autotuner zeroes CAND_CNT before its timing runs: a scratch buffer of its own
        thr, cand_k, count = scratch, scratch, part(1)
    launcher(_lse_fwd_kernel)[(n_rg, n_sp)](
        q, k, a, b if b is not None else a, c if c is not None else a, d if d is not None else a,
        excl if excl is not None else ql if ql is not None else a, ql if ql is not None else a,
        kl if kl is not None else a, *gam,
        row_m, row_s, pos_p, cnt_p, col_m, col_s, e_p, thr, cand_k, count,
        bsz, n, dim, q.stride(0), k.stride(0), n_words, rows, cols, max(1, capacity),
        WANT_COL=want_col_lse, ROW_ONLY=row_only, CAND=cand, **flags)
    block_r, block_d, block_s = _MERGE_BLOCKS["row_only" if row_only else "rows"]
    block_d = min(block_d, flags["BLOCK_D"])
    launcher(_row_merge_kernel)[(cdiv(bsz, block_r),
                                    cdiv(dim, block_d) if row_only else 1)](
        row_m, row_s, pos_p, cnt_p, e_p, row_lse, pos_sum, pos_count,
        row_e if row_only else row_lse,
        row_extra.to(acc).contiguous() if row_extra is not None else scratch, n_sp, bsz, dim,
        N_GAMMA=n_g, LABELS=flags["LABELS"], ROW_ONLY=row_only, HAS_EXTRA=row_extra is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_S=block_s)
    if want_col_lse:
        block_c = 64 if INTERPRETER else 256
        launcher(_col_merge_kernel)[(cdiv(n, block_c),)](col_m, col_s, col_lse, n_rg, n,
                                                                     BLOCK=block_c)
    return (row_lse, pos_sum, pos_count, col_lse, row_e, *extra)


def lse_backward(d_row, d_pos, d_col, q, k, row_scale, col_scale, row_bias, col_bias, gammas,
                 exclude, q_labels, k_labels, row_lse, col_lse, need, fused):
    """Host side of the backward op (recompute path): gradients of (q, k, row_scale, col_scale,
    row_bias, col_bias) for the entries of ``need`` (others are empty). ``fused``: dQ and dK from
    one recompute with atomics (nondeterministic summation order) when both sides are needed."""
    args = (d_row, d_pos, d_col, q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude,
            q_labels, k_labels, row_lse, col_lse, need, fused)
    new_outputs = lambda: list(backward_outputs(q, k, row_scale, col_scale, row_bias, col_bias, need))  # noqa: E731
    bsz, dim, n = int(q.shape[0]), int(q.shape[1]), int(k.shape[0])  # launch plans need ints
    need_q = need[0] or need[2] or need[4]
    need_k = need[1] or need[3] or need[5]
    if n == 0 or not (need_q or need_k):
        return tuple(o.zero_() if o.numel() else o for o in new_outputs())
    in_dtype = q.dtype
    q, k, a, b, c, d, gam, excl, ql, kl = _prep(q, k, row_scale, col_scale, row_bias, col_bias,
                                                gammas, exclude, q_labels, k_labels)
    flags, n_words = _flags(q, in_dtype, b, c, d, excl, ql, gammas)
    acc = a.dtype
    want_col = col_lse.numel() > 0
    labels = flags["LABELS"] != 0
    d_row = d_row.to(acc).contiguous()
    d_pos = d_pos.to(acc).contiguous() if labels else a
    d_col = d_col.to(acc).contiguous() if want_col else a
    row_lse = row_lse.contiguous()
    col_lse = col_lse.contiguous() if want_col else a
    fused = bool(fused and need_q and need_k and flags["D_CHUNKS"] == 1
                 and _plan_overrides.get("fused", True))
    scale_g = q.dtype == torch.float16
    key = ("bwd", bsz, n, dim, str(in_dtype), tuple(need), fused, want_col, tuple(flags.items()))
    waves = _waves(key, q, lambda: lse_backward(*args))
    outs = new_outputs()  # after the split tuning, whose runs allocate a set of their own
    common = (q, k, a, b if b is not None else a, c if c is not None else a,
              d if d is not None else a, excl if excl is not None else a,
              ql if ql is not None else a, kl if kl is not None else a, *gam,
              row_lse, d_row, d_pos, col_lse, d_col)
    part = lambda *shape: q.new_empty(shape, dtype=acc)  # noqa: E731
    dq_p = gs_p = None
    n_q = 1
    if need_q and not fused:
        rows, n_rg, cols, n_q = _bwd_plan("q", bsz, n, q.device, waves)
        dq_p, gs_p = part(n_q, bsz, dim), part(n_q, bsz)
        launcher(_lse_bwd_q_kernel)[(n_rg, n_q)](
            *common, dq_p, gs_p, bsz, n, dim, q.stride(0), k.stride(0), n_words, rows, cols,
            WANT_COL=want_col, SCALE_G=scale_g, **flags)
    if need_k:
        rows, n_k, cols, n_cg = _bwd_plan("k", bsz, n, q.device, waves)
        dk_p, cs_p = part(n_k, n, dim), part(n_k, n)
        if fused:
            dq_p = torch.zeros((1, bsz, dim), dtype=acc, device=q.device)
            gs_p = torch.zeros((1, bsz), dtype=acc, device=q.device)
            dq_a, gs_a = dq_p, gs_p
        else:
            dq_a = gs_a = torch.zeros((1,), dtype=acc, device=q.device)
        launcher(_lse_bwd_k_kernel)[(n_cg, n_k)](
            *common, dk_p, cs_p, dq_a, gs_a, bsz, n, dim, q.stride(0), k.stride(0), n_words,
            rows, cols, WANT_COL=want_col, SCALE_G=scale_g, FUSED_DQ=fused, **flags)
        _finish(dk_p, cs_p, k, b, outs, (1, 3, 5), need, n_k, n, dim)
    if need_q:
        _finish(dq_p, gs_p, q, a, outs, (0, 2, 4), need, n_q, bsz, dim)
    return tuple(outs)


def _finish(acc_p, sum_p, x, scale, outs, slots, need, n_parts, n, dim):
    """Sum the split partials into the gradients of x, its scale and its bias (slots in outs)."""
    i_x, i_sc, i_bi = slots
    acc = acc_p.dtype
    want_dx, want_dsc, want_dbi = need[i_x], need[i_sc] and scale is not None, need[i_bi]
    dx = outs[i_x] if want_dx else acc_p
    dsc = outs[i_sc] if (want_dsc and outs[i_sc].dtype == acc) else (
        x.new_empty((n,), dtype=acc) if want_dsc else acc_p)
    dbi = outs[i_bi] if (want_dbi and outs[i_bi].dtype == acc) else (
        x.new_empty((n,), dtype=acc) if want_dbi else acc_p)
    block_d = min(max(16, next_power_of_2(dim)), 128)
    block_r = 16 if INTERPRETER else 32
    launcher(_grad_finish_kernel)[(cdiv(n, block_r),)](
        acc_p, sum_p, x, scale if scale is not None else acc_p, dx, dsc, dbi, n_parts, n, dim,
        x.stride(0), HAS_SC=scale is not None, WANT_DX=want_dx, WANT_DSC=want_dsc,
        WANT_DBI=want_dbi, BLOCK_R=block_r, BLOCK_D=block_d, D_CHUNKS=cdiv(dim, block_d))
    if want_dsc and dsc is not outs[i_sc]:
        outs[i_sc] = dsc.to(outs[i_sc].dtype)
    if want_dbi and dbi is not outs[i_bi]:
        outs[i_bi] = dbi.to(outs[i_bi].dtype)


def lse_stats(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
              gammas: Sequence[float] = (1.0,), exclude=None, q_labels=None, k_labels=None,
              want_col_lse=False, row_extra=None):
    """``reference.lse_stats`` with the kernels above, through the custom op
    ``contrastive_kernels::triton_lse_fwd`` (see ``contrastive_kernels.ops``); ``row_extra``
    (B,) fp32, one gamma: one more logit per row in row_lse (``lse_forward``)."""
    from .. import ops

    row_only = (query_side_only(q, k, row_scale, col_scale, row_bias, col_bias) and not want_col_lse
                and row_only_supported(q.shape[1], q.dtype, len(gammas), q_labels is not None))
    out = ops.triton_lse_fwd(q, k, row_scale, col_scale, row_bias, col_bias,
                             [float(g) for g in gammas], exclude, q_labels, k_labels,
                             bool(want_col_lse), bool(row_only), row_extra)
    return out[0], out[1], out[2], out[3]


# the dtypes paired_dot takes (fp64 keeps torch's fp64 arithmetic); the interpreter cannot convert
# bf16 values in a kernel, so there bf16 stays with torch too
PAIRED_DOT_DTYPES = (torch.float16, torch.float32) if INTERPRETER else (torch.float16, torch.bfloat16,
                                                                       torch.float32)


def _row_dot_blocks(d: int):
    # 8 rows per program: MoCo's B = 256 still makes 32 programs (the kernel waits on memory)
    return (16 if INTERPRETER else 8), min(128, max(16, next_power_of_2(d)))


def _rows_unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def paired_dot_forward(a, b):
    """<a_i, b_i> (n,) in fp32 for (n, D) rows of one of PAIRED_DOT_DTYPES (``_row_dot_kernel``)."""
    a, b = _rows_unit_stride(a), _rows_unit_stride(b)
    n, d = int(a.shape[0]), int(a.shape[1])
    out = a.new_empty((n,), dtype=torch.float32)
    if n:
        block_r, block_d = _row_dot_blocks(d)
        launcher(_row_dot_kernel)[(cdiv(n, block_r),)](a, b, out, n, d, a.stride(0), b.stride(0),
                                                        BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def paired_dot_backward(g, a, b, want_a: bool, want_b: bool):
    """(da, db) = (g_i b_i, g_i a_i), each in its input's dtype; (0,) where not wanted."""
    a, b = _rows_unit_stride(a), _rows_unit_stride(b)
    n, d = int(a.shape[0]), int(a.shape[1])
    da = torch.empty_like(a, memory_format=torch.contiguous_format) if want_a else a.new_empty((0,))
    db = torch.empty_like(b, memory_format=torch.contiguous_format) if want_b else b.new_empty((0,))
    if n and (want_a or want_b):
        block_r, block_d = _row_dot_blocks(d)
        scratch = a.new_empty((1,))  # for the output not written: never an input (torch.compile)
        launcher(_row_dot_bwd_kernel)[(cdiv(n, block_r),)](
            g.to(torch.float32).contiguous(), a, b, da if want_a else scratch,
            db if want_b else scratch, n, d,
            a.stride(0), b.stride(0), WANT_A=want_a, WANT_B=want_b, BLOCK_R=block_r,
            BLOCK_D=block_d)
    return da, db


def paired_dot(a, b):
    """The family op of ``losses._paired_dot``: <a_i, b_i> (n,) fp32 of (n, D) rows, with gradients
    to both, in one launch each way (torch: four ops forward, three backward). Through the custom
    op ``contrastive_kernels::triton_paired_dot``."""
    from .. import ops

    return ops.triton_paired_dot(a, b)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compile specs (scripts/triton_aot_check.py): representative signatures of every
# kernel above, compiled for sm_80 / sm_90 without a GPU to catch compile errors and report
# registers and spills. "{dt}" is replaced by each dtype of "dtypes"; a callable constexpr gets
# the dtype name. "configs": None = every autotune config of the kernel, else a list of
# (num_warps, num_stages, extra constexprs).
# ------------------------------------------------------------------------------------------------

_I32 = ("B", "N", "D", "S", "R", "n", "stride_q", "stride_k", "stride_x", "stride_a", "stride_b",
        "n_words",
        "rows_per_group", "cols_per_split", "cand_cap", "n_hard")
_PTR_TYPES = {"EXCL": "*i64", "QL": "*i64", "KL": "*i64", "CAND_K": "*i64",
              "CAND_CNT": "*i32", "EXTRA": "*fp32"}
_F32 = ("g0_hi", "g0_lo", "g1_hi", "g1_lo")


def jit_function(kernel):
    """The @triton.jit function under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def _aot_signature(kernel, overrides):
    fn = jit_function(kernel)
    if not hasattr(fn, "params"):  # the interpreter's InterpretedFunction: no compile specs
        return {}
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name in _I32:
            sig[name] = "i32"
        elif name in _F32:
            sig[name] = "fp32"
        elif name in _PTR_TYPES:
            sig[name] = _PTR_TYPES[name]
        else:
            sig[name] = "*{acc}"
    return sig


def _prec_of(dt):
    return "tf32x3" if dt == "fp32" else "ieee"


def _scale_of(dt):
    return dt == "fp16"


_TORCH_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             "fp64": torch.float64}


def _variant(name, kernel, d, dtypes, **constexprs):
    """A spec for feature dim ``d``: BLOCK_D / D_CHUNKS as the host would choose per dtype."""
    consts = dict(PREC=_prec_of, **constexprs)
    consts["BLOCK_D"] = lambda dt: _d_blocks(d, _TORCH_DT[dt])[0]
    consts["D_CHUNKS"] = lambda dt: _d_blocks(d, _TORCH_DT[dt])[1]
    return dict(name=f"{name},D={d}]", kernel=kernel, dtypes=dtypes, constexprs=consts,
                signature=_aot_signature(kernel, {"Q": "*{dt}", "K": "*{dt}", "THR": "*{dt}"}))


def _aot_specs():
    lowp = ("fp32", "fp16", "bf16")
    fwd = dict(HAS_B=False, HAS_C=False, HAS_D=False, N_EXCL=0, LABELS=0, N_GAMMA=1,
               WANT_COL=False, ROW_ONLY=False, CAND=False)
    bwd = dict(HAS_B=True, HAS_C=False, HAS_D=False, N_EXCL=0, LABELS=0, N_GAMMA=1,
               WANT_COL=False, SCALE_G=_scale_of)
    k_fwd, k_q, k_k = _lse_fwd_kernel, _lse_bwd_q_kernel, _lse_bwd_k_kernel
    specs = [
        _variant("lse_fwd[bank,row_only", k_fwd, 128, lowp, **{**fwd, "ROW_ONLY": True}),
        _variant("lse_fwd[bank,row_only", k_fwd, 256, ("bf16",), **{**fwd, "ROW_ONLY": True}),
        _variant("lse_fwd[bank,row_only", k_fwd, 64, ("fp64",), **{**fwd, "ROW_ONLY": True}),
        _variant("lse_fwd[bank,recompute", k_fwd, 256, lowp, **fwd),
        # the hard negatives of mixing from the loss pass (triton/mixing.py): MoCo (row-only,
        # dot), cosine (column scale), and DCL/HCL (2 gammas) with the queue getting gradients
        _variant("lse_fwd[bank,row_only,cand", k_fwd, 128, lowp,
                 **{**fwd, "ROW_ONLY": True, "CAND": True}),
        _variant("lse_fwd[bank,row_only,cand,cosine", k_fwd, 256, ("bf16",),
                 **{**fwd, "ROW_ONLY": True, "CAND": True, "HAS_B": True}),
        _variant("lse_fwd[bank,cand,2 gammas,l2", k_fwd, 96, ("fp32", "fp16"),
                 **{**fwd, "CAND": True, "N_GAMMA": 2, "HAS_C": True, "HAS_D": True}),
        _variant("lse_fwd[clip,col_lse,cosine", k_fwd, 512, lowp, **{**fwd, "HAS_B": True,
                                                                       "WANT_COL": True}),
        _variant("lse_fwd[supcon+dcl,bits,2 gammas,l2", k_fwd, 128, lowp + ("fp64",),
                 **{**fwd, "HAS_C": True, "HAS_D": True, "N_EXCL": 2, "LABELS": 2, "N_GAMMA": 2}),
        _variant("lse_bwd_q[clip+labels,2 gammas", k_q, 128, lowp + ("fp64",),
                 **{**bwd, "WANT_COL": True, "LABELS": 1, "N_GAMMA": 2, "N_EXCL": 1}),
        _variant("lse_bwd_q[queue", k_q, 768, lowp, **bwd),
        _variant("lse_bwd_k[clip,fused dQ", k_k, 128, ("fp16", "bf16"),
                 **{**bwd, "WANT_COL": True, "FUSED_DQ": True}),
        _variant("lse_bwd_k[clip,fused dQ", k_k, 64, ("fp32", "fp64"),
                 **{**bwd, "WANT_COL": True, "FUSED_DQ": True}),
        _variant("lse_bwd_k[supcon,bits", k_k, 256, lowp,
                 **{**bwd, "LABELS": 2, "N_EXCL": 1, "FUSED_DQ": False}),
        _variant("lse_bwd_k[clip", k_k, 512, lowp, **{**bwd, "WANT_COL": True, "FUSED_DQ": False}),
        dict(name="row_merge[row_only,extra]", kernel=_row_merge_kernel, dtypes=("fp32",),
             signature=_aot_signature(_row_merge_kernel, {}),
             constexprs=dict(N_GAMMA=1, LABELS=0, ROW_ONLY=True, HAS_EXTRA=True,
                             **dict(zip(("BLOCK_R", "BLOCK_D", "BLOCK_S"),
                                        _MERGE_BLOCKS["row_only"]))),
             configs=[(4, 1, {})]),
        dict(name="row_merge[2 gammas,labels]", kernel=_row_merge_kernel, dtypes=("fp32",),
             signature=_aot_signature(_row_merge_kernel, {}),
             constexprs=dict(N_GAMMA=2, LABELS=1, ROW_ONLY=False, HAS_EXTRA=False,
                             **dict(zip(("BLOCK_R", "BLOCK_D", "BLOCK_S"), _MERGE_BLOCKS["rows"]))),
             configs=[(4, 1, {})]),
        dict(name="row_dot", kernel=_row_dot_kernel, dtypes=lowp,
             signature=_aot_signature(_row_dot_kernel, {"A": "*{dt}", "B": "*{dt}", "OUT": "*fp32"}),
             constexprs=dict(BLOCK_R=8, BLOCK_D=128), configs=[(4, 1, {})]),
        dict(name="row_dot_bwd", kernel=_row_dot_bwd_kernel, dtypes=lowp,
             signature=_aot_signature(_row_dot_bwd_kernel, {"G": "*fp32", "A": "*{dt}", "B": "*{dt}",
                                                            "DA": "*{dt}", "DB": "*{dt}"}),
             constexprs=dict(WANT_A=True, WANT_B=True, BLOCK_R=8, BLOCK_D=128),
             configs=[(4, 1, {})]),
        # MoCHi's candidate merge at MoCo's shape (n_hard 1024: cap 2400 -> 4096) and at
        # n_hard = MAX_K (cap about 4300 -> 8192), with the warps the host gives them
        dict(name="cand_merge[4096]", kernel=_cand_merge_kernel, dtypes=("fp32",),
             signature=_aot_signature(_cand_merge_kernel, {"CAND_K": "*i64", "HARD": "*i64",
                                                           "INEXACT": "*i32"}),
             constexprs=dict(N_GAMMA=1, WIDTH=4096), configs=[(16, 1, {})]),
        dict(name="cand_merge[8192,2 gammas]", kernel=_cand_merge_kernel, dtypes=("fp32",),
             signature=_aot_signature(_cand_merge_kernel, {"CAND_K": "*i64", "HARD": "*i64",
                                                           "INEXACT": "*i32"}),
             constexprs=dict(N_GAMMA=2, WIDTH=8192), configs=[(16, 1, {})]),
        dict(name="col_merge", kernel=_col_merge_kernel, dtypes=("fp32",),
             signature=_aot_signature(_col_merge_kernel, {}), constexprs=dict(BLOCK=256),
             configs=[(4, 1, {})]),
        dict(name="grad_finish", kernel=_grad_finish_kernel, dtypes=lowp,
             signature=_aot_signature(_grad_finish_kernel, {"X": "*{dt}", "DX": "*{dt}"}),
             constexprs=dict(HAS_SC=True, WANT_DX=True, WANT_DSC=True, WANT_DBI=True, BLOCK_R=32,
                             BLOCK_D=128, D_CHUNKS=6),
             configs=[(4, 1, {})]),
    ]
    return specs


AOT_SPECS = _aot_specs()
