"""Hard-negative mixing (MoCHi, synthetic hard negatives) in Triton, fused into the loss.

The family ops of ``losses.py`` (spec: ``reference.mix_points``; random draws: ``_common.draw_mixing``):

``mix(query, negatives, hard_index, draws)`` -> the synthetic points (B, s+s', D) in the query dtype
``mixed_dots(q, mix_query, negatives, hard_index, draws)`` -> u (B, s+s') fp32 (fp64 for fp64),
    without materializing the points, gradient to q only
``mixed_lse(q, mix_query, negatives, hard_index, draws, row_scale, row_bias, *, gammas)``
    -> (G, B): log sum_t exp(gamma_g (row_scale_i u_it + row_bias_i)), the synthetic logits
    reduced in the pass that forms them; gradients to q, row_scale, row_bias with no second
    gather (what ``losses.add_synthetic_terms`` uses)
``lse_stats_topk(q, k, row_scale, col_scale, row_bias, col_bias, *, gammas, n_hard)``
    -> (row_lse (G, B), hard (B, n_hard) int64): the streamed log-sum-exp of ``lse_stats`` over the
    queue AND the row's n_hard hardest queue rows by dot product, from ONE pass over the queue.
    ``losses.info_nce`` uses it when a backend has it (else ``lse_stats`` + ``topk``).

Synthetic points (row i, all arithmetic in fp32, fp64 for fp64 inputs)
----------------------------------------------------------------------
With H_i = hard_index[i] and the draws of row i:

    t < s  (pair mix):   v_it = a_it n_x + (1 - a_it) n_y,   x = H_i[pair[i,t,0]], y = H_i[pair[i,t,1]]
    t >= s (query mix):  v_it = b_it m_i + (1 - b_it) n_y,   y = H_i[query_index[i,t-s]]
    nrm_it = max(|v_it|, eps)  (eps = 1e-12, as F.normalize),   h_it = v_it / nrm_it

``n`` are rows of ``negatives`` (the queue) and m_i the row of ``mix_query`` (the detached query for
MoCo, the normalized view for NT-Xent). ``mix`` stores h (cast to the query dtype, as the spec).

``mixed_dots`` forward:  u_it = <q_i, h_it> = <q_i, v_it> / nrm_it
``mixed_dots`` backward (h is a constant, as in MoCHi):  dq_i = sum_t g_it v_it / nrm_it.

The unit-vector algebra <q, h> = (a <q,n_x> + (1-a) <q,n_y>) / sqrt(a^2|n_x|^2 + (1-a)^2|n_y|^2
+ 2a(1-a)<n_x,n_y>) needs the same two row loads per point as forming v in registers, and five
D-long dot products where v needs three FMAs per element (v, |v|^2, <q,v>); the loads dominate
(the hard rows come from L2: at B=256, s+s'=768, D=128 bf16, 100 MB of gathered reads per pass).
So the kernels form v in registers and never write it; passing in the top-k's <q, n_x> values
would save FMAs only, not loads, and is not done. ``mixed_dots``'s backward gathers the rows again
(nrm is saved by the forward: (B, s+s') floats); ``mixed_lse`` needs no second gather:

``mixed_lse`` (l_it = a_i u_it + c_i, z_git = gamma_g l_it, one online softmax per gamma):
    forward:  lse_gi = log sum_t e^{z_git},  p_git = e^{z_git - lse_gi},
              E_gi = sum_t p_git h_it (D floats),  U_gi = sum_t p_git u_it
    backward: with w_gi = dL/dlse_gi gamma_g:  dq_i = a_i sum_g w_gi E_gi,
              da_i = sum_g w_gi U_gi,  dc_i = sum_g w_gi          (``_common.mixed_lse_backward``)
``_mixed_lse_kernel`` grid (rows, point splits): per block of BLOCK_T points it forms v, u and nrm
as above, moves the running max m_g, rescales (s, U, E) by e^{m_old - m_new} and adds the block's
p-weighted terms. E lives in registers when the feature dim is one chunk, else in its
output slot (one read-modify-write per block and chunk). With one split the kernel writes the
final (lse, E, U); with several (few rows: about two programs per SM) it writes the raw partials
(m, s, U, E) per split and ``_mixed_combine_kernel`` merges them.

Kernels: ``_mix_fwd_kernel`` grid (rows, blocks of BLOCK_T points: pair blocks, then query-mix
blocks), the feature dim in BLOCK_D chunks (any D); WANT_DOTS writes u and nrm, WANT_POINTS writes
h (a second pass over the chunks once nrm is known). ``_mix_bwd_kernel`` grid (rows, D chunks,
point splits): per split a partial of dq (summed on the host when there are several splits, which
the launcher uses only when B x D-chunks would leave SMs idle). Indices and row offsets are int64.

Hard negatives from the loss's own forward pass (``lse_stats_topk``)
--------------------------------------------------------------------
The separate top-k is a second GEMM over the queue (2BKD flops, against 4BKD for the row-only
loss forward that already computes every <q_i, k_j>) plus its own threshold pass and selection
(see triton/topk.py). Here the loss forward (``infonce._lse_fwd_kernel`` with CAND=True) also
emits candidates, so the queue is read once.

The algorithm and its exactness check are shared with the C++ CPU backend (_loss_topk.py):
a threshold T_i from a strided sample of the queue, the candidates that pass it listed by the
loss kernel, the n_hard best of them, rows that cannot be proven exact recomputed by ``topk``.
Here the loss kernel, in each tile, tests the raw dot s_ij = <q_i, k_j> (the tile's fp32
tensor-core result, before any scaling) against T_i. Tiles where some row passes append the
keys pack(s_ij, j) of the passing elements (the int64 keys of triton/topk.py: order = score, then
lower index) to the row's candidate list: one atomic add per row and tile reserves the slots, a
prefix sum over the tile's columns places them. The merge (``infonce._cand_merge_kernel``, one
program per row) sorts the row's listed keys, decodes the columns of the n_hard largest and
flags the row when its list cannot be proven to hold them.

Equality with ``topk_similarity`` (the contract of ``info_nce(mixing=)``) needs the loss kernel's
s_ij to be bitwise the top-k kernel's score: both are one ``tl.dot`` of the (rows x D) query tile
and the (cols x D) key tile in the input dtype with fp32 accumulation (fp32 inputs: 3xTF32 in
both), the feature dim padded to the same power of two, and tensor-core results do not depend on
a row's or column's position in the tile (the assumption triton/topk.py already makes between
its own sample, dense and filter passes, whose tiles differ). It is guarded three ways: the
fused path runs only where the two kernels compute the same dot (fp16/bf16/fp32, feature dim
resident, fp32 only with 3xTF32, i.e. torch.backends.cuda.matmul.allow_tf32 off; never fp64,
whose top-k scores are fp32 of the rounded inputs; not for bf16 under the interpreter, whose
top-k dot is unreliable); the first call of each shape key compares the fused hard set with
``topk``'s and, on any difference, warns and uses ``topk`` for that key from then on; and
``CK_MIXING_FUSED_TOPK=0`` turns the fused path off.

Expected cost (H100, bf16, B=256, D=128, n_hard=1024, s=512, s'=256), estimated before any GPU
run from flop and byte counts and from the recorded top-k results
(benchmarks/results/gpu-mining-h100). Measured since (benchmarks/results/gpu-mixing-h100, when
the step ran 110 host ops): 2.2x the plain step at K=65536 and at K=2^20, both host-bound
(0.58 ms of kernels in a 6.0 ms step at K=65536).
- Plain fused InfoNCE, row-only: 4BKD flops, B*K exponentials, ~10 small kernels around it:
  K=65536 ~0.1 ms (launch-bound), K=2^20 ~0.5 ms.
- Separate top-k: its own GEMM (2BKD) plus a threshold pass plus one extraction step (a
  max-reduction over the tile) per survivor; survivors per row are ~2.5 n_hard at K=2^20 (1/2
  sample of tile maxima) and ~8 n_hard at K=65536 (exact cascade over a 1/8 sample). From the
  recorded M=8192, N=2^20, k=1024 run (37.7 ms, GEMM floor 4.9 ms, so ~1.6 ns per extracted
  survivor), scaled to 256 rows: ~1.2 ms at K=2^20 (+~240 %) and ~3 ms at K=65536.
- Fused (this module): the candidate branch costs a compare and a row sum per tile, plus a
  prefix sum and two predicated stores per element in tiles with a survivor (nearly every tile:
  ~20 survivors per 128 x 64 tile at K=2^20). The AOT report shows its price in registers: the
  candidate variant needs ~120 more per thread than the plain one (bf16 sm_90: 64x32/8 warps 238
  vs 113; 128x64/8 warps spills 456 B where the plain kernel uses 214 registers), so the
  autotuner will settle on a smaller tile for it: estimated +30-60 % of the loss kernel. Fixed
  costs: the sample threshold (one B x 8192 matmul and a small top-k, ~20-30 us), the merge
  (then a torch.topk of n_hard over ~2.5-5 n_hard keys per row, ~30-60 us; now a per-row sort
  in one kernel), the synthetic logits
  (``mixed_lse``: one gather of 2 x 768 rows per query row from L2, ~15-30 us; ``mixed_dots``
  forward and backward gathered twice), one host synchronization. K=2^20: ~+50-80 %;
  K=65536: ~+150 %.
The issue's target (mixing at most 15 % over plain InfoNCE) is out of reach with an exact
top-1024: at K=65536 the fixed costs alone exceed 15 % of a ~0.1 ms loss, and at K=2^20 the
candidate emission alone is estimated above it. What would approach it: the merge inside the
kernel (a per-row running top-k in shared memory), the emission in a warp-specialized epilogue
(so that it costs no registers of the MMA warps), and no host synchronization (a failed row
flagged for the next step instead of redone) -- at the price of the exactness check's
simplicity; or a smaller n_hard (the candidate density, and so the emission cost, scales with it).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _loss_topk
from .._common import NORM_EPS, MixingDraws, mixed_lse_outputs, query_side_only
from . import INTERPRETER, cdiv, launcher, next_power_of_2

# the modules themselves (the package's attribute ``topk`` is the family op of the same name)
_infonce = importlib.import_module(f"{__package__}.infonce")
_topk = importlib.import_module(f"{__package__}.topk")
# a plain global: inductor re-emits a user kernel's source with its JIT dependencies and resolves
# global names, not attributes of modules
_gammas = _infonce._gammas

NAME = "triton"

# Points per program (a block of BLOCK_T synthetic points of one row) and the widest feature chunk
# (fp64: 64). Small under the interpreter so that the tests' small shapes span several blocks.
BLOCK_T = 8 if INTERPRETER else 32
BLOCK_D_MAX = 128
# mixed_lse's (gammas x points x features) product for E: with 8 warps it needs ~120 registers a
# thread on sm_90 (bf16/fp32, D=128; 4 warps: ~200), so twice the warps per SM hide the gathers
LSE_WARPS = 8


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _point_block(NEG, MQ, HARD, PAIR, ALPHA, QIDX, QW, row, tb, n_hard, S, SQ, stride_n, stride_m,
                 sp_r, sp_t, sp_xy, sa_r, sqi_r, sw_r, BLOCK_T: tl.constexpr):
    """Block ``tb`` of row ``row``'s points: (x pointers, y pointers, weight w of x, valid lanes,
    output column t). Blocks 0 .. cdiv(S, BLOCK_T)-1 are pair mixes (x, y hard negatives, w = a),
    the rest query mixes (x = the row of MQ, w = b). The draws come with their strides (PAIR:
    row, point, x/y; ALPHA, QIDX, QW: row), so that draw_mixing's views need no copies."""
    offs = tl.arange(0, BLOCK_T)
    n_pair_blocks = tl.cdiv(S, BLOCK_T)
    hard_row = HARD + row * n_hard
    if tb < n_pair_blocks:
        t = tb * BLOCK_T + offs
        ok = t < S
        p_ptr = PAIR + row * sp_r + t * sp_t
        px = tl.load(p_ptr, mask=ok, other=0)
        py = tl.load(p_ptr + sp_xy, mask=ok, other=0)
        xr = tl.load(hard_row + px, mask=ok, other=0)
        yr = tl.load(hard_row + py, mask=ok, other=0)
        w = tl.load(ALPHA + row * sa_r + t, mask=ok, other=0.0)
        x_ptr = NEG + xr * stride_n
        t_out = t
    else:
        t = (tb - n_pair_blocks) * BLOCK_T + offs
        ok = t < SQ
        py = tl.load(QIDX + row * sqi_r + t, mask=ok, other=0)
        yr = tl.load(hard_row + py, mask=ok, other=0)
        w = tl.load(QW + row * sw_r + t, mask=ok, other=0.0)
        x_ptr = MQ + row * stride_m + tl.zeros([BLOCK_T], dtype=tl.int64)
        t_out = S + t
    y_ptr = NEG + yr * stride_n
    return x_ptr, y_ptr, w, ok, t_out


