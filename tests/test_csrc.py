"""The compiled extension (csrc/) on the CPU: build information, the torch.library contract
(opcheck, fake kernels for torch.compile, coexistence with Python-registered `triton_*` ops in the
same namespace), every instruction-set variant of the kernels against reference.py, reduced
precisions, threading, bad direct calls, and the messages when the extension is unavailable.

The whole suite also runs with backend="cpu" through conftest.FUSED_BACKENDS."""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import _ext, functional, reference
from contrastive_kernels._common import draw_mixing, pack_multi_hot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = functional.backend_unavailable_reason("cpu", torch.device("cpu")) is None
needs_ext = pytest.mark.skipif(not AVAILABLE, reason="the C++ extension is not built")


def test_extension_builds_where_required():
    """`make test` sets CK_REQUIRE_EXT=1 where a compiler exists: a broken build must fail CI rather
    than silently drop backend="cpu" from the suite."""
    if os.environ.get("CK_REQUIRE_EXT") == "1":
        assert AVAILABLE, functional.backend_unavailable_reason("cpu", torch.device("cpu"))
    if not AVAILABLE:
        reason = functional.backend_unavailable_reason("cpu", torch.device("cpu"))
        assert "chunked" in reason  # says what runs instead


def test_cuda_library_headers_come_from_the_wheels_only_when_the_toolkit_lacks_them(tmp_path, monkeypatch):
    """A compiler-only CUDA toolkit lacks cusparse.h (which ATen's CUDA headers include): the build
    then takes the NVIDIA wheels' include folders; a full toolkit's own headers are never shadowed."""
    import sysconfig

    from torch.utils import cpp_extension

    from contrastive_kernels import _build

    site = tmp_path / "site"
    wheel_inc = site / "nvidia" / "cu13" / "include"
    (site / "nvidia" / "cudnn" / "include").mkdir(parents=True)  # no cusparse.h: not taken
    wheel_inc.mkdir(parents=True)
    (wheel_inc / "cusparse.h").write_text("")
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(site)})
    assert _build.cuda_library_include_dirs() == [str(wheel_inc)]
    (home / "include" / "cusparse.h").write_text("")
    assert _build.cuda_library_include_dirs() == []


@needs_ext
def test_build_info():
    info = _ext.build_info()
    assert info["available"] and info["compiler"] and info["cpu_isa"] in ("avx512", "avx2", "generic")
    assert info["cpu_isa"] in info["cpu_isas_supported"].split(",")
    assert "cuda" in info and "openmp" in info and "-O3" in info["cxx_flags"]


def _isas():
    if not AVAILABLE:
        return ["generic"]
    return _ext.build_info()["cpu_isas_supported"].split(",")


@pytest.fixture
def isa(request):
    assert _ext.set_cpu_isa(request.param)
    yield request.param
    _ext.set_cpu_isa("auto")


@needs_ext
@pytest.mark.parametrize("isa", _isas(), indirect=True)
def test_cpu_fma_peak(isa):
    peak = _ext.cpu_fma_peak(0.02)
    assert peak["isa"] == isa and peak["threads"] == torch.get_num_threads()
    # each of the probe's 12 chains tends to 1: 12 says the loop ran to convergence on every thread
    assert peak["check"] == pytest.approx(12, abs=0.01) and peak["check_one_thread"] == pytest.approx(12, abs=0.01)
    # a rate, not a constant: positive and below what any core does (1 TFLOP/s fp32 per thread)
    assert 0.05 < peak["gflops_one_thread"] < 1e3 and 0.05 < peak["gflops"] < 1e3 * peak["threads"]
    with pytest.raises(RuntimeError, match="seconds must be in"):
        _ext.cpu_fma_peak(0)


@needs_ext
@pytest.mark.parametrize("isa", _isas(), indirect=True)
@pytest.mark.parametrize("b,n_hard,s,sq,d,gammas", [(7, 9, 13, 7, 45, [1.0]), (3, 40, 40, 0, 128, [1.3, 0.2, 1.0, 2.5]),
                                                   (4, 5, 0, 3, 16, [1.0]), (2, 3, 0, 0, 8, [1.0])])
