"""Exact top-k similarity search in Triton: the similarity GEMM on tensor cores with the
selection fused into its epilogue, over banks on the device or streamed from the host.

Result (the family op ``topk`` of ``losses.py``): for each query row the k bank rows of largest
score, largest first, ties to the lower bank index, as fp32 values and int64 indices; exactly
``reference.topk_similarity`` up to the rounding of the score arithmetic.

Keys
----
A (score, bank index) pair is one int64 key whose signed order is the result order:

    key = ord(score) << 32 | (2^32 - 1 - index),   ord(x) = bits(x) if x >= +0 else -(bits(x) & 0x7fffffff)

``ord`` is the float's sign-magnitude bit pattern turned into a two's-complement integer, so
integer order is float order, and -0.0 and +0.0 both map to 0 (they tie and the lower index
wins, as in the reference, which adds +0.0 to every score). Merging candidate sets is then an
integer ``torch.topk``, exact and deterministic. Index < 2^32.

Scores
------
``s_ij = f_i(t_ij)`` where the GEMM tile gives ``t_ij``:
  dot:    t = <q_i, b_j>                    f_i(t) = t
  cosine: t = <q_i, b_j> * (1/|b_j|)        f_i(t) = t * (1/|q_i|)
  l2:     t = 2 <q_i, b_j> - |b_j|^2        f_i(t) = t - |q_i|^2        (= -|q_i - b_j|^2)
Row norms come from a cheap pre-pass (``_sq_norm_kernel``: fp32 sum of squares, one read of
each row; 1/max(|x|, 1e-12) as ``F.normalize``). Every f_i is monotone non-decreasing (a
rounded product with a positive constant, or a rounded difference), so the row maximum of t maps
to the row maximum of s: the per-element epilogue works on t, and f is applied per row.
fp16/bf16 inputs multiply exactly into fp32 accumulators; fp32 inputs use 3xTF32
(``input_precision="tf32x3"``, about fp32 accuracy on tensor cores); fp64 inputs are cast to
fp32 first (the reference scores in fp32 too).

The kernel (``_topk_tile_kernel``), grid (query blocks of BM rows) x (S splits of the bank)
--------------------------------------------------------------------------------------------
Each program keeps its BM query rows on chip and walks its split's bank tiles of BN rows
(``tl.dot`` of BM x D by D x BN, loads software-pipelined; on H100 fp16/bf16 BM=64, BN=128, 4
warps, so that two programs share an SM and one's epilogue overlaps the other's MMA). Modes:

* FILTER (the main pass). Every row i has a threshold key T_i, a lower bound of its final k-th
  key. The epilogue computes the row maxima of t (one max per element, plus the label compare
  when labels are given) and compares f_i(max) with T_i: most tiles stop there. Where some row
  passes (a *survivor*), the tile's survivors are extracted, up to X per row in straight code
  (X = 1..8, from the expected survivor density). X = 1 (survivors sparse, the usual case for
  k <= 128): one pass sums BN + c over the row's scores at or above T_i (c: the tile-local
  column, fp32, exact); a sum below 2 BN means one survivor, which is the row maximum, at column
  sum - BN. X > 1: in key order, the row maximum, its lowest column (searched on the fp32 pipe),
  then that element is masked out and the maximum taken again. Each survivor that is not
  excluded (``exclude_index``, tested per survivor, not per element) is written as a key to the
  program's own slots of a candidate buffer (``cap`` slots per row and split; a per-row
  counter in registers: no atomics). A tile with more than X survivors in some row goes on the
  program's redo list; after the walk the program recomputes those tiles and extracts the
  rest (X = 1: all survivors of the rows with several; X > 1: all but the first X), a
  data-dependent loop kept out of the main walk (a nested loop would stop Triton from
  pipelining it).
* TILEMAX (thresholds): the largest score of each (row, tile), written as an fp32 (M, tiles)
  matrix (no column search: the threshold needs only the value).
* DENSE (small banks): every key of the tile is written to an (M, n) key matrix.
* GEMM_ONLY (the floor for benchmarks): the same tiles with a running row maximum.

Thresholds (``_select``)
------------------------
Default: a TILEMAX pass over the strided sample (every f-th row, f = 8, 4 or 2 as k grows,
``sample_factor``), then T_i = the smallest key of score v_i, v_i the (k+E)-th largest tile
maximum of row i (E exclusions per row). The k+E largest tile maxima are k+E distinct bank rows,
at most E of them excluded, so T_i is a valid lower bound; with at least 4k sample tiles it is
close to the sample's k-th key, and about f*k rows per query pass it. The sample pass costs
about 1/f of the GEMM (its epilogue is the GEMM_ONLY one plus a store). When the view has too
few tiles for that, T_i is the exact k-th key of the 1/8 sample, computed the same way
recursively down to a view of at most ``dense_max(k)`` rows (DENSE). The merge is one
``torch.topk`` over each row's candidates.

Exactness is checked, not assumed: a row is exact when no split overflowed its slots and k
candidates were found (then every bank row left out scored below T_i <= the k-th candidate).
Rows that fail (an adversarial bank order defeating the sample, non-finite inputs, scores of
-inf, which the filter never keeps) are recomputed by the chunked backend; this costs one
device synchronization per call. Ties are exact because all passes compute each score with the
same instructions (tensor-core results do not depend on a row's position in the tile).

Cost (H100, M=8192, D=128, fp16; the GEMM floor is GEMM_ONLY, 4.6 ms at N=2^20): k=16 10.4 ms
(2.3x the floor), k=128 16.1 ms (3.4x), k=1024 37.7 ms; at N=2^22: 29.8 / 50.5 / 95.7 ms against
18.9 ms (1.6x / 2.7x / 5.1x). torch.mm + torch.topk in chunks: 69-332 ms. The gap to the floor
is the extraction work in tiles where some row has a survivor (for k >= 128 nearly every tile
at these sizes, since ~f*k survivors per row spread over N/BN tiles), plus the sample pass.
Those figures predate the column-free TILEMAX pass, the sample steps of ``sample_factor`` and
the survivor sum (not measured since). Per sm_90 SASS, a FILTER tile without survivors costs
about what a GEMM_ONLY tile does (306 against 287 instructions per thread); a tile where some
row has one costs 295 more (X=1), 192 of them the survivor sum's compare, select and add on
each of the thread's 64 elements, which Triton runs for all BM rows (433 before the sum
replaced a survivor count and a column search). By ``sample_factor``'s model that puts k=16 at
about 1.7x the floor and k=128 at 2.6x; 1.3x at k <= 128 would need a different selection (per
warp or per row, not per CTA tile).

Limits: k <= MAX_K (2048) here; larger k runs the chunked backend (exact, without the fused
GEMM epilogue). The candidate buffer takes about 8 * (16k + ...) bytes per query row; query rows
are processed in blocks so that it stays under ``CK_TOPK_BUFFER_MB`` (default 512).

Banks on the host (``bank`` on the CPU, ``query`` on a GPU)
----------------------------------------------------------
The bank is streamed once, in chunks, with the copies overlapping the kernels
(_bank_chunks.HostChunks: pinned staging and device double buffers, copies on a side stream).
Thresholds run across chunks: chunk 0 uses its own sample cascade, every later chunk the current
k-th key of the running top-k (a valid lower bound: k real bank rows score above it), and the
chunk's candidates merge into the running top-k on the device. The result equals the device-resident result.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _bank_chunks, chunked
from . import INTERPRETER, cdiv, dot_dtype

NAME = "triton"
MAX_K = 2048             # larger k: the chunked backend (see the module docstring)
SAMPLE_STEP = 8          # the threshold sample of a view takes every 8th row
DENSE_MIN = 4096         # views of at most max(DENSE_MIN, 16 k) rows run in DENSE mode
BUFFER_BYTES = _bank_chunks.TOPK_BUFFER_BYTES
INT64_MIN = -(2**63)
_LOW = 0xFFFFFFFF

MODE_FILTER, MODE_DENSE, MODE_GEMM_ONLY, MODE_TILEMAX = 0, 1, 2, 3
SIM_CODES = {"dot": 0, "cosine": 1, "l2": 2}

# Tile shapes under the interpreter (CPU tensors): small, so that the tests' small banks still
# span several tiles and splits. Tests may change them.
CPU_BLOCKS = {"BM": 16, "BN": 32, "splits": 3}
STATS = None  # a list to collect per-pass survivor statistics into (benchmarks, tests)
# X=1 tiles: the survivor sum (module docstring); CK_TOPK_SURVIVOR_SUM=0 runs the survivor count
# and column search it replaced (the A/B of scripts/gpu_session.sh's topk stage)
SURVIVOR_SUM = os.environ.get("CK_TOPK_SURVIVOR_SUM", "1") != "0"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sq_norm_kernel(x_ptr, out_ptr, n, stride, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = sum_d x[r, d]^2 in fp32."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < n
    dd = tl.arange(0, BD)
    acc = tl.zeros([BR], tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + dd
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                    mask=ok[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, 1)
    tl.store(out_ptr + rows, acc, mask=ok)


@triton.jit
def _pack(v, gidx):
    """int64 keys of fp32 scores v and int64 bank indices gidx (same shape)."""
    bits = v.to(tl.int32, bitcast=True)
    o = tl.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))
    low = tl.full(gidx.shape, 4294967295, tl.int64) - gidx
    return (o.to(tl.int64) << 32) | low


@triton.jit
def _unpack_index(keys):
    """The bank indices of ``_pack``'s keys (``decode_indices`` in a kernel)."""
    low = tl.full(keys.shape, 4294967295, tl.int64)
    return low - (keys & low)