@triton.jit
def _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, dd, D, acc_ty: tl.constexpr):
    """v = wx x + (1 - wx) y for the feature chunk ``dd`` of a block of points, in acc_ty."""
    msk = ok[:, None] & (dd < D)[None, :]
    x = tl.load(x_ptr[:, None] + dd[None, :], mask=msk, other=0.0).to(acc_ty)
    y = tl.load(y_ptr[:, None] + dd[None, :], mask=msk, other=0.0).to(acc_ty)
    return wx[:, None] * x + wy[:, None] * y


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (fp32: sqrt.rn instead of the approximate default)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _mix_fwd_kernel(Q, MQ, NEG, HARD, PAIR, ALPHA, QIDX, QW, U, NRM, OUT,
                    n_hard, S, SQ, D, stride_q, stride_m, stride_n, sp_r, sp_t, sp_xy, sa_r, sqi_r,
                    sw_r, eps,
                    WANT_DOTS: tl.constexpr, WANT_POINTS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr):
    """One block of one row's synthetic points: nrm = max(|v|, eps); WANT_DOTS: U = <q, v> / nrm
    and NRM = nrm; WANT_POINTS: OUT = v / nrm in the dtype of OUT. Accumulation dtype: NRM's."""
    row = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    acc_ty: tl.constexpr = NRM.dtype.element_ty
    x_ptr, y_ptr, w, ok, t_out = _point_block(NEG, MQ, HARD, PAIR, ALPHA, QIDX, QW, row, tb,
                                              n_hard, S, SQ, stride_n, stride_m, sp_r, sp_t, sp_xy,
                                              sa_r, sqi_r, sw_r, BLOCK_T)
    wx = w.to(acc_ty)
    wy = 1.0 - wx
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_T], dtype=acc_ty)
    dot = tl.zeros([BLOCK_T], dtype=acc_ty)
    for c in range(D_CHUNKS):
        dd = c * BLOCK_D + offs_d
        v = _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, dd, D, acc_ty)
        sq += tl.sum(v * v, 1)
        if WANT_DOTS:
            qv = tl.load(Q + row * stride_q + dd, mask=dd < D, other=0.0).to(acc_ty)
            dot += tl.sum(v * qv[None, :], 1)
    nrm = tl.maximum(_sqrt(sq), (eps + tl.zeros([], acc_ty)).to(acc_ty))  # eps: fp64 under inductor
    out_t = row * (S + SQ) + t_out
    if WANT_DOTS:
        tl.store(U + out_t, dot / nrm, mask=ok)
        tl.store(NRM + out_t, nrm, mask=ok)
    if WANT_POINTS:
        for c in range(D_CHUNKS):
            dd = c * BLOCK_D + offs_d
            v = _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, dd, D, acc_ty)
            h = (v / nrm[:, None]).to(OUT.dtype.element_ty)
            tl.store(OUT + out_t[:, None] * D + dd[None, :], h,
                     mask=ok[:, None] & (dd < D)[None, :])