def test_mixed_lse_fp32_kernel_of_every_isa(isa, b, n_hard, s, sq, d, gammas):
    """fp32 mixed_lse runs the kernel of the chosen instruction set (mixing_kernel.h): its three
    outputs (lse, and E and U, which its backward uses) equal the materialized formula in fp64 (the
    points of reference.mix_points, their logits' softmax) over blocks of 16 points with tails,
    feature dims with vector tails, one kind of point or none (lse = -inf), up to four gammas; a
    NaN in a query row makes that row NaN and no other."""
    g = torch.Generator().manual_seed(b + s + sq)
    q, mq = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    neg = torch.randn(60, d, generator=g)
    hard = torch.randint(0, 60, (b, n_hard), generator=g)
    draws = draw_mixing(b, n_hard, s, sq, torch.Generator().manual_seed(1), torch.device("cpu"))
    a, c = torch.rand(b, generator=g) * 4 + 1.0, torch.randn(b, generator=g)
    q[-1, d // 2] = float("nan")
    args = (hard, draws.pair_index, draws.alpha, draws.query_index, draws.query_weight)
    lse, e_sum, u_sum = torch.ops.contrastive_kernels.mixed_lse(q, mq, neg, *args, a, c, gammas)
    # -inf logits weigh 0 (as on Triton): a row of them has lse = -inf and E = U = 0, not NaN
    c_inf = c.clone()
    c_inf[0] = -float("inf")
    lse_inf, e_inf, u_inf = torch.ops.contrastive_kernels.mixed_lse(q, mq, neg, *args, a, c_inf, gammas)
    assert torch.all(lse_inf[:, 0] == -float("inf")) and not e_inf[:, 0].any() and not u_inf[:, 0].any()
    assert torch.equal(lse_inf[:, 1:].nan_to_num(), lse[:, 1:].nan_to_num())
    h = reference.mix_points(mq.double(), neg.double(), hard, draws)  # (b, s+sq, d)
    u = torch.einsum("bd,btd->bt", q.double(), h)
    for gi, gamma in enumerate(gammas):
        z = gamma * (a.double()[:, None] * u + c.double()[:, None])
        want_lse = torch.logsumexp(z, 1)
        p = torch.softmax(z, 1) if s + sq else z
        want_e, want_u = torch.einsum("bt,btd->bd", p, h), (p * u).sum(1)
        for got, want in ((lse[gi], want_lse), (e_sum[gi], want_e), (u_sum[gi], want_u)):
            assert got.dtype == torch.float32
            if s + sq:
                assert got[-1].isnan().all()  # the NaN row
            assert torch.allclose(got[:-1].double(), want[:-1], rtol=1e-5, atol=1e-5), (isa, gi, got, want)
    if s + sq == 0:
        assert torch.all(lse == float("-inf"))


def _cpu():
    return functional.resolve_backend("cpu", "loss", torch.device("cpu"))


def _lse(fn, inputs, mask, **kw):
    leaves = [t.detach().clone().requires_grad_(m) if t is not None else None for t, m in zip(inputs, mask)]
    row, ps, pc, col = fn(*leaves, **kw)
    g = torch.Generator().manual_seed(3)
    total = sum((x * torch.rand(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
                for x in (row, ps, col) if x.numel())
    needs = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(total, needs) if needs else []
    return [x.detach().double() for x in (row, ps, pc, col, *grads)]


def _inputs(b, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, dtype=torch.float64, generator=g), torch.randn(n, d, dtype=torch.float64, generator=g),
            torch.rand(b, dtype=torch.float64, generator=g) + 0.5, torch.rand(n, dtype=torch.float64, generator=g) + 0.5,
            torch.randn(b, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)]


@needs_ext
@pytest.mark.parametrize("isa", _isas(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["row_only", "full", "labels_col"])
def test_every_isa_matches_spec(isa, dtype, mode):
    """Several column blocks, row groups and tails (b, n, d not multiples of any tile)."""
    b, n, d = 45, 700, 37
    inputs = _inputs(b, n, d)
    kw = dict(gammas=(1.0,))
    mask = [True, False, True, False, True, False]
    if mode != "row_only":
        mask = [True] * 6
        kw = dict(gammas=(1.3, 0.2), exclude=torch.stack([torch.arange(b) % n, (torch.arange(b) * 5) % n], 1))
    if mode == "labels_col":
        kw.update(q_labels=torch.arange(b) % 4, k_labels=torch.arange(n) % 5, want_col_lse=True)
    want = _lse(reference.lse_stats, inputs, mask, **kw)
    low = [t.to(dtype) for t in inputs]
    got = _lse(_cpu().lse_stats, low, mask, **kw)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and torch.allclose(g, w, **tol), (isa, i, (g - w).abs().max())


@needs_ext
@pytest.mark.parametrize("isa", _isas(), indirect=True)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_every_isa_topk(isa, similarity):
    q, bank = torch.randn(37, 19), torch.randn(3001, 19)
    ex = torch.randint(-1, 3001, (37, 2))
    ql, bl = torch.randint(0, 5, (37,)), torch.randint(0, 5, (3001,))
    got = _cpu().topk(q, bank, 40, similarity=similarity, exclude_index=ex, query_labels=ql, bank_labels=bl)
    scores = reference.similarity_matrix(q, bank, similarity)
    scores[torch.arange(37)[:, None].expand(37, 2)[ex >= 0], ex[ex >= 0]] = -float("inf")
    scores = scores.masked_fill(ql[:, None] == bl[None, :], -float("inf"))
    want = torch.sort(scores + 0.0, dim=1, descending=True, stable=True)
    assert torch.allclose(got[0], want.values[:, :40], rtol=1e-5, atol=1e-5)
    assert (got[1] == want.indices[:, :40]).float().mean() > 0.99


@needs_ext
def test_topk_in_chunks_equals_one_pass():
    """The merge of per-chunk top-k results that the host-bank path runs (exclusions shifted to each
    chunk: other chunks' rows become negative or past-the-end indices, which exclude nothing),
    over the CPU kernels: bitwise equal to one pass (integer features: exact scores)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-3, 4, (21, 12), generator=g).float()
    bank = torch.randint(-3, 4, (2501, 12), generator=g).float()
    ex = torch.randint(-1, 2501, (21, 2), generator=g)
    ql, bl = torch.randint(0, 4, (21,), generator=g), torch.randint(0, 4, (2501,), generator=g)
    once = _cpu().topk(q, bank, 64, similarity="cosine", exclude_index=ex, query_labels=ql, bank_labels=bl)
    for rows in (1000, 64, 17):
        got = _cpu().topk(q, bank, 64, similarity="cosine", exclude_index=ex, query_labels=ql, bank_labels=bl,
                          _chunk_rows=rows)
        assert torch.equal(got[0], once[0]) and torch.equal(got[1], once[1]), rows


@needs_ext
def test_topk_query_blocks_bound_the_candidate_buffers(monkeypatch):
    """Query rows beyond CPU_TOPK_BUFFER_BYTES / (16 k) run in blocks (exclusions and labels sliced
    with them): the same result as one call."""
    from contrastive_kernels import _csrc_backend

    g = torch.Generator().manual_seed(6)
    q, bank = torch.randn(700, 16, generator=g), torch.randn(900, 16, generator=g)
    ex = torch.randint(-1, 900, (700, 2), generator=g)
    ql, bl = torch.randint(0, 3, (700,), generator=g), torch.randint(0, 3, (900,), generator=g)
    once = _cpu().topk(q, bank, 20, similarity="l2", exclude_index=ex, query_labels=ql, bank_labels=bl)
    calls = []
    real = torch.ops.contrastive_kernels.topk

    class CountingOps:
        @staticmethod
        def topk(*args):
            calls.append(args[0].shape[0])
            return real(*args)

    monkeypatch.setattr(_csrc_backend, "CPU_TOPK_BUFFER_BYTES", 16 * 20 * 256)  # 256-row blocks
    monkeypatch.setattr(_csrc_backend, "_ops", lambda: CountingOps)
    got = _cpu().topk(q, bank, 20, similarity="l2", exclude_index=ex, query_labels=ql, bank_labels=bl)
    assert calls == [256, 256, 188]
    assert torch.equal(got[0], once[0]) and torch.equal(got[1], once[1])


@needs_ext
@pytest.mark.parametrize("isa", _isas(), indirect=True)
@pytest.mark.parametrize("k", [1, 7, 300, 2000])
@pytest.mark.parametrize("m", [9, 70])  # few rows: column parts; more: row parts (2 threads)
def test_topk_selection_worst_cases(isa, k, m):
    """The per-row bounded selection at its worst: a bank whose scores rise with the column (every
    column passes the threshold and replaces the heap's minimum), long runs of tied scores (ties
    go to the lower column, across the threads' parts too), exclusions, and k close to N."""
    n, d = 2400, 8
    # small integers: every score is exact in fp32 whatever the summation order, and ties abound
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-2, 3, (m, d), generator=g).float()
    bank = torch.randint(-2, 3, (n, d), generator=g).float()
    q[: m // 2, 0] = 8.0
    bank[:, 0] = torch.arange(n) // 3  # rising with the column, in runs of three
    bank[n // 2:n // 2 + 600] = bank[n // 2]  # 600 identical rows
    ex = torch.randint(-1, n, (m, 3), generator=g)
    got = _cpu().topk(q, bank, k, similarity="dot", exclude_index=ex)
    scores = q @ bank.T
    scores[torch.arange(m)[:, None].expand(m, 3)[ex >= 0], ex[ex >= 0]] = -float("inf")
    want = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(got[0], want.values[:, :k])
    assert torch.equal(got[1], want.indices[:, :k])


@needs_ext
@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("k", [64, 250, 600])
def test_topk_radix_sort_of_the_merged_keys(k, threads):
    """The merge sorts each row's keys by a radix sort (64 keys or more; glue.h): its order is the
    reference's over scores of every sign and size, NaN (first, whatever its sign), +-inf, -0.0
    and long ties (lower index first), the lists of 2 or 4 threads (column parts) merged: k = 64
    and 250 find more than 2k keys (a selection first), k = 600 all 900 sorted."""
    g = torch.Generator().manual_seed(k)
    n = 900
    col = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)]
    col[::7] = 0.5  # ties
    col[3::50] = math.inf
    col[5::60] = -math.inf
    col[11::40] = math.nan
    col[13::40] = -math.nan
    col[17::30] = -0.0
    bank = torch.stack([col, torch.zeros(n)], 1)
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = _cpu().topk(q, bank, k, similarity="dot", exclude_index=None, query_labels=None, bank_labels=None)
    finally:
        torch.set_num_threads(old)
    want = reference.topk_similarity(q, bank, k)
    assert torch.equal(got[1], want.indices)
    assert torch.equal(got[0].isnan(), want.values.isnan())
    ok = ~want.values.isnan()
    assert torch.equal(got[0][ok], want.values[ok])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_upcast_per_tile(dtype):
    inputs = _inputs(30, 500, 24, seed=1)
    low = [t.to(dtype) if i < 2 else t.float() for i, t in enumerate(inputs)]
    mask = [True, True, True, True, True, True]
    kw = dict(gammas=(1.0,), want_col_lse=True)
    got = _lse(_cpu().lse_stats, low, mask, **kw)
    # the same computation on the upcast inputs (fp32) is what the kernels do
    want = _lse(reference.lse_stats, [t.float() for t in low], mask, **kw)
    eps = torch.finfo(dtype).eps
    for i, (g, w) in enumerate(zip(got, want)):
        tol = 1e-4 if i < 4 or i in (6, 8, 9) else 2 * eps  # gradients of q and k come back rounded to dtype
        assert torch.allclose(g, w, rtol=tol, atol=tol), (i, (g - w).abs().max())
    v, i = _cpu().topk(low[0], low[1], 7, similarity="cosine", exclude_index=None, query_labels=None, bank_labels=None)
    rv, ri = reference.topk_similarity(low[0], low[1], 7, similarity="cosine")
    assert torch.allclose(v.to(dtype).float(), rv.float(), rtol=1e-5, atol=1e-5) and (i == ri).float().mean() > 0.98


@needs_ext
def test_thread_counts_agree():
    inputs = _inputs(64, 3000, 32, seed=2)
    mask = [True] * 6
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _lse(_cpu().lse_stats, inputs, mask, gammas=(1.0,), want_col_lse=True)
        t1 = _cpu().topk(inputs[0], inputs[1], 50, similarity="dot", exclude_index=None, query_labels=None,
                         bank_labels=None)
        torch.set_num_threads(2)
        two = _lse(_cpu().lse_stats, inputs, mask, gammas=(1.0,), want_col_lse=True)
        t2 = _cpu().topk(inputs[0], inputs[1], 50, similarity="dot", exclude_index=None, query_labels=None,
                         bank_labels=None)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(t1[1], t2[1])


@needs_ext
def test_opcheck_cpu_ops():
    ops = torch.ops.contrastive_kernels
    q = torch.randn(20, 16, requires_grad=True)
    k = torch.randn(70, 16)
    a = torch.rand(20) + 0.5
    b, c, d = torch.rand(70) + 0.5, torch.randn(20), torch.randn(70)
    ex = torch.randint(-1, 70, (20, 2))
    ql, kl = torch.arange(20) % 3, torch.arange(70) % 4
    torch.library.opcheck(ops.lse_fwd, (q, k, a, None, None, None, [1.0], None, None, None, False, True))
    torch.library.opcheck(ops.lse_fwd, (q, k, a, b, c, d, [1.5, 0.5], ex, ql, kl, False, True))
    kk, bb, dd = k.clone().requires_grad_(), b.clone().requires_grad_(), d.clone().requires_grad_()
    torch.library.opcheck(ops.lse_fwd, (q, kk, a, bb, c, dd, [1.0], ex, ql, kl, True, False))
    bits = pack_multi_hot((torch.rand(20, 5) < 0.4).long()), pack_multi_hot((torch.rand(70, 5) < 0.4).long())
    torch.library.opcheck(ops.lse_fwd, (q, kk, a, None, None, None, [2.0, 1.0], None, *bits, False, False))
    row = torch.randn(1, 20)
    torch.library.opcheck(ops.lse_bwd, (q.detach(), k, a, b, c, d, [1.0], ex, ql, kl, row, torch.randn(70),
                                        torch.randn(1, 20), torch.randn(20), torch.randn(70), True, True, True, True))
    torch.library.opcheck(ops.topk, (q.detach(), k, 5, "cosine", ex, ql, kl))
    torch.library.opcheck(ops.topk, (q.detach().double(), k.double(), 3, "l2", None, None, None))
    hard = torch.randint(0, 70, (20, 6))
    dr = draw_mixing(20, 6, 4, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    args = (hard, dr.pair_index, dr.alpha, dr.query_index, dr.query_weight)
    torch.library.opcheck(ops.mix, (q.detach(), k, *args))
    torch.library.opcheck(ops.mixed_dots, (q, q.detach(), k, *args))
    torch.library.opcheck(ops.mixed_dots_bwd, (torch.randn(20, 6), q.detach(), k, *args))
    torch.library.opcheck(ops.mixed_lse, (q, q.detach(), k, *args, a.clone().requires_grad_(),
                                          c.clone().requires_grad_(), [1.5, 0.5]))
    torch.library.opcheck(ops.mixed_lse, (q, q.detach(), k, *args, a, None, [1.0]))
    thr = torch.full((20,), 1.5)
    torch.library.opcheck(ops.lse_topk_fwd, (q, k, a, None, None, None, [1.0], None, None, None, False, True,
                                             thr, 40, 5))
    torch.library.opcheck(ops.lse_topk_fwd, (q, kk, a, bb, c, dd, [1.5, 0.5], None, None, None, False, False,
                                             thr, 40, 5))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("capacity", [70, 9])
def test_lse_topk_fwd_lists_the_columns_over_the_threshold(dtype, capacity):
    """The op's contract (ops_schema.h): count = #columns whose raw dot (the top-k kernel's fp32
    score) is above the threshold, with no exclusions or labels; best = the n_best of them in
    topk's order while they fit the capacity; its lse outputs = lse_fwd's, exclusions included."""
    ops = torch.ops.contrastive_kernels
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(21, 12, generator=g).to(dtype), torch.randn(70, 12, generator=g).to(dtype)
    a = torch.rand(21, generator=g) + 0.5
    ex = torch.randint(-1, 70, (21, 2), generator=g)
    scores = ops.topk(q, k, 70, "dot", None, None, None)[0]  # every column, sorted
    thr = scores[:, torch.randint(0, 70, (21,), generator=g)].diagonal().contiguous()
    thr[0] = float("inf")
    thr[1] = float("-inf")
    out = ops.lse_topk_fwd(q, k, a, None, None, None, [1.0], ex, None, None, True, False, thr, capacity, 6)
    want = ops.lse_fwd(q, k, a, None, None, None, [1.0], ex, None, None, True, False)
    for x, y in zip(out[:6], want):
        assert torch.equal(x, y)
    count = (scores > thr[:, None]).sum(1)
    assert torch.equal(out[7], count) and count[0] == 0 and count[1] == 70
    best = ops.topk(q, k, 6, "dot", None, None, None)[1]
    fits = (count >= 6) & (count <= capacity)
    assert fits.any()
    assert torch.equal(out[6][fits], best[fits])
    few = count < 6  # the rest of such a row is -1
    assert (out[6][few][:, -1] == -1).all() and (out[6][0] == -1).all()


@needs_ext
def test_torch_compile_traces_the_ops():
    """The fake kernels let torch.compile trace losses on backend="cpu" in one graph (and the
    top-k's progress bar stays out of it, even when asked for)."""
    q = torch.randn(16, 8, requires_grad=True)
    p, queue = torch.randn(16, 8), torch.randn(100, 8)

    def f(q, p, queue):
        return (ck.info_nce(q, p, queue, backend="cpu")
                + ck.clip_loss(q, p, 10.0, similarity="cosine", backend="cpu")
                + ck.topk_similarity(q.detach(), queue, 3, backend="cpu").values.sum() * 0
                + ck.topk_similarity(q.detach(), queue, 2, backend="cpu", progress=True).values.sum() * 0)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, p, queue)
    got.backward()
    want = f(q.detach().requires_grad_(), p, queue)
    assert torch.allclose(got, want, rtol=1e-5) and q.grad is not None


@needs_ext
@pytest.mark.parametrize("call,message", [
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 3), torch.ones(3), None, None, None, [1.0], None, None,
                         None, False, False), "same feature dimension"),
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 4).double(), torch.ones(3), None, None, None, [1.0],
                         None, None, None, False, False), "one dtype"),
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(2), None, None, None, [1.0], None, None,
                         None, False, False), "row_scale"),
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [], None, None,
                         None, False, False), "gammas"),
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0],
                         torch.zeros(3, 1, dtype=torch.int32), None, None, False, False), "int64"),
    (lambda o: o.lse_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None,
                         torch.zeros(3, dtype=torch.long), None, False, False), "together"),
    (lambda o: o.lse_fwd(torch.randint(0, 3, (3, 4)), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0],
                         None, None, None, False, False), "float16, bfloat16"),
    (lambda o: o.lse_bwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None, None,
                         None, torch.zeros(1, 2), torch.zeros(0), torch.zeros(1, 3), None, None, True, True, True,
                         True), "row_lse must be"),
    (lambda o: o.lse_bwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None, None,
                         None, torch.zeros(1, 3), torch.zeros(0), torch.zeros(1, 3), torch.zeros(5), None, True, True,
                         True, True), "d_pos must be"),
    (lambda o: o.topk(torch.randn(3, 4), torch.randn(5, 4), 6, "dot", None, None, None), "k must be in"),
    (lambda o: o.topk(torch.randn(3, 4), torch.randn(5, 4), 2, "manhattan", None, None, None), "similarity"),
    (lambda o: o.lse_topk_fwd(torch.randn(3, 4).double(), torch.randn(5, 4).double(), torch.ones(3), None, None,
                              None, [1.0], None, None, None, False, False, torch.zeros(3), 8, 2), "float64"),
    (lambda o: o.lse_topk_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None,
                              None, None, False, False, torch.zeros(2), 8, 2), "threshold must be"),
    (lambda o: o.lse_topk_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None,
                              None, None, False, False, torch.zeros(3), 1, 2), "capacity >= n_best"),
    (lambda o: o.lse_topk_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.ones(3), None, None, None, [1.0], None,
                              None, None, False, False, torch.zeros(3), 8, 6), "n_best <= rows"),
    (lambda o: o.mixed_lse(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.long),
                           torch.zeros(3, 1, 2, dtype=torch.long), torch.rand(3, 1), torch.zeros(3, 0, dtype=torch.long),
                           torch.rand(3, 0), torch.ones(2), None, [1.0]), "row_scale"),
    (lambda o: o.mixed_lse(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.long),
                           torch.zeros(3, 1, 2, dtype=torch.long), torch.rand(3, 1), torch.zeros(3, 0, dtype=torch.long),
                           torch.rand(3, 0), torch.ones(3), None, []), "gammas"),
    (lambda o: o.mix(torch.randn(3, 4), torch.randn(5, 4), torch.full((3, 2), 9), torch.zeros(3, 1, 2, dtype=torch.long),
                     torch.rand(3, 1), torch.zeros(3, 0, dtype=torch.long), torch.rand(3, 0)), "hard_index"),
])
def test_bad_direct_calls_raise(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.contrastive_kernels)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