@triton.jit
def _row_f(t, qa, SIM: tl.constexpr):
    """f_i of the module docstring, for t of shape (BM,) or (BM, BN) (qa broadcast on rows)."""
    if SIM == 1:
        return t * qa
    elif SIM == 2:
        return t - qa
    else:
        return t


@triton.jit
def _bank_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, vcols, col_ok,
               step, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               SIM: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """t (BM, BN) fp32 for view columns ``vcols`` (memory rows vcols * step of b_ptr)."""
    dd = tl.arange(0, BD)
    boff = vcols.to(tl.int64) * stride_bv
    if D == BD:
        if MASKED:
            b = tl.load(b_ptr + boff[:, None] + dd[None, :], mask=col_ok[:, None], other=0.0)
        else:
            b = tl.load(b_ptr + boff[:, None] + dd[None, :])
        acc = tl.dot(q0, tl.trans(b), input_precision=PREC)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + dd
            q = tl.load(q_ptr + rows64[:, None] * stride_qm + cols[None, :],
                        mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
            if MASKED:
                b = tl.load(b_ptr + boff[:, None] + cols[None, :],
                            mask=col_ok[:, None] & (cols[None, :] < D), other=0.0)
            else:
                b = tl.load(b_ptr + boff[:, None] + cols[None, :], mask=cols[None, :] < D, other=0.0)
            acc = tl.dot(q, tl.trans(b), acc, input_precision=PREC)
    if SIM == 1:
        if MASKED:
            ba = tl.load(baux_ptr + vcols.to(tl.int64) * step, mask=col_ok, other=1.0)
        else:
            ba = tl.load(baux_ptr + vcols.to(tl.int64) * step)
        acc = acc * ba[None, :]
    elif SIM == 2:
        if MASKED:
            ba = tl.load(baux_ptr + vcols.to(tl.int64) * step, mask=col_ok, other=0.0)
        else:
            ba = tl.load(baux_ptr + vcols.to(tl.int64) * step)
        acc = 2.0 * acc - ba[None, :]
    return acc


@triton.jit
def _label_ok(ql, bl_ptr, vcols, col_ok, step, MASKED: tl.constexpr):
    if MASKED:
        bl = tl.load(bl_ptr + vcols.to(tl.int64) * step, mask=col_ok, other=0)
    else:
        bl = tl.load(bl_ptr + vcols.to(tl.int64) * step)
    return ql[:, None] != bl[None, :]


@triton.jit
def _eligible_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr, ql,
                   vcols, col_ok, step, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, SIM: tl.constexpr, LABELS: tl.constexpr,
                   MASKED: tl.constexpr, PREC: tl.constexpr):
    """``_bank_tile`` with the columns a row may not pick at -inf: same-label bank rows (LABELS)
    and, when MASKED, the columns past the end of the view."""
    s = _bank_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, vcols, col_ok,
                   step, D, BD, BM, BN, SIM, MASKED, PREC)
    if LABELS:
        s = tl.where(_label_ok(ql, bl_ptr, vcols, col_ok, step, MASKED), s, float("-inf"))
    if MASKED:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _store_candidate(m, a, cont, cnt, t0col, gbase, step, thr_v, thr_i, ex, rows64, out_ptr,
                     stride_out, slot0, cap, j, skip, E: tl.constexpr):
    """Keep, for each row still going (``cont``), the candidate of score m at tile-local column
    ``a`` (fp32) if it is at or above the row's threshold and not excluded: its key goes to the
    row's next slot. Step ``j`` stores nothing when j < skip (the redo pass repeats the first X
    steps of the main walk). Returns (cnt, elig): elig, the rows whose candidate passed the
    threshold (stored or skipped)."""
    gidx = gbase + (t0col + a.to(tl.int32)).to(tl.int64) * step
    elig = cont & (m > float("-inf")) & ((m > thr_v) | ((m == thr_v) & (gidx <= thr_i)))
    keep = elig & ((cnt * 0 + j) >= skip)
    if E > 0:
        keep = keep & (tl.sum((ex == gidx[:, None]).to(tl.int32), 1) == 0)
    key = _pack(m, gidx)
    tl.store(out_ptr + rows64 * stride_out + slot0 + cnt, key, mask=keep & (cnt < cap))
    cnt += keep.to(tl.int32)
    return cnt, elig