@triton.jit
def _mix_bwd_kernel(G, NRM, MQ, NEG, HARD, PAIR, ALPHA, QIDX, QW, DQ_P,
                    B, n_hard, S, SQ, D, stride_m, stride_n, sp_r, sp_t, sp_xy, sa_r, sqi_r, sw_r,
                    blocks_per_split, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """DQ_P[split, row, chunk] = sum over the split's points t of G[row, t] v_t / NRM[row, t]."""
    row = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1)
    sp = tl.program_id(2)
    acc_ty: tl.constexpr = NRM.dtype.element_ty
    dd = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    n_blocks = tl.cdiv(S, BLOCK_T) + tl.cdiv(SQ, BLOCK_T)
    tb0 = sp * blocks_per_split
    tb1 = tl.minimum(tb0 + blocks_per_split, n_blocks)
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    for tb in range(tb0, tb1):
        x_ptr, y_ptr, w, ok, t_out = _point_block(NEG, MQ, HARD, PAIR, ALPHA, QIDX, QW, row, tb,
                                                  n_hard, S, SQ, stride_n, stride_m, sp_r, sp_t,
                                                  sp_xy, sa_r, sqi_r, sw_r, BLOCK_T)
        wx = w.to(acc_ty)
        out_t = row * (S + SQ) + t_out
        g = tl.load(G + out_t, mask=ok, other=0.0) / tl.load(NRM + out_t, mask=ok, other=1.0)
        v = _mixed_chunk(x_ptr, y_ptr, wx, 1.0 - wx, ok, dd, D, acc_ty)
        acc += tl.sum(g[:, None] * v, 0)
    tl.store(DQ_P + (sp * B + row) * D + dd, acc, mask=dd < D)