FRAGMENT_OP = """\
import torch
@torch.library.custom_op("contrastive_kernels::triton_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2
"""


@needs_ext
@pytest.mark.parametrize("order", ["fragment_first", "extension_first"])
def test_coexists_with_python_ops_in_the_namespace(order):
    """The Triton backend registers `contrastive_kernels::triton_*` ops from Python; the C++
    TORCH_LIBRARY must load before or after them."""
    load = "from contrastive_kernels import _ext; assert _ext.load() is not None, _ext.unavailable_reason()\n"
    code = (FRAGMENT_OP + load) if order == "fragment_first" else ("import torch\n" + load + FRAGMENT_OP)
    code += textwrap.dedent("""
    ops = torch.ops.contrastive_kernels
    assert ops.triton_probe(torch.ones(2)).tolist() == [2.0, 2.0]
    v, i = ops.topk(torch.eye(3), torch.eye(3), 1, "dot", None, None, None)
    assert i[:, 0].tolist() == [0, 1, 2]
    print("ok")
    """)
    proc = _run(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@needs_ext
@pytest.mark.parametrize("order", ["triton_ops_first", "extension_first"])
def test_coexists_with_the_triton_ops_module(order):
    """The real Triton custom ops (contrastive_kernels/ops.py) and the C++ library, in either order."""
    first, second = ("import contrastive_kernels.ops as tops", "from contrastive_kernels import _ext; _ext.load()")
    if order == "extension_first":
        first, second = second, first
    code = f"""
    import torch
    {first}
    {second}
    import contrastive_kernels.ops as tops
    from contrastive_kernels import _ext
    assert _ext.unavailable_reason() is None, _ext.unavailable_reason()
    ops = torch.ops.contrastive_kernels
    assert all(hasattr(ops, n) for n in ("lse_fwd", "lse_topk_fwd", "lse_bwd", "topk", "mix", "mixed_dots",
                                         "mixed_dots_bwd", "mixed_lse"))
    if tops.TRITON_OPS_AVAILABLE:
        assert hasattr(torch.ops.contrastive_kernels, "triton_lse_fwd")
    v, i = torch.ops.contrastive_kernels.topk(torch.eye(3), torch.eye(3), 1, "dot", None, None, None)
    assert i[:, 0].tolist() == [0, 1, 2]
    print("ok", tops.TRITON_OPS_AVAILABLE)
    """
    proc = _run(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_unavailable_extension_is_explained_and_auto_falls_back():
    """Without the compiled module and with JIT off: available() says why and what runs instead."""
    code = """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "contrastive_kernels._C":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
    import torch, contrastive_kernels as ck
    from contrastive_kernels import functional
    why = ck.available_backends("cpu")["cpu"]
    assert why and "not built" in why and "CK_JIT=0" in why and "chunked" in why, why
    assert functional.resolve_backend("auto", "loss", torch.device("cpu")).NAME == "chunked"
    try:
        ck.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cpu")
    except ck.BackendUnavailableError as e:
        print("raised:", e)
    """
    proc = _run(code, CK_JIT="0")
    assert proc.returncode == 0 and "raised:" in proc.stdout, proc.stderr[-2000:]


def _locked_build_folder(tmp_path, age_s):
    folder = tmp_path / "contrastive_kernels_C"
    folder.mkdir()
    (folder / "build.ninja").write_text("x")
    (folder / "lock").write_text("")
    old = time.time() - age_s
    for p in (folder / "build.ninja", folder / "lock", folder):
        os.utime(p, (old, old))
    return folder


def test_jit_build_removes_a_lock_left_by_a_killed_build(tmp_path, capsys):
    """torch waits forever on a lock with no build behind it (a build killed mid-way): an import
    hung. A folder unchanged for the stale time, with no process working in it, is unlocked."""
    folder = _locked_build_folder(tmp_path, age_s=600)
    assert _ext.wait_for_build_lock(str(folder), stale_s=120, poll_s=0.01) is True
    assert not (folder / "lock").exists() and (folder / "build.ninja").exists()
    assert "left by a build that was killed" in capsys.readouterr().err


def test_jit_build_waits_for_a_live_build(tmp_path, capsys):
    """A fresh lock is another process's build: wait for it to finish, remove nothing."""
    folder = _locked_build_folder(tmp_path, age_s=0)
    timer = threading.Timer(0.3, lambda: os.unlink(folder / "lock"))
    timer.start()
    t0 = time.perf_counter()
    assert _ext.wait_for_build_lock(str(folder), stale_s=120, poll_s=0.01) is False
    timer.join()
    assert time.perf_counter() - t0 >= 0.25
    assert "waiting for another process's build" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_jit_build_keeps_the_lock_of_a_process_compiling_in_the_folder(tmp_path):
    """A compiler may leave the folder unchanged for a long time: a process whose working
    directory is the folder (ninja and the compilers run there) keeps the lock valid."""
    folder = _locked_build_folder(tmp_path, age_s=600)
    compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=folder)
    try:
        timer = threading.Timer(0.5, compiler.kill)
        timer.start()
        assert _ext.wait_for_build_lock(str(folder), stale_s=120, poll_s=0.05) is True
        assert compiler.poll() is not None  # removed only once the process was gone
    finally:
        compiler.kill()
        compiler.wait()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler: no JIT")
@pytest.mark.parametrize("load_s, told", [(0.0, False), (0.4, True)])
def test_jit_load_says_it_compiles_only_when_it_takes_a_while(monkeypatch, capsys, tmp_path, load_s, told):
    """A cached build loads silently; a load still running after JIT_NOTICE_S is a compile, and
    says so (it used to say "compiling" on every import of a source checkout). A load records the
    config it was built with next to the build."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(_ext, "JIT_NOTICE_S", 0.1)
    monkeypatch.setattr(_ext, "wait_for_build_lock", lambda folder: False)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: time.sleep(load_s) or "module")
    assert _ext._try_jit() == ("module", None)
    time.sleep(0.2)  # a notice left armed would fire now
    assert ("compiling the C++ extension" in capsys.readouterr().err) is told
    stamp = json.loads((tmp_path / _ext.JIT_STAMP).read_text())
    assert stamp == _ext._jit_stamp() and stamp["sources"] and stamp["cxx"]


def test_jit_build_counts_as_cached_only_when_up_to_date(monkeypatch, tmp_path):
    """The import loads a cached JIT build only when it is newer than every csrc/ file, was built
    with the flags a build would use now, and no build is under way: a stale one (a pull that
    changed csrc/, CK_BUILD_CUDA changed) rebuilds at first use, not at import."""
    from torch.utils import cpp_extension

    source_root, cache = tmp_path / "src", tmp_path / "cache"
    (source_root / "csrc" / "cpu").mkdir(parents=True)
    cache.mkdir()
    header = source_root / "csrc" / "cpu" / "kernel.h"
    header.write_text("// a header")
    monkeypatch.setattr(_ext, "_SOURCE_ROOT", str(source_root))
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(cache))
    monkeypatch.delenv("CK_JIT", raising=False)
    monkeypatch.delenv("CK_BUILD_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert not _ext.jit_build_cached()  # no build yet
    so = cache / (_ext.JIT_NAME + ".so")
    so.write_bytes(b"")
    os.utime(header, (1000, 1000))
    os.utime(so, (2000, 2000))
    assert not _ext.jit_build_cached()  # a build with no record of its flags (an older version's)
    _ext._write_jit_stamp(str(cache), _ext._jit_stamp())
    assert _ext.jit_build_cached()
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # asked for other GPU architectures since
    assert not _ext.jit_build_cached()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    _ext._write_jit_stamp(str(cache), dict(_ext._jit_stamp(), cxx=["-O0"]))  # built with other flags
    assert not _ext.jit_build_cached()
    _ext._write_jit_stamp(str(cache), dict(_ext._jit_stamp(), with_cuda=not _ext._jit_stamp()["with_cuda"]))
    assert not _ext.jit_build_cached()  # CK_BUILD_CUDA (or the CUDA toolkit) changed since
    # a load with another config removes the stamp before it rebuilds (it may die before its end)
    _ext._remove_jit_stamp_unless(str(cache), _ext._jit_stamp())
    assert not (cache / _ext.JIT_STAMP).exists()
    _ext._write_jit_stamp(str(cache), _ext._jit_stamp())
    _ext._remove_jit_stamp_unless(str(cache), _ext._jit_stamp())  # the same config keeps it
    assert _ext.jit_build_cached()
    os.utime(header, (3000, 3000))  # a header changed after the build
    assert not _ext.jit_build_cached()
    os.utime(so, (4000, 4000))
    (cache / "lock").write_text("")  # a build under way (or a stale lock): not at import
    assert not _ext.jit_build_cached()
    (cache / "lock").unlink()
    monkeypatch.setenv("CK_JIT", "0")
    assert not _ext.jit_build_cached()


@needs_ext
@pytest.mark.slow
def test_cpu_extra_memory_at_the_qk_shape():
    """backend="cpu" at B=256, K=2^20, D=128 (fp32, forward + backward): at most 5% of eager's extra
    peak memory (each measured in its own process, as the benchmark does)."""
    from contrastive_kernels.bench.cases import case
    from contrastive_kernels.bench.measure import measure_isolated

    qk = case("info_nce_bank", B=256, K=2**20, D=128, label="qk")
    eager = measure_isolated(qk, "reference", "cpu", repeats=0, timeout=600)
    fused = measure_isolated(qk, "cpu", "cpu", repeats=0, timeout=600)
    assert "error" not in eager and "error" not in fused, (eager, fused)
    assert fused["peak_extra_bytes"] <= 0.05 * eager["peak_extra_bytes"]