@triton.jit
def _extract(s, m, cont, cnt, t0col, lcol, gbase, step, thr_v, thr_i, ex, rows64, out_ptr,
             stride_out, slot0, cap, j, skip, E: tl.constexpr, LAST: tl.constexpr):
    """One extraction step on final scores s (BM, BN) with row maxima m: for each row still
    going (``cont``), take its largest key (lowest column among equal scores) and keep it as
    ``_store_candidate`` does. Unless LAST, mask it out of s and take the next maximum. Columns
    are tile-local fp32 (``lcol`` = 0..BN-1, exact): the search runs on the fp32 pipe."""
    a = tl.min(tl.where(s == m[:, None], lcol[None, :], 1.0e9), 1)
    cnt, elig = _store_candidate(m, a, cont, cnt, t0col, gbase, step, thr_v, thr_i, ex, rows64,
                                 out_ptr, stride_out, slot0, cap, j, skip, E)
    cont = elig & (cnt <= cap)
    if not LAST:
        s = tl.where(lcol[None, :] == a[:, None], float("-inf"), s)
        m = tl.max(s, 1)
        cont = cont & (m >= thr_v) & (m > float("-inf"))
    return s, m, cont, cnt


@triton.jit
def _survivor_sum(s, thr_v, lcol, BN: tl.constexpr):
    """Per row, the sum of BN + column over the scores at or above the threshold (ties counted
    generously): under 2 BN exactly when the row has at most one survivor, and then BN + its
    column (exact in fp32: at most BN (2 BN - 1) < 2^24). One pass where a survivor count and a
    column search take two."""
    return tl.sum(tl.where(s >= thr_v[:, None], lcol[None, :] + BN, 0.0), 1)


@triton.jit
def _filter_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr, ql, qa,
                 t, n_view, step, gbase, thr_v, thr_i, ex, out_ptr, stride_out, slot0, cap, cnt,
                 redo_ptr, nredo, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, SIM: tl.constexpr, E: tl.constexpr, LABELS: tl.constexpr,
                 X: tl.constexpr, SUM: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    vcols = t * BN + tl.arange(0, BN)
    col_ok = vcols < n_view
    s = _eligible_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr, ql,
                       vcols, col_ok, step, D, BD, BM, BN, SIM, LABELS, MASKED, PREC)
    m = _row_f(tl.max(s, 1), qa, SIM)
    cont = row_ok & (cnt <= cap) & (m >= thr_v) & (m > float("-inf"))
    if tl.max(cont.to(tl.int32), 0) > 0:
        s = _row_f(s, qa[:, None], SIM)
        lcol = tl.arange(0, BN).to(tl.float32)
        if X == 1 and SUM:
            # a row with one survivor (it is the row maximum m) is done here; rows with more go
            # to the redo pass whole
            packed = _survivor_sum(s, thr_v, lcol, BN)
            one = packed < 2 * BN
            cnt, _ = _store_candidate(m, packed - BN, cont & one, cnt, t * BN, gbase, step, thr_v,
                                      thr_i, ex, rows64, out_ptr, stride_out, slot0, cap, 0, 0, E)
            more = cont & ~one
        else:
            # survivors per row in this tile (ties at the threshold counted generously): rows with
            # more than X of them need the redo pass
            n_surv = tl.sum(tl.where(s >= thr_v[:, None], 1.0, 0.0), 1)
            for i in tl.static_range(X):
                s, m, cont, cnt = _extract(s, m, cont, cnt, t * BN, lcol, gbase, step, thr_v,
                                           thr_i, ex, rows64, out_ptr, stride_out, slot0, cap, 0, 0,
                                           E, i == X - 1)
            more = cont & (n_surv > X)
        if tl.max(more.to(tl.int32), 0) > 0:
            tl.store(redo_ptr + nredo, t)
            nredo += 1
    return cnt, nredo


@triton.jit
def _store_tile_max(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr, ql, qa,
                    t, n_view, step, out_ptr, stride_out, D: tl.constexpr, BD: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, SIM: tl.constexpr, LABELS: tl.constexpr,
                    MASKED: tl.constexpr, PREC: tl.constexpr):
    """TILEMAX: out[row, t] = the row's largest eligible score in view tile t (-inf: none)."""
    vcols = t * BN + tl.arange(0, BN)
    s = _eligible_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr, ql,
                       vcols, vcols < n_view, step, D, BD, BM, BN, SIM, LABELS, MASKED, PREC)
    tl.store(out_ptr + rows64 * stride_out + t, _row_f(tl.max(s, 1), qa, SIM), mask=row_ok)