@triton.jit
def _mixed_lse_kernel(Q, MQ, NEG, HARD, PAIR, ALPHA, QIDX, QW, A, C, EXTRA, LSE, M_P, S_P, U_P,
                      E_P, B, n_hard, S, SQ, D, stride_q, stride_m, stride_n, sp_r, sp_t, sp_xy,
                      sa_r, sqi_r, sw_r, eps, blocks_per_split,
                      g0_hi, g0_lo, g1_hi, g1_lo, G: tl.constexpr, FINAL: tl.constexpr,
                      HAS_C: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr):
    """Online softmax of z_gt = gamma_g (A[row] u_t + C[row]) over the split's points t of one
    row (C[row] = 0 unless HAS_C), u_t = <q, v_t> / nrm_t, per gamma g (two lanes, the first G
    real; the gammas come as infonce's scalar (hi, lo) pairs): running max m, sum s, U = sum p u
    and E = sum p h (h = v / nrm), p = e^{z - m}, all rescaled when m moves.
    FINAL (one split): LSE = m + log s, U_P = U / s, E_P = E / s (rows with no point: -inf, 0, 0);
    else the raw partials go to M_P, S_P, U_P, E_P[split, g, row] for _mixed_combine_kernel.
    HAS_EXTRA (FINAL, one gamma): EXTRA[row] is one more term of the row's sum, a log-weight with
    no point (the queue's log-sum-exp in InfoNCE): in s, so in LSE and the normalization of U, E.
    E_P is accumulated in place (zero on entry), one read-modify-write per block and chunk, unless
    the feature dim is one chunk: then E stays in registers and v is formed once per block."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    acc_ty: tl.constexpr = M_P.dtype.element_ty
    offs_g = tl.arange(0, 2)
    g_ok = offs_g < G
    g0, g1 = _gammas(g0_hi, g0_lo, g1_hi, g1_lo, acc_ty)
    gam = tl.where(offs_g == 0, g0, g1)
    a = tl.load(A + row).to(acc_ty)
    if HAS_C:
        c = tl.load(C + row).to(acc_ty)
    else:
        c = tl.zeros([], dtype=acc_ty)
    offs_d = tl.arange(0, BLOCK_D)
    n_blocks = tl.cdiv(S, BLOCK_T) + tl.cdiv(SQ, BLOCK_T)
    tb0 = sp * blocks_per_split
    tb1 = tl.minimum(tb0 + blocks_per_split, n_blocks)
    m = tl.full([2], float("-inf"), dtype=acc_ty)
    s_run = tl.zeros([2], dtype=acc_ty)
    u_run = tl.zeros([2], dtype=acc_ty)
    e_reg = tl.zeros([2, BLOCK_D], dtype=acc_ty)
    out_g = (sp * G + offs_g) * B + row  # (2,) offsets of the [split, g, row] slots
    e_ptr = E_P + out_g[:, None] * D
    if D_CHUNKS == 1:
        qv = tl.load(Q + row * stride_q + offs_d, mask=offs_d < D, other=0.0).to(acc_ty)
    for tb in range(tb0, tb1):
        x_ptr, y_ptr, w, ok, t_out = _point_block(NEG, MQ, HARD, PAIR, ALPHA, QIDX, QW, row, tb,
                                                  n_hard, S, SQ, stride_n, stride_m, sp_r, sp_t,
                                                  sp_xy, sa_r, sqi_r, sw_r, BLOCK_T)
        wx = w.to(acc_ty)
        wy = 1.0 - wx
        if D_CHUNKS == 1:
            v = _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, offs_d, D, acc_ty)
            sq = tl.sum(v * v, 1)
            dot = tl.sum(v * qv[None, :], 1)
        else:
            sq = tl.zeros([BLOCK_T], dtype=acc_ty)
            dot = tl.zeros([BLOCK_T], dtype=acc_ty)
            for ch in range(D_CHUNKS):
                dd = ch * BLOCK_D + offs_d
                vc = _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, dd, D, acc_ty)
                qc = tl.load(Q + row * stride_q + dd, mask=dd < D, other=0.0).to(acc_ty)
                sq += tl.sum(vc * vc, 1)
                dot += tl.sum(vc * qc[None, :], 1)
        nrm = tl.maximum(_sqrt(sq), (eps + tl.zeros([], acc_ty)).to(acc_ty))  # eps: fp64 under inductor
        u = dot / nrm
        z = gam[:, None] * (a * u + c)[None, :]
        z = tl.where(ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no point yet: keep e^{-inf} = 0
        r = tl.exp(m - m_ref)
        p = tl.exp(z - m_ref[:, None])  # (2, BLOCK_T); NaN logits make the row NaN
        s_run = s_run * r + tl.sum(p, 1)
        u_run = u_run * r + tl.sum(p * u[None, :], 1)
        ph = p / nrm[None, :]  # the weight of v in E (h = v / nrm)
        if D_CHUNKS == 1:
            e_reg = e_reg * r[:, None] + tl.sum(ph[:, :, None] * v[None, :, :], 1)
        else:
            for ch in range(D_CHUNKS):
                dd = ch * BLOCK_D + offs_d
                vc = _mixed_chunk(x_ptr, y_ptr, wx, wy, ok, dd, D, acc_ty)
                msk = g_ok[:, None] & (dd < D)[None, :]
                old = tl.load(e_ptr + dd[None, :], mask=msk, other=0.0)
                tl.store(e_ptr + dd[None, :],
                         old * r[:, None] + tl.sum(ph[:, :, None] * vc[None, :, :], 1), mask=msk)
        m = m_new
    if FINAL:
        r = tl.full([2], 1.0, dtype=acc_ty)  # the rescale of (U, E) by the extra term
        if HAS_EXTRA:
            x = tl.load(EXTRA + row).to(acc_ty)
            m_new = tl.maximum(m, x)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            r = tl.exp(m - m_ref)
            s_run = s_run * r + tl.exp(x - m_ref)
            m = m_new
        live = s_run > 0
        inv = tl.where(live, 1.0 / tl.where(live, s_run, 1.0), 0.0)
        lse = tl.where(live, m + tl.log(tl.where(live, s_run, 1.0)),
                       tl.where(s_run == s_run, float("-inf"), s_run))
        inv = inv * r
        tl.store(LSE + out_g, lse, mask=g_ok)
        tl.store(U_P + out_g, u_run * inv, mask=g_ok)
    else:
        inv = tl.full([2], 1.0, dtype=acc_ty)
        tl.store(M_P + out_g, m, mask=g_ok)
        tl.store(S_P + out_g, s_run, mask=g_ok)
        tl.store(U_P + out_g, u_run, mask=g_ok)
    if D_CHUNKS == 1:
        tl.store(e_ptr + offs_d[None, :], e_reg * inv[:, None],
                 mask=g_ok[:, None] & (offs_d < D)[None, :])
    elif FINAL:
        for ch in range(D_CHUNKS):
            dd = ch * BLOCK_D + offs_d
            msk = g_ok[:, None] & (dd < D)[None, :]
            tl.store(e_ptr + dd[None, :], tl.load(e_ptr + dd[None, :], mask=msk) * inv[:, None],
                     mask=msk)


@triton.jit
def _mixed_combine_kernel(M_P, S_P, U_P, E_P, EXTRA, LSE, U_OUT, E_OUT, SPLITS, B, D,
                          G: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """The final (lse, U, E) of ``_mixed_lse_kernel`` from its per-split raw partials
    [split, g, row] (E: [split, g, row, D]): M = max_s m_s, f_s = e^{m_s - M}, s = sum_s f_s s_s,
    lse = M + log s, U = sum_s f_s U_s / s, E = sum_s f_s E_s / s (rows with no point: -inf, 0,
    0; a NaN sum stays NaN); HAS_EXTRA (one gamma): EXTRA[row] joins as a partial (x, 1, 0, 0).
    Grid (row blocks, feature blocks); the programs of feature block 0 write lse and U. One
    launch instead of a score of small torch ops per call."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < B
    head = row_ok & (rows * 0 + tl.program_id(1) == 0)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc_ty = LSE.dtype.element_ty
    for g in tl.static_range(G):
        mx = tl.full([BLOCK_R], float("-inf"), acc_ty)
        for s0 in range(0, SPLITS, BLOCK_S):
            ss = s0 + splits
            ok = (ss < SPLITS)[:, None] & row_ok[None, :]
            m = tl.load(M_P + (ss[:, None] * G + g) * B + rows[None, :], mask=ok, other=float("-inf"))
            mx = tl.maximum(mx, tl.max(m, 0))
        if HAS_EXTRA and g == 0:
            x = tl.load(EXTRA + rows, mask=row_ok, other=float("-inf")).to(acc_ty)
            mx = tl.maximum(mx, x)
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.zeros([BLOCK_R], dtype=acc_ty)
        if HAS_EXTRA and g == 0:
            tot += tl.exp(x - ref)
        u = tl.zeros([BLOCK_R], dtype=acc_ty)
        e = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_ty)
        for s0 in range(0, SPLITS, BLOCK_S):
            ss = s0 + splits
            ok = (ss < SPLITS)[:, None] & row_ok[None, :]
            slot = (ss[:, None] * G + g) * B + rows[None, :]  # (BLOCK_S, BLOCK_R)
            f = tl.exp(tl.load(M_P + slot, mask=ok, other=float("-inf")) - ref[None, :])
            tot += tl.sum(f * tl.load(S_P + slot, mask=ok, other=0.0), 0)
            u += tl.sum(f * tl.load(U_P + slot, mask=ok, other=0.0), 0)
            part = tl.load(E_P + slot[:, :, None] * D + offs_d[None, None, :],
                           mask=(ok & (f > 0))[:, :, None] & d_ok[None, None, :], other=0.0)
            e += tl.sum(f[:, :, None] * part, 0)
        live = tot > 0
        inv = tl.where(live, 1.0 / tl.where(live, tot, 1.0), 0.0)
        lse = tl.where(live, ref + tl.log(tl.where(live, tot, 1.0)),
                       tl.where(tot == tot, float("-inf"), tot))
        tl.store(LSE + g * B + rows, lse, mask=head)
        tl.store(U_OUT + g * B + rows, u * inv, mask=head)
        tl.store(E_OUT + (g * B + rows)[:, None] * D + offs_d[None, :], e * inv[:, None],
                 mask=row_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _d_block(d: int, acc: torch.dtype):
    """(BLOCK_D, D_CHUNKS): chunks of at most BLOCK_D_MAX features (half that for fp64)."""
    cap = BLOCK_D_MAX // 2 if acc == torch.float64 else BLOCK_D_MAX
    block = min(max(16, next_power_of_2(max(1, d))), max(16, cap))
    return block, cdiv(d, block)


def _n_sm(device: torch.device) -> int:
    return _infonce._n_sm(device)


def _draw_args(hard_index, pair_index, alpha, query_index, query_weight):
    """(hard, pair, alpha, query_index, query_weight) for the kernels, then their strides (pair:
    3, the others: the row's). draw_mixing's views into its two draws pass as they are: no copy
    unless a dtype or a feature stride other than 1 needs one."""
    hard = hard_index.to(torch.int64).contiguous()
    pair = pair_index.to(torch.int64)
    al, qidx, qw = (_rows(alpha.to(torch.float32)), _rows(query_index.to(torch.int64)),
                    _rows(query_weight.to(torch.float32)))
    return (hard, pair, al, qidx, qw), (*pair.stride(), al.stride(0), qidx.stride(0), qw.stride(0))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if (x.dim() == 2 and x.stride(-1) == 1) else x.contiguous()


def mix_outputs(query, pair_index, query_weight):
    """Empty output of ``mix_forward`` (also the fake kernel of ``triton_mix``)."""
    b, d = query.shape
    return query.new_empty((b, pair_index.shape[1] + query_weight.shape[1], d))


def mixed_dots_outputs(q, pair_index, query_weight):
    """Empty outputs of ``mixed_dots_forward``: u and nrm, (B, s+s') in the accumulation dtype."""
    t = pair_index.shape[1] + query_weight.shape[1]
    acc = _acc_dtype(q.dtype)
    return q.new_empty((q.shape[0], t), dtype=acc), q.new_empty((q.shape[0], t), dtype=acc)


def _launch_fwd(q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight,
                u, nrm, out, want_dots, want_points):
    b, d = mix_query.shape
    s, sq = int(pair_index.shape[1]), int(query_weight.shape[1])
    n_blocks = cdiv(s, BLOCK_T) + cdiv(sq, BLOCK_T)
    if b == 0 or n_blocks == 0:
        return
    negatives = _rows(negatives)
    mix_query = _rows(mix_query).to(negatives.dtype)
    (hard, pair, al, qidx, qw), strides = _draw_args(hard_index, pair_index, alpha, query_index,
                                                     query_weight)
    block_d, d_chunks = _d_block(d, nrm.dtype)
    launcher(_mix_fwd_kernel)[(b, n_blocks)](
        q, mix_query, negatives, hard, pair, al, qidx, qw, u, nrm, out,
        hard.shape[1], s, sq, d, q.stride(0), mix_query.stride(0), negatives.stride(0), *strides,
        NORM_EPS, WANT_DOTS=want_dots, WANT_POINTS=want_points, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        D_CHUNKS=d_chunks, num_warps=4)


def mix_forward(query, negatives, hard_index, pair_index, alpha, query_index, query_weight):
    """The synthetic points (B, s+s', D) in the query dtype (see the module docstring)."""
    out = mix_outputs(query, pair_index, query_weight)
    acc = _acc_dtype(query.dtype)
    scratch = query.new_empty((1,), dtype=acc)
    query = _rows(query)
    _launch_fwd(query, query, negatives, hard_index, pair_index, alpha, query_index, query_weight,
                scratch, scratch, out, False, True)
    return out


def mixed_dots_forward(q, mix_query, negatives, hard_index, pair_index, alpha, query_index,
                       query_weight):
    """(u, nrm): u_it = <q_i, v_it> / nrm_it, nrm_it = max(|v_it|, eps)."""
    u, nrm = mixed_dots_outputs(q, pair_index, query_weight)
    q = _rows(q)
    _launch_fwd(q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight,
                u, nrm, u, True, False)
    return u, nrm


def mixed_dots_backward(grad, nrm, mix_query, negatives, hard_index, pair_index, alpha,
                        query_index, query_weight, q_dtype: torch.dtype):
    """dq_i = sum_t grad_it v_it / nrm_it, in ``q_dtype``."""
    b, d = mix_query.shape
    s, sq = int(pair_index.shape[1]), int(query_weight.shape[1])
    acc = nrm.dtype
    n_blocks = cdiv(s, BLOCK_T) + cdiv(sq, BLOCK_T)
    if b == 0 or n_blocks == 0:
        return mix_query.new_zeros((b, d), dtype=q_dtype)
    negatives = _rows(negatives)
    mix_query = _rows(mix_query).to(negatives.dtype)
    (hard, pair, al, qidx, qw), strides = _draw_args(hard_index, pair_index, alpha, query_index,
                                                     query_weight)
    block_d, d_chunks = _d_block(d, acc)
    if INTERPRETER or mix_query.device.type != "cuda":
        splits = min(2, n_blocks)  # exercises the partial sums
    else:  # about two programs per SM
        splits = max(1, min(n_blocks, cdiv(2 * _n_sm(mix_query.device), b * d_chunks)))
    per = cdiv(n_blocks, splits)
    splits = cdiv(n_blocks, per)
    part = mix_query.new_empty((splits, b, d), dtype=acc)
    launcher(_mix_bwd_kernel)[(b, d_chunks, splits)](
        grad.to(acc).contiguous(), nrm.contiguous(), mix_query, negatives, hard, pair, al, qidx,
        qw, part, b, hard.shape[1], s, sq, d, mix_query.stride(0), negatives.stride(0), *strides,
        per, BLOCK_T=BLOCK_T, BLOCK_D=block_d, num_warps=4)
    dq = part[0] if splits == 1 else part.sum(0)
    return dq.to(q_dtype)


def _lse_splits(b: int, n_blocks: int, device: torch.device) -> int:
    """Point splits per row of ``_mixed_lse_kernel``: about two programs per SM on a GPU, one
    under the interpreter (tests force more through this function)."""
    if INTERPRETER or device.type != "cuda":
        return 1
    return max(1, min(n_blocks, cdiv(2 * _n_sm(device), max(b, 1))))


# _mixed_combine_kernel's (BLOCK_R, BLOCK_D, BLOCK_S); the interpreter's small ones give the
# tests' shapes several blocks of each
_COMBINE_BLOCKS = (4, 16, 2) if INTERPRETER else (16, 32, 4)


def _combine_splits(m_p, s_p, u_p, e_p, extra, lse, e_sum, u_sum):
    """The final (lse, e_sum, u_sum) from the per-split partials (``_mixed_combine_kernel``)."""
    splits, g, b, d = e_p.shape
    block_r, block_d, block_s = _COMBINE_BLOCKS
    block_d = min(block_d, max(16, next_power_of_2(d)))
    launcher(_mixed_combine_kernel)[(cdiv(b, block_r), cdiv(d, block_d))](
        m_p, s_p, u_p, e_p, extra if extra is not None else lse, lse, u_sum, e_sum, splits, b, d,
        G=g, HAS_EXTRA=extra is not None, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_S=block_s)
    return lse, e_sum, u_sum


def mixed_lse_forward(q, mix_query, negatives, hard_index, pair_index, alpha, query_index,
                      query_weight, row_scale, row_bias, gammas, row_extra=None):
    """(lse (G, B), e_sum (G, B, D), u_sum (G, B)): lse_gi = log sum_t e^{gamma_g l_it} over the
    synthetic logits l_it = row_scale_i <q_i, h_it> + row_bias_i, and the softmax-weighted sums
    e_gi = sum_t p_git h_it, u_sum_gi = sum_t p_git <q_i, h_it> that make its backward O(B D)
    (``_common.mixed_lse_backward``). One pass over the points; nothing of size B x (s+s').
    ``row_extra`` (B,), one gamma: one more term e^{x_i} in each row's sum (no point: it adds
    nothing to e_sum and u_sum, but normalizes them), e.g. the log-sum-exp of the queue and the
    positive, so that InfoNCE's loss is this lse minus the positive logit."""
    if len(gammas) not in (1, 2):
        raise ValueError(f"the Triton mixed_lse supports 1 or 2 gammas, got {len(gammas)}")
    if row_extra is not None and len(gammas) != 1:
        raise ValueError("row_extra needs one gamma")
    b, d = mix_query.shape
    g = len(gammas)
    s, sq = int(pair_index.shape[1]), int(query_weight.shape[1])
    n_blocks = cdiv(s, BLOCK_T) + cdiv(sq, BLOCK_T)
    acc = _acc_dtype(mix_query.dtype)
    extra = row_extra.to(acc).contiguous() if row_extra is not None else None
    if b == 0 or n_blocks == 0:
        lse, e_sum, u_sum = mixed_lse_outputs(q, mix_query, gammas)
        if extra is not None:
            lse.copy_(extra[None])
        else:
            lse.fill_(float("-inf"))
        return lse, e_sum.zero_(), u_sum.zero_()
    block_d, d_chunks = _d_block(d, acc)
    per = cdiv(n_blocks, _lse_splits(b, n_blocks, q.device))
    splits = cdiv(n_blocks, per)
    final = splits == 1
    lse, e_sum, u_sum = mixed_lse_outputs(q, mix_query, gammas)
    if final:  # the kernel writes the outputs themselves
        m_p = s_p = lse  # unused
        u_p, e_p = u_sum, (e_sum if d_chunks == 1 else e_sum.zero_())
    else:  # raw partials per split, merged by _combine_splits
        m_p = q.new_empty((splits, g, b), dtype=acc)
        s_p = torch.empty_like(m_p)
        u_p = torch.empty_like(m_p)
        e_p = (q.new_empty if d_chunks == 1 else q.new_zeros)((splits, g, b, d), dtype=acc)
    q = _rows(q)
    negatives = _rows(negatives)
    mix_query = _rows(mix_query).to(negatives.dtype)
    (hard, pair, al, qidx, qw), strides = _draw_args(hard_index, pair_index, alpha, query_index,
                                                     query_weight)
    scale = row_scale.to(acc).contiguous()
    bias = row_bias.to(acc).contiguous() if row_bias is not None else scale  # unread: HAS_C
    launcher(_mixed_lse_kernel)[(b, splits)](
        q, mix_query, negatives, hard, pair, al, qidx, qw, scale, bias,
        extra if extra is not None else scale, lse, m_p, s_p, u_p, e_p,
        b, hard.shape[1], s, sq, d, q.stride(0), mix_query.stride(0), negatives.stride(0),
        *strides, NORM_EPS, per, *_infonce.gamma_pairs(gammas), G=g, FINAL=final,
        HAS_C=row_bias is not None, HAS_EXTRA=final and extra is not None, BLOCK_T=BLOCK_T,
        BLOCK_D=block_d, D_CHUNKS=d_chunks, num_warps=LSE_WARPS)
    if final:
        return lse, e_sum, u_sum
    return _combine_splits(m_p, s_p, u_p, e_p, extra, lse, e_sum, u_sum)


# ------------------------------------------------------------------------------------------------
# the family ops
# ------------------------------------------------------------------------------------------------


def _draws_tuple(draws: MixingDraws):
    return draws.pair_index, draws.alpha, draws.query_index, draws.query_weight


def mix(query, negatives, hard_index, draws: MixingDraws):
    """``reference.mix_points`` with ``_mix_fwd_kernel``, through the custom op
    ``contrastive_kernels::triton_mix``."""
    from .. import ops

    negatives = negatives.to(query.device)
    return ops.triton_mix(query.detach(), negatives.detach(), hard_index.to(query.device),
                          *_draws_tuple(draws))


def mixed_dots(q, mix_query, negatives, hard_index, draws: MixingDraws):
    """u_it = <q_i, h_it> (B, s+s') without forming h; gradient to q only. Through the custom op
    ``contrastive_kernels::triton_mixed_dots_fwd`` (backward: ``triton_mixed_dots_bwd``)."""
    from .. import ops

    return ops.triton_mixed_dots_fwd(q, mix_query.detach(), negatives.detach(), hard_index,
                                     *_draws_tuple(draws))[0]


def mixed_lse(q, mix_query, negatives, hard_index, draws: MixingDraws, row_scale, row_bias=None,
              *, gammas=(1.0,), row_extra=None):
    """The log-sum-exp (G, B) over t of gamma_g (row_scale_i u_it + row_bias_i), u = mixed_dots(...),
    from one pass over the points that also keeps the softmax-weighted sums its gradient needs, so
    that backward gathers nothing; with ``row_extra`` (B,), one gamma, that log-weight joins each
    row's sum (``mixed_lse_forward``). Gradients to q, row_scale, row_bias and row_extra. Through
    the custom op ``contrastive_kernels::triton_mixed_lse``."""
    from .. import ops

    return ops.triton_mixed_lse(q, mix_query.detach(), negatives.detach(), hard_index,
                                *_draws_tuple(draws), row_scale, row_bias,
                                [float(g) for g in gammas], row_extra)[0]


# ------------------------------------------------------------------------------------------------
# the loss's forward pass with the hard negatives (see the module docstring)
# ------------------------------------------------------------------------------------------------


def fused_topk_reason(q: torch.Tensor, k: torch.Tensor, n_hard: int, n_gammas: int) -> Optional[str]:
    """None when ``lse_stats_topk`` can take the hard negatives from the loss kernel, else why not."""
    why = _loss_topk.common_reason(q, k, n_hard)
    if why is not None:
        return why
    if INTERPRETER and q.dtype == torch.bfloat16:
        return "bf16 under the interpreter (its top-k dot is unreliable)"
    if _infonce._d_blocks(int(q.shape[1]), q.dtype)[1] != 1:
        return "feature dim too wide for a resident tile"
    if q.dtype == torch.float32 and _infonce._precision(q.dtype) not in ("tf32x3", "ieee"):
        return "TF32 matmuls allowed: the loss kernel's fp32 dot is not the top-k kernel's"
    if n_gammas not in (1, 2) or n_hard > _topk.MAX_K:
        return "unsupported estimator or n_hard"
    cap = _loss_topk.candidate_plan(int(k.shape[0]), n_hard)[2]
    if _infonce.cand_merge_width(cap, n_hard) > _infonce.CAND_MERGE_MAX_WIDTH:
        # a queue far longer than n_hard with a small n_hard (2^20 rows, n_hard <= 32)
        return "candidate lists wider than the merge kernel takes"
    return None


def lse_stats_topk(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
                   gammas=(1.0,), n_hard: int, row_extra=None):
    """(row_lse (G, B), hard (B, n_hard) int64) where row_lse = ``lse_stats(...)[0]`` over the
    queue k (with ``row_extra``: see ``infonce.lse_stats``) and hard = ``topk(q.detach(),
    k.detach(), n_hard, similarity="dot").indices``, with the hard negatives taken from the loss
    kernel's own pass when ``fused_topk_reason`` allows (module docstring, _loss_topk.py), else
    from the separate top-k."""
    from .. import ops

    def fused(kth, cap):
        row_only = (query_side_only(q, k, row_scale, col_scale, row_bias, col_bias)
                    and _infonce.row_only_supported(q.shape[1], q.dtype, len(gammas), False))
        out = ops.triton_lse_topk_fwd(q, k, row_scale, col_scale, row_bias, col_bias,
                                      [float(g) for g in gammas], bool(row_only), kth, cap, n_hard,
                                      row_extra)
        return out[0], out[5], out[6]

    return _loss_topk.lse_stats_topk(
        NAME, fused_topk_reason(q, k, n_hard, len(gammas)), q, k, gammas, n_hard,
        (col_scale is not None, row_bias is not None, col_bias is not None), fused,
        lambda: _infonce.lse_stats(q, k, row_scale, col_scale, row_bias, col_bias, gammas=gammas,
                                   row_extra=row_extra)[0],
        lambda a, b, n: _topk.topk(a, b, n, similarity="dot")[1])


# ------------------------------------------------------------------------------------------------
# ahead-of-time compile specs (scripts/triton_aot_check.py)
# ------------------------------------------------------------------------------------------------


def _aot_specs():
    idx = {"HARD": "*i64", "PAIR": "*i64", "QIDX": "*i64", "ALPHA": "*fp32", "QW": "*fp32"}
    draw_strides = {n: "i32" for n in ("sp_r", "sp_t", "sp_xy", "sa_r", "sqi_r", "sw_r")}
    fwd_sig = {"Q": "*{dt}", "MQ": "*{dt}", "NEG": "*{dt}", **idx, "U": "*{acc}", "NRM": "*{acc}",
               "OUT": "*{dt}", "n_hard": "i32", "S": "i32", "SQ": "i32", "D": "i32",
               "stride_q": "i32", "stride_m": "i32", "stride_n": "i32", **draw_strides,
               "eps": "fp32"}
    bwd_sig = {"G": "*{acc}", "NRM": "*{acc}", "MQ": "*{dt}", "NEG": "*{dt}", **idx,
               "DQ_P": "*{acc}", "B": "i32", "n_hard": "i32", "S": "i32", "SQ": "i32", "D": "i32",
               "stride_m": "i32", "stride_n": "i32", **draw_strides, "blocks_per_split": "i32"}
    lse_sig = {"Q": "*{dt}", "MQ": "*{dt}", "NEG": "*{dt}", **idx,
               **{p: "*{acc}" for p in ("A", "C", "EXTRA", "LSE", "M_P", "S_P", "U_P", "E_P")},
               "B": "i32", "n_hard": "i32", "S": "i32", "SQ": "i32", "D": "i32", "stride_q": "i32",
               "stride_m": "i32", "stride_n": "i32", **draw_strides, "eps": "fp32",
               "blocks_per_split": "i32",
               **{p: "fp32" for p in ("g0_hi", "g0_lo", "g1_hi", "g1_lo")}}
    divisible = ("D", "stride_q", "stride_m", "stride_n")
    specs = []
    for d in (128, 768):
        dtypes = ("fp32", "fp16", "bf16", "fp64") if d == 128 else ("bf16", "fp32")
        chunks = lambda dt, d=d: _d_block(d, torch.float64 if dt == "fp64" else torch.float32)  # noqa: E731
        for dots, points, name in ((True, False, "mixed_dots_fwd"), (False, True, "mix")):
            specs.append(dict(
                name=f"{name}[D={d}]", kernel=_mix_fwd_kernel, dtypes=dtypes,
                signature={**fwd_sig, **{c: "constexpr" for c in
                                         ("WANT_DOTS", "WANT_POINTS", "BLOCK_T", "BLOCK_D", "D_CHUNKS")}},
                constexprs=dict(WANT_DOTS=dots, WANT_POINTS=points, BLOCK_T=32,
                                BLOCK_D=lambda dt, c=chunks: c(dt)[0],
                                D_CHUNKS=lambda dt, c=chunks: c(dt)[1]),
                divisible=divisible, num_warps=4, num_stages=3))
        specs.append(dict(
            name=f"mixed_dots_bwd[D={d}]", kernel=_mix_bwd_kernel, dtypes=dtypes,
            signature={**bwd_sig, "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
            constexprs=dict(BLOCK_T=32, BLOCK_D=lambda dt, c=chunks: c(dt)[0]),
            divisible=divisible, num_warps=4, num_stages=3))
        for g, final in ((1, True), (2, False)):
            specs.append(dict(
                name=f"mixed_lse[D={d},{g} gammas,{'final' if final else 'splits'}]",
                kernel=_mixed_lse_kernel, dtypes=dtypes,
                signature={**lse_sig, **{c: "constexpr" for c in
                                         ("G", "FINAL", "HAS_C", "HAS_EXTRA", "BLOCK_T",
                                          "BLOCK_D", "D_CHUNKS")}},
                constexprs=dict(G=g, FINAL=final, HAS_C=g == 2, HAS_EXTRA=g == 1, BLOCK_T=32,
                                BLOCK_D=lambda dt, c=chunks: c(dt)[0],
                                D_CHUNKS=lambda dt, c=chunks: c(dt)[1]),
                divisible=divisible, num_warps=LSE_WARPS, num_stages=3))
    for g in (1, 2):
        specs.append(dict(
            name=f"mixed_combine[{g} gammas{',extra' if g == 1 else ''}]",
            kernel=_mixed_combine_kernel, dtypes=("fp32", "fp64"),
            signature={**{p: "*{acc}" for p in ("M_P", "S_P", "U_P", "E_P", "EXTRA", "LSE", "U_OUT",
                                                 "E_OUT")},
                       "SPLITS": "i32", "B": "i32", "D": "i32",
                       **{c: "constexpr" for c in ("G", "HAS_EXTRA", "BLOCK_R", "BLOCK_D", "BLOCK_S")}},
            constexprs=dict(G=g, HAS_EXTRA=g == 1,
                            **dict(zip(("BLOCK_R", "BLOCK_D", "BLOCK_S"), _COMBINE_BLOCKS))),
            divisible=("D",), num_warps=4, num_stages=1))
    return specs


AOT_SPECS = _aot_specs()