@triton.jit(do_not_specialize=["step", "gbase", "cap", "tiles_per_split", "n_splits"])
def _topk_tile_kernel(
        q_ptr, qaux_ptr, ex_ptr, ql_ptr, thr_v_ptr, thr_i_ptr,
        b_ptr, baux_ptr, bl_ptr,
        out_ptr, cnt_ptr, redo_ptr,
        M, n_view, stride_qm, stride_bv, step, gbase, stride_out, cap, tiles_per_split, n_splits,
        D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SIM: tl.constexpr,
        E: tl.constexpr, EP: tl.constexpr, LABELS: tl.constexpr, MODE: tl.constexpr,
        X: tl.constexpr, SUM: tl.constexpr, PREC: tl.constexpr, ALWAYS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BD)
    q0 = tl.load(q_ptr + rows64[:, None] * stride_qm + dd[None, :],
                 mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    if SIM != 0:
        qa = tl.load(qaux_ptr + rows, mask=row_ok, other=0.0)
    else:
        qa = tl.zeros([BM], tl.float32)
    if LABELS:
        ql = tl.load(ql_ptr + rows, mask=row_ok, other=-1)
    else:
        ql = tl.zeros([BM], tl.int64)
    gbase = gbase.to(tl.int64)
    step64 = step.to(tl.int64)
    n_tiles = tl.cdiv(n_view, BN)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    t_full = tl.minimum(t1, n_view // BN)

    if MODE == 1:  # DENSE: every key
        ep = tl.arange(0, EP)
        if E > 0:
            ex = tl.load(ex_ptr + rows64[:, None] * EP + ep[None, :], mask=row_ok[:, None], other=-1)
        for t in range(t0, t1):
            vcols = t * BN + tl.arange(0, BN)
            col_ok = vcols < n_view
            s = _bank_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, vcols,
                           col_ok, step64, D, BD, BM, BN, SIM, True, PREC)
            s = _row_f(s, qa[:, None], SIM)
            gidx = gbase + vcols.to(tl.int64) * step64
            key = _pack(s, tl.broadcast_to(gidx[None, :], [BM, BN]))
            ok = col_ok[None, :] & row_ok[:, None]
            if LABELS:
                ok = ok & _label_ok(ql, bl_ptr, vcols, col_ok, step64, True)
            if E > 0:
                for e in tl.static_range(EP):
                    ex_e = tl.sum(tl.where(ep[None, :] == e, ex, 0), 1)
                    ok = ok & (ex_e[:, None] != gidx[None, :])
            key = tl.where(ok, key, -9223372036854775808)
            tl.store(out_ptr + rows64[:, None] * stride_out + vcols[None, :], key,
                     mask=row_ok[:, None] & col_ok[None, :])
    elif MODE == 2:  # GEMM_ONLY: the same tiles, a running row maximum
        run = tl.full([BM], float("-inf"), tl.float32)
        for t in range(t0, t_full):
            vcols = t * BN + tl.arange(0, BN)
            s = _bank_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, vcols,
                           vcols < n_view, step64, D, BD, BM, BN, SIM, ALWAYS_MASK, PREC)
            run = tl.maximum(run, tl.max(s, 1))
        for t in range(t_full, t1):
            vcols = t * BN + tl.arange(0, BN)
            col_ok = vcols < n_view
            s = _bank_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, vcols,
                           col_ok, step64, D, BD, BM, BN, SIM, True, PREC)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            run = tl.maximum(run, tl.max(s, 1))
        tl.store(out_ptr + rows64 * n_splits + pid_s, run, mask=row_ok)
    elif MODE == 3:  # TILEMAX: the largest score of each (row, tile), for thresholds
        for t in range(t0, t_full):
            _store_tile_max(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr,
                            ql, qa, t, n_view, step64, out_ptr, stride_out, D, BD, BM, BN, SIM, LABELS,
                            ALWAYS_MASK, PREC)
        for t in range(t_full, t1):  # the partial last tile, if this split has it
            _store_tile_max(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr, bl_ptr,
                            ql, qa, t, n_view, step64, out_ptr, stride_out, D, BD, BM, BN, SIM, LABELS,
                            True, PREC)
    else:  # FILTER
        thr_v = tl.load(thr_v_ptr + rows, mask=row_ok, other=float("inf"))
        thr_i = tl.load(thr_i_ptr + rows, mask=row_ok, other=0)
        ep = tl.arange(0, EP)
        if E > 0:
            ex = tl.load(ex_ptr + rows64[:, None] * EP + ep[None, :], mask=row_ok[:, None], other=-1)
        else:
            ex = tl.zeros([BM, EP], tl.int64)
        slot0 = pid_s * cap
        prog = pid_m * n_splits + pid_s
        redo = redo_ptr + prog.to(tl.int64) * tiles_per_split
        cnt = tl.zeros([BM], tl.int32)
        nredo = 0
        for t in range(t0, t_full):
            cnt, nredo = _filter_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv,
                                      baux_ptr, bl_ptr, ql, qa, t, n_view, step64, gbase, thr_v,
                                      thr_i, ex, out_ptr, stride_out, slot0, cap, cnt, redo, nredo,
                                      D, BD, BM, BN, SIM, E, LABELS, X, SUM, ALWAYS_MASK, PREC)
        for t in range(t_full, t1):  # the partial last tile, if this split has it
            cnt, nredo = _filter_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv,
                                      baux_ptr, bl_ptr, ql, qa, t, n_view, step64, gbase, thr_v,
                                      thr_i, ex, out_ptr, stride_out, slot0, cap, cnt, redo, nredo,
                                      D, BD, BM, BN, SIM, E, LABELS, X, SUM, True, PREC)
        # tiles that had more than X survivors in some row: recompute, skip the first X steps
        for r in range(0, nredo):
            t = tl.load(redo + r)
            vcols = t * BN + tl.arange(0, BN)
            col_ok = vcols < n_view
            s = _eligible_tile(q0, q_ptr, rows64, row_ok, stride_qm, b_ptr, stride_bv, baux_ptr,
                               bl_ptr, ql, vcols, col_ok, step64, D, BD, BM, BN, SIM, LABELS, True,
                               PREC)
            s = _row_f(s, qa[:, None], SIM)
            m = tl.max(s, 1)
            cont = row_ok & (cnt <= cap) & (m >= thr_v) & (m > float("-inf"))
            j = 0
            lcol = tl.arange(0, BN).to(tl.float32)
            if X == 1 and SUM:  # the main walk stored the rows with one survivor, nothing of the others
                cont = cont & (_survivor_sum(s, thr_v, lcol, BN) >= 2 * BN)
                skip = 0
            else:
                skip = X
            while tl.max(cont.to(tl.int32), 0) > 0:
                s, m, cont, cnt = _extract(s, m, cont, cnt, t * BN, lcol, gbase, step64, thr_v,
                                           thr_i, ex, rows64, out_ptr, stride_out, slot0, cap, j,
                                           skip, E, False)
                j += 1
        tl.store(cnt_ptr + rows64 * n_splits + pid_s, cnt, mask=row_ok)


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (fp32 scores, int64 indices); INT64_MIN (no candidate) -> (-inf, -1)."""
    hi = (keys >> 32).to(torch.int32)
    empty = keys == INT64_MIN
    bits = torch.where(hi >= 0, hi, (-hi) | torch.iinfo(torch.int32).min)
    values = bits.view(torch.float32).masked_fill(empty, -math.inf)
    return values, decode_indices(keys).masked_fill(empty, -1)


def decode_indices(keys: torch.Tensor) -> torch.Tensor:
    """The indices of ``decode_keys`` alone, for keys known to hold a candidate (not INT64_MIN)."""
    return _LOW - (keys & _LOW)


def encode_keys(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The inverse of ``decode_keys`` (for tests and host-side merges)."""
    bits = values.float().contiguous().view(torch.int32)
    o = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)).to(torch.int64)
    return (o << 32) | (_LOW - index.to(torch.int64))


def _threshold(keys_kth: torch.Tensor):
    """A row's threshold key -> (fp32 value, int64 index) as the kernel compares them."""
    values, index = decode_keys(keys_kth)
    index = index.masked_fill(keys_kth == INT64_MIN, 2**62)
    return values.contiguous(), index.contiguous()


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    BM: int
    BN: int
    BD: int
    num_warps: int
    num_stages: int
    precision: str
    target_programs: int
    BN_DENSE: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def gpu_tiles(cc_major: int, dtype: torch.dtype, d: int):
    """(BM, BN, BD, num_warps, num_stages, BN of DENSE mode) on a GPU of compute capability
    ``cc_major``.x, chosen with the AOT report (scripts/triton_aot_topk.py): no spills in FILTER
    mode, shared memory under the 227 KiB (sm_90) / 163 KiB (sm_80) per block. fp32 runs 3xTF32,
    whose split operands take twice the shared memory and registers: smaller tiles."""
    bd = max(16, _next_pow2(d)) if d <= 256 else 64
    if dtype == torch.float32:
        if cc_major >= 9:
            return 128, 32, bd, 8, 3, 32
        return 64, 32, bd, 4, 3, 32
    if bd <= 128:  # BM 64 with 4 warps: two programs per SM, one's epilogue overlaps the other's MMA
        return 64, 128, bd, 4, 3, 64
    return 64, 64, bd, 4, 2, 64


def _config(device: torch.device, dtype: torch.dtype, d: int, m: int) -> _Config:
    prec = "tf32x3" if dtype == torch.float32 else "tf32"
    if device.type != "cuda":  # the interpreter
        bd = max(16, _next_pow2(d)) if d <= 256 else 64
        return _Config(CPU_BLOCKS["BM"], CPU_BLOCKS["BN"], bd, 4, 1, prec, 0, CPU_BLOCKS["BN"])
    props = torch.cuda.get_device_properties(device)
    bm, bn, bd, warps, stages, bn_dense = gpu_tiles(props.major, dtype, d)
    if os.environ.get("CK_TOPK_TILES"):  # experiments: "BM,BN,num_warps,num_stages"
        bm, bn, warps, stages = (int(v) for v in os.environ["CK_TOPK_TILES"].split(","))
    return _Config(bm, bn, bd, warps, stages, prec, 4 * props.multi_processor_count, bn_dense)


def dense_max(k: int) -> int:
    """Views up to this many rows are searched in DENSE mode (every key written)."""
    return max(DENSE_MIN, 16 * k)


def _splits(cfg: _Config, n_mblocks: int, n_tiles: int) -> Tuple[int, int]:
    """(splits, tiles per split): enough programs to fill the GPU (a few on the interpreter,
    so that merging across splits is exercised)."""
    if cfg.target_programs == 0:
        want = CPU_BLOCKS["splits"]
    else:
        want = max(1, -(-cfg.target_programs // n_mblocks))
    want = max(1, min(want, n_tiles))
    per = -(-n_tiles // want)
    return -(-n_tiles // per), per


def _capacity(expected: float, splits: int) -> int:
    """Slots per (row, split) for ``expected`` survivors per row spread over the splits."""
    mu = expected / splits
    return int(math.ceil((1.5 * mu + 6.0 * math.sqrt(mu) + 16) / 8.0) * 8)


def _extract_steps(expected: float, n_view: int, bn: int) -> int:
    """X: straight-line extractions per tile, from the expected survivors per (row, tile)."""
    lam = expected * bn / max(1, n_view)
    if lam <= 0.05:
        return 1
    if lam <= 0.3:
        return 2
    if lam <= 1.0:
        return 4
    return 8


# --------------------------------------------------------------------------------------------
# bank views and query blocks
# --------------------------------------------------------------------------------------------


class _View(NamedTuple):
    """Bank rows on the query's device: view row c is memory row c * step of ``data``, global
    bank index ``base + c * step``."""

    data: torch.Tensor              # (n_mem, D), unit stride along D
    aux: torch.Tensor               # fp32 (n_mem,): 1/|b| (cosine), |b|^2 (l2), unused (dot)
    labels: Optional[torch.Tensor]  # int64 (n_mem,)
    base: int
    step: int

    @property
    def n_view(self) -> int:
        return -(-self.data.shape[0] // self.step)

    def sample(self, factor: int = SAMPLE_STEP) -> "_View":
        return self._replace(step=self.step * factor)


class _Queries(NamedTuple):
    q: torch.Tensor                 # (m, D) fp16/bf16/fp32, unit stride along D
    aux: torch.Tensor               # fp32 (m,): 1/|q| (cosine), |q|^2 (l2), unused (dot)
    ex: Optional[torch.Tensor]      # int64 (m, EP), -1 padded
    labels: Optional[torch.Tensor]  # int64 (m,)
    n_ex: int                       # E (0: no exclusions)

    def rows(self, i0, i1) -> "_Queries":
        return _Queries(self.q[i0:i1], self.aux[i0:i1],
                        None if self.ex is None else self.ex[i0:i1],
                        None if self.labels is None else self.labels[i0:i1], self.n_ex)


def _compute_dtype(dtype):
    return torch.float32 if dtype == torch.float64 else dot_dtype(dtype)  # fp64 is scored in fp32


def _rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    x = x.to(_compute_dtype(x.dtype))
    return x if x.stride(-1) == 1 else x.contiguous()


def row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of squares of each row of x (n, D) (unit stride along D)."""
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    br = 64 if x.device.type == "cuda" else 16
    bd = min(128, max(16, _next_pow2(d)))
    _sq_norm_kernel[(cdiv(n, br),)](x, out, n, x.stride(0), D=d, BR=br, BD=bd)
    return out


def _aux(sq: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "cosine":
        return 1.0 / sq.sqrt().clamp(min=1e-12)
    return sq  # l2 uses |x|^2; dot ignores it


def _prepare_queries(query, similarity, exclude_index, query_labels):
    q = _rows_unit_stride(query)
    sq = row_sq_norms(q)
    bad = ~torch.isfinite(4.0 * sq)
    ex, n_ex = None, 0
    if exclude_index is not None:
        ex2 = exclude_index.to(device=q.device, dtype=torch.int64)
        ex2 = ex2[:, None] if ex2.dim() == 1 else ex2
        n_ex = ex2.shape[1]
        if n_ex > 0:
            ep = _next_pow2(n_ex)
            ex = torch.full((q.shape[0], ep), -1, dtype=torch.int64, device=q.device)
            ex[:, :n_ex] = ex2
    labels = None if query_labels is None else query_labels.to(device=q.device, dtype=torch.int64).contiguous()
    return _Queries(q, _aux(sq, similarity).contiguous(), ex, labels, n_ex), bad


def _prepare_view(data, similarity, labels, base):
    data = _rows_unit_stride(data)
    sq = row_sq_norms(data)
    bad = ~torch.isfinite(4.0 * sq).all()
    lab = None if labels is None else labels.to(device=data.device, dtype=torch.int64).contiguous()
    return _View(data, _aux(sq, similarity).contiguous(), lab, base, 1), bad


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------


def _launch(mode, qs: _Queries, view: _View, similarity, cfg: _Config, *, out, cnt=None, redo=None,
            thr=None, cap=0, splits=1, per_split=1, x_steps=1):
    m = qs.q.shape[0]
    d = qs.q.shape[1]
    dummy_i64 = out if out.dtype == torch.int64 else torch.empty(1, dtype=torch.int64, device=out.device)
    thr_v, thr_i = thr if thr is not None else (qs.aux, dummy_i64)
    ep = qs.ex.shape[1] if qs.ex is not None else 1
    grid = (cdiv(m, cfg.BM), splits)
    _topk_tile_kernel[grid](
        qs.q, qs.aux, qs.ex if qs.ex is not None else dummy_i64,
        qs.labels if qs.labels is not None else dummy_i64, thr_v, thr_i,
        view.data, view.aux, view.labels if view.labels is not None else dummy_i64,
        out, cnt if cnt is not None else dummy_i64, redo if redo is not None else dummy_i64,
        m, view.n_view, qs.q.stride(0), view.data.stride(0) * view.step, view.step, view.base,
        out.stride(0), cap, per_split, splits,
        D=d, BD=cfg.BD, BM=cfg.BM, BN=cfg.BN, SIM=SIM_CODES[similarity], E=qs.n_ex, EP=ep,
        LABELS=qs.labels is not None, MODE=mode, X=x_steps, SUM=SURVIVOR_SUM, PREC=cfg.precision,
        ALWAYS_MASK=INTERPRETER, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _topk_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys of each row, largest first, padded with INT64_MIN."""
    m, width = keys.shape
    if width >= k:
        return torch.topk(keys, k, dim=1, sorted=True).values
    top = torch.sort(keys, dim=1, descending=True).values
    pad = torch.full((m, k - width), INT64_MIN, dtype=torch.int64, device=keys.device)
    return torch.cat([top, pad], 1)


def _filter(qs: _Queries, view: _View, k, similarity, cfg, thr_keys, expected):
    """FILTER pass of ``view`` against threshold keys: (top-k keys, per-row overflow)."""
    m, dev = qs.q.shape[0], qs.q.device
    n_tiles = cdiv(view.n_view, cfg.BN)
    splits, per = _splits(cfg, cdiv(m, cfg.BM), n_tiles)
    cap = _capacity(expected, splits)
    buf = torch.full((m, splits * cap), INT64_MIN, dtype=torch.int64, device=dev)
    cnt = torch.empty((m, splits), dtype=torch.int32, device=dev)
    redo = torch.empty(cdiv(m, cfg.BM) * splits * per, dtype=torch.int32, device=dev)
    thr = _threshold(thr_keys)
    x_steps = _extract_steps(expected, view.n_view, cfg.BN)
    _launch(MODE_FILTER, qs, view, similarity, cfg, out=buf, cnt=cnt, redo=redo, thr=thr, cap=cap,
            splits=splits, per_split=per, x_steps=x_steps)
    if STATS is not None:  # diagnostics (synchronizes): survivors per row of each FILTER pass
        total = cnt.sum(1).float()
        STATS.append({"n_view": view.n_view, "step": view.step, "k": k, "splits": splits, "cap": cap,
                      "X": x_steps, "survivors_mean": total.mean().item(),
                      "survivors_max": total.max().item(), "overflow_rows": int((cnt > cap).any(1).sum())})
    return _topk_keys(buf, k), (cnt > cap).any(1)


def _dense(qs: _Queries, view: _View, k, similarity, cfg):
    cfg = cfg._replace(BN=cfg.BN_DENSE)
    m, n = qs.q.shape[0], view.n_view
    keys = torch.empty((m, n), dtype=torch.int64, device=qs.q.device)
    n_tiles = cdiv(n, cfg.BN)
    splits, per = _splits(cfg, cdiv(m, cfg.BM), n_tiles)
    _launch(MODE_DENSE, qs, view, similarity, cfg, out=keys, splits=splits, per_split=per)
    return _topk_keys(keys, k)


def _tilemax_threshold(qs: _Queries, view: _View, k, similarity, cfg):
    """Threshold keys from the tile maxima of ``view``. With E exclusions per row, v_i is the
    (k+E)-th largest of row i's per-tile maximum scores: those tiles hold k+E distinct bank rows
    scoring at least v_i, at most E of them excluded, so k allowed rows score at least v_i and
    the threshold is the smallest key of score v_i (every score >= v_i passes). -inf (everything
    passes) when the view has fewer than k+E tiles."""
    m = qs.q.shape[0]
    n_tiles = cdiv(view.n_view, cfg.BN)
    maxima = torch.empty((m, n_tiles), dtype=torch.float32, device=qs.q.device)
    splits, per = _splits(cfg, cdiv(m, cfg.BM), n_tiles)
    _launch(MODE_TILEMAX, qs, view, similarity, cfg, out=maxima, splits=splits, per_split=per)
    rank = k + qs.n_ex
    if rank <= n_tiles:
        v = torch.topk(maxima, rank, dim=1, sorted=False).values.amin(1)
    else:
        v = torch.full((m,), -math.inf, device=maxima.device)
    return encode_keys(v, torch.full((m,), _LOW, dtype=torch.int64, device=v.device))


def sample_factor(k: int, n_view: int, bn: int) -> int:
    """Sample step of the tile-maximum threshold pass: a sparser sample costs less but lets
    more rows pass the threshold (about factor * k per query row); the sample must keep at
    least 4k tiles so that the k-th largest tile maximum stays close to the k-th largest score
    of the sample. 0: no such sample (the exact cascade is used).

    The default minimizes a per-tile instruction model (sm_90 SASS of the fp16 kernel,
    scripts/triton_aot_topk.py --sass): a FILTER tile costs 306 instructions per thread, plus 295
    (X=1) when one of its BM=64 rows has a survivor, which happens with probability
    p = 1 - exp(-64 f k / tiles); a TILEMAX tile costs 296 (GEMM_ONLY: 287); a tile with a row
    of two or more survivors is recomputed by the redo pass (about 1,230). Per bank tile:
    306 + 295 p + 296 / f + redo. At N = 2^20 (8192 tiles), k=16: f=8 539, f=4 499, f=2 520;
    k=32: f=4 576, f=2 573; k=128: f=2 746. With the survivor path's earlier cost (433: a count
    and a column search) the model reproduced the H100 ratios measured before the TILEMAX pass
    lost its column search (2.3x and 3.4x GEMM_ONLY at k=16 and k=128); ``CK_TOPK_SAMPLE``
    overrides it for measurements."""
    want = int(os.environ.get("CK_TOPK_SAMPLE", "0")) or (8 if k <= 4 else 4 if k <= 16 else 2)
    f = want
    while f > 1 and n_view // (f * bn) < 4 * k:
        f //= 2
    return f if n_view // (f * bn) >= 4 * k else 0


def _select(qs: _Queries, view: _View, k: int, similarity: str, cfg: _Config):
    """Top-k keys of ``view`` and the rows whose result may be inexact (a filter pass
    overflowed). Small views: DENSE. Otherwise a FILTER pass whose thresholds come from the
    tile maxima of a strided sample (one GEMM-only-like pass over 1/f of the view), or, when
    the view has too few tiles for that, from the exact top-k of the 1/8 sample (recursively)."""
    if view.n_view <= dense_max(k):
        return _dense(qs, view, k, similarity, cfg), torch.zeros(qs.q.shape[0], dtype=torch.bool,
                                                                   device=qs.q.device)
    f = sample_factor(k, view.n_view, cfg.BN)
    if f:
        thr = _tilemax_threshold(qs, view.sample(f), k, similarity, cfg)
        return _filter(qs, view, k, similarity, cfg, thr, 1.25 * f * k + 32)
    sub, _ = _select(qs, view.sample(), k, similarity, cfg)
    return _filter(qs, view, k, similarity, cfg, sub[:, k - 1].contiguous(), SAMPLE_STEP * k)


def _query_block_rows(m: int, k: int, cfg: _Config) -> int:
    per_row = 8 * max(dense_max(k), 24 * k + 64 * max(1, CPU_BLOCKS["splits"]))
    rows = max(cfg.BM, (BUFFER_BYTES // per_row) // cfg.BM * cfg.BM)
    return min(m, rows)


# --------------------------------------------------------------------------------------------
# host-resident banks
# --------------------------------------------------------------------------------------------


def _running_merge(qs_blocks, chunks, k, similarity, cfg, bank_bad):
    """Top-k keys over a bank given as chunks, with thresholds carried across chunks."""
    running = [None] * len(qs_blocks)
    overflow = [torch.zeros(qb.q.shape[0], dtype=torch.bool, device=qb.q.device) for qb in qs_blocks]
    seen = 0
    for j0, data, labels in chunks:
        view, bad = _prepare_view(data, similarity, labels, j0)
        bank_bad = bank_bad | bad
        for b, qb in enumerate(qs_blocks):
            if running[b] is None:
                top, over = _select(qb, view, k, similarity, cfg)
            elif view.n_view <= dense_max(k):
                top, over = _dense(qb, view, k, similarity, cfg), None
            else:
                expected = k * view.n_view / max(1, seen) + k
                top, over = _filter(qb, view, k, similarity, cfg, running[b][:, k - 1].contiguous(),
                                    expected)
            if over is not None:
                overflow[b] |= over
            running[b] = top if running[b] is None else _topk_keys(torch.cat([running[b], top], 1), k)
        chunks.consumed()
        seen += view.n_view
    return running, overflow, bank_bad


# --------------------------------------------------------------------------------------------
# the family op
# --------------------------------------------------------------------------------------------


def topk(query, bank, k, *, similarity="dot", exclude_index=None, query_labels=None,
         bank_labels=None, _chunk_rows=None):
    """Exact top-k (see the module docstring): (fp32 values (M, k), int64 indices (M, k)).
    ``_chunk_rows`` (tests) streams a bank that is already on the query's device in chunks."""
    if k > MAX_K:
        return chunked.topk(query, bank, k, similarity=similarity, exclude_index=exclude_index,
                            query_labels=query_labels, bank_labels=bank_labels)
    m, dev = query.shape[0], query.device
    host = bank.device != dev
    qs, q_bad = _prepare_queries(query, similarity, exclude_index, query_labels)
    cfg = _config(dev, qs.q.dtype, qs.q.shape[1], m)
    step = _query_block_rows(m, k, cfg)
    blocks = [(i0, min(m, i0 + step)) for i0 in range(0, m, step)]
    qs_blocks = [qs.rows(i0, i1) for i0, i1 in blocks]
    bank_bad = torch.zeros((), dtype=torch.bool, device=dev)
    if host or _chunk_rows is not None:
        if host:
            rows = _chunk_rows or max(cfg.BN, _bank_chunks.host_chunk_rows(bank))
            chunks = _bank_chunks.HostChunks(bank, bank_labels, rows, dev)
        else:
            chunks = _bank_chunks.DeviceChunks(bank, bank_labels, _chunk_rows)
        running, overflow, bank_bad = _running_merge(qs_blocks, chunks, k, similarity, cfg, bank_bad)
        keys = torch.cat(running, 0)
        over = torch.cat(overflow, 0)
    else:
        view, bank_bad = _prepare_view(bank, similarity, bank_labels, 0)
        results = [_select(qb, view, k, similarity, cfg) for qb in qs_blocks]
        keys = torch.cat([r[0] for r in results], 0)
        over = torch.cat([r[1] for r in results], 0)
    bad = over | q_bad | bank_bad | (keys[:, k - 1] == INT64_MIN)
    values, indices = decode_keys(keys)
    redo = torch.nonzero(bad).flatten()  # the one synchronization
    if redo.numel():
        excl = None if exclude_index is None else exclude_index.to(dev)[redo]
        labs = None if query_labels is None else query_labels.to(dev)[redo]
        v2, i2 = chunked.topk(query[redo], bank, k, similarity=similarity, exclude_index=excl,
                              query_labels=labs, bank_labels=bank_labels)
        values[redo] = v2.float()
        indices[redo] = i2
    return values, indices


def gemm_only(query, bank, similarity="dot"):
    """The floor for benchmarks: the same tiles' GEMM with a running row maximum (returns the
    per-row maximum score of the transformed tile, t of the module docstring)."""
    qs, _ = _prepare_queries(query, similarity, None, None)
    view, _ = _prepare_view(bank, similarity, None, 0)
    cfg = _config(query.device, qs.q.dtype, qs.q.shape[1], query.shape[0])
    n_tiles = cdiv(view.n_view, cfg.BN)
    splits, per = _splits(cfg, cdiv(query.shape[0], cfg.BM), n_tiles)
    out = torch.empty((query.shape[0], splits), dtype=torch.float32, device=query.device)
    _launch(MODE_GEMM_ONLY, qs, view, similarity, cfg, out=out, splits=splits, per_split=per)
    return out.amax(1)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (scripts/triton_aot_topk.py compiles them for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _aot_spec(dtype, mode, sim, e, labels, x, d=128, cc=9):
    bm, bn, bd, warps, stages, bn_dense = gpu_tiles(cc, dtype, d)
    sig = {"q_ptr": _PTR[dtype], "qaux_ptr": "*fp32", "ex_ptr": "*i64", "ql_ptr": "*i64",
           "thr_v_ptr": "*fp32", "thr_i_ptr": "*i64", "b_ptr": _PTR[dtype], "baux_ptr": "*fp32",
           "bl_ptr": "*i64", "out_ptr": "*fp32" if mode in (MODE_GEMM_ONLY, MODE_TILEMAX) else "*i64",
           "cnt_ptr": "*i32" if mode == MODE_FILTER else "*i64",
           "redo_ptr": "*i32" if mode == MODE_FILTER else "*i64",
           "M": "i32", "n_view": "i32", "stride_qm": "i32", "stride_bv": "i64", "step": "i32",
           "gbase": "i64", "stride_out": "i32", "cap": "i32", "tiles_per_split": "i32",
           "n_splits": "i32"}
    const = {"D": d, "BD": bd, "BM": bm, "BN": bn_dense if mode == MODE_DENSE else bn, "SIM": sim,
             "E": e, "EP": _next_pow2(e) if e else 1, "LABELS": labels, "MODE": mode, "X": x,
             "SUM": SURVIVOR_SUM, "PREC": "tf32x3" if dtype == torch.float32 else "tf32", "ALWAYS_MASK": False}
    sig.update({name: "constexpr" for name in const})
    aligned = ["q_ptr", "qaux_ptr", "ex_ptr", "ql_ptr", "thr_v_ptr", "thr_i_ptr", "b_ptr",
               "baux_ptr", "bl_ptr", "out_ptr", "cnt_ptr", "redo_ptr", "stride_qm", "stride_bv"]
    return {"kernel": _topk_tile_kernel, "signature": sig, "constexprs": const,
            "divisible_by_16": aligned, "num_warps": warps, "num_stages": stages, "arch_major": cc,
            "name": f"topk_{['filter', 'dense', 'gemm', 'tilemax'][mode]}_{str(dtype)[6:]}_{['dot', 'cos', 'l2'][sim]}"
                    f"_E{e}{'_lab' if labels else ''}_X{x}_D{d}_cc{cc}"}


AOT_SPECS = [
    spec
    for cc in (8, 9)
    for spec in (
        [_aot_spec(dt, MODE_FILTER, sim, 0, False, x, cc=cc)
         for dt in (torch.float16, torch.bfloat16, torch.float32) for sim in (0, 1, 2) for x in (1, 4)]
        + [_aot_spec(torch.bfloat16, MODE_FILTER, 1, 2, True, 2, cc=cc),
           _aot_spec(torch.float16, MODE_FILTER, 0, 1, False, 2, d=768, cc=cc)]
        + [_aot_spec(dt, MODE_DENSE, 2, 1, True, 1, cc=cc) for dt in (torch.float16, torch.float32)]
        + [_aot_spec(dt, MODE_GEMM_ONLY, 0, 0, False, 1, cc=cc) for dt in (torch.float16, torch.float32)]
        + [_aot_spec(dt, MODE_TILEMAX, 1, 1, True, 1, cc=cc) for dt in (torch.float16, torch.float32)]
        + [_aot_spec(torch.float16, MODE_TILEMAX, 0, 0, False, 1, cc=cc)])
] + [{"kernel": _sq_norm_kernel, "signature": {"x_ptr": "*bf16", "out_ptr": "*fp32", "n": "i32",
                                              "stride": "i32", "D": "constexpr", "BR": "constexpr",
                                              "BD": "constexpr"},
      "constexprs": {"D": 128, "BR": 64, "BD": 128}, "divisible_by_16": ["x_ptr", "out_ptr", "stride"],
      "num_warps": 4, "num_stages": 1, "name": "sq_norm_bf16"}]
