"""backend="cuda" (the compiled CUDA kernels of csrc/cuda) against reference.py: every op of the
family (lse_stats with every mask/label/gamma/column combination and all input gradients, top-k,
mixing), every loss through the public API at fp64/fp32/bf16/fp16, opcheck and torch.compile.

Each test runs on two targets: "gpu" (a CUDA device: `make test-gpu`; skipped without one) and
"emulated" (the same glue and kernels compiled for the host CUDA emulator of csrc/emu, in
`make test`: tests/_cuda_emu.py). The emulated target runs smaller shapes where the GPU's would
take minutes of emulation; tests that only a GPU can answer (device placement, large banks,
host-to-device streaming) are GPU-only."""
import math
from typing import NamedTuple

import pytest
import torch

import _cuda_emu
import contrastive_kernels as ck
from contrastive_kernels import functional, reference
from contrastive_kernels._common import draw_mixing
from _helpers import LSE_EXCLUDES, LSE_LABELS, lse_case, lse_inputs, lse_options

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _why():
    return functional.backend_unavailable_reason("cuda", torch.device("cuda"))


class Target(NamedTuple):
    dev: str      # where the tensors go
    backend: str  # the backend name that runs the CUDA code there
    ops: object   # that backend's family ops
    lib: object   # its torch.ops namespace
    emulated: bool


@pytest.fixture(params=[pytest.param("gpu", marks=needs_gpu), "emulated"])
def target(request, monkeypatch):
    if request.param == "gpu":
        if _why() is not None:
            pytest.skip(f"the cuda backend is unavailable (see test_cuda_backend_is_available): {_why()}")
        return Target("cuda", "cuda", functional.resolve_backend("cuda", "loss", torch.device("cuda")),
                      torch.ops.contrastive_kernels, False)
    why = _cuda_emu.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA emulator is unavailable: {why}")
    _cuda_emu.activate(monkeypatch)
    return Target("cpu", "cpu", functional.resolve_backend("cpu", "loss", torch.device("cpu")), _cuda_emu.ops(), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_is_available():
    """On a GPU machine the extension must have been built with CUDA (python setup.py build_ext)."""
    assert _why() is None, _why()
    from contrastive_kernels import _ext

    assert _ext.build_info()["cuda"] != "not built"


# --------------------------------------------------------------------------------------------
# lse_stats, op level (fp64: the kernels' logic exactly; lower precisions: tolerances)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", LSE_LABELS)
@pytest.mark.parametrize("exclude", LSE_EXCLUDES)
@pytest.mark.parametrize("gammas", [(1.0,), (1.5, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("col_lse", [False, True])
@pytest.mark.parametrize("grad_side", ["rows", "both"])
@pytest.mark.parametrize("shape", [(9, 23, 5), (70, 130, 33)])
def test_lse_stats_fp64_matches_spec(target, labels, exclude, gammas, col_lse, grad_side, shape):
    b, n, d = shape
    torch.manual_seed(0)
    inputs = lse_inputs(b, n, d)
    mask, kw = lse_options(b, n, exclude, labels, gammas, col_lse, grad_side)
    want = lse_case(reference.lse_stats, inputs, mask, "cpu", **kw)
    got = lse_case(target.ops.lse_stats, inputs, mask, target.dev, **kw)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10), (i, (g - w).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128, 40, 256])
@pytest.mark.parametrize("row_only", [True, False])
def test_lse_stats_low_precision(target, dtype, d, row_only):
    """Against the fp64 reference: error at most twice the eager run at the same dtype + floor."""
    b, n = (70, 700) if target.emulated else (300, 5000)
    inputs = lse_inputs(b, n, d, dtype=torch.float64, seed=d)
    inputs[0] = torch.nn.functional.normalize(inputs[0], dim=1)
    inputs[1] = torch.nn.functional.normalize(inputs[1], dim=1)
    inputs[2] = inputs[2] * 10  # logit scale ~ 1/T
    mask = [True, not row_only, True, not row_only, True, not row_only]
    _check_within_eager_error(target, inputs, mask, dtype, gammas=(1.0,), want_col_lse=not row_only)


def _check_within_eager_error(target, inputs, mask, dtype, **kw):
    """lse_stats of the fp64 inputs cast to dtype (features) / fp32 (the rest): every output and
    gradient within twice the eager run's error at that dtype (against fp64) plus a floor."""
    truth = lse_case(reference.lse_stats, inputs, mask, "cpu", **kw)
    low = [t.to(dtype) if i < 2 else (t.float() if t is not None else None) for i, t in enumerate(inputs)]
    eager = lse_case(reference.lse_stats, low, mask, target.dev, **kw)
    got = lse_case(target.ops.lse_stats, low, mask, target.dev, **kw)
    for i, (g, e, t) in enumerate(zip(got, eager, truth)):
        if t.numel() == 0:
            continue
        err, err_ref = (g - t).abs().max().item(), (e - t).abs().max().item()
        scale = 1.0 + t.abs().max().item()
        # the q gradient (i == 4) comes back in the input dtype, where a value near a rounding
        # boundary may round one unit in the last place the other way than the eager run's
        ulp = torch.finfo(dtype).eps * t.abs().max().item() if i == 4 and dtype.itemsize == 2 else 0.0
        assert err <= 2 * err_ref + ulp + 1e-5 * scale, (i, err, err_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d,col_terms", [(36, True), (128, False), (96, True), (300, True)])
@pytest.mark.parametrize("passes", ["row-only", "both-sides", "no-column-lse", "gamma-0", "exclude-one", "exclude-two"])
def test_lse_warp_kernels(target, dtype, d, col_terms, passes):
    """The warp kernels (one gamma, no labels, fp16/bf16): the row-only forward with its key sums,
    the statistics of the rows and of the columns (CLIP's column log-sum-exp) and both backward
    orientations, with the column term of the gradient or without it; a gamma other than 1 (and
    0: the rows' term of the gradient vanishes), with and without column terms, D not a multiple
    of 8 (key tiles staged without cp.async), D=300 (three slices of the output columns, the last
    one partial), one or two exclusions per query, two column splits and rows past the last
    warp's, against the fp64 reference within twice the eager error at the same dtype."""
    b, n = 20, 2500
    inputs = lse_inputs(b, n, d, dtype=torch.float64, seed=d, col_scale=col_terms, biases=col_terms)
    inputs[0] = torch.nn.functional.normalize(inputs[0], dim=1) * 4
    inputs[1] = torch.nn.functional.normalize(inputs[1], dim=1)
    both = passes != "row-only"
    mask = [True, both, True, both and col_terms, True, both and col_terms]
    # exclusions: none for row 0, columns that fall in either split, in the first and last tiles
    exclude = {"exclude-one": torch.arange(b)[:, None] * 131 % n,
               "exclude-two": torch.stack([torch.arange(b) * 131 % n, n - 1 - torch.arange(b)], 1)}.get(passes)
    if exclude is not None:
        exclude[0] = -1
    _check_within_eager_error(target, inputs, mask, dtype, gammas=(0.0 if passes == "gamma-0" else 0.5,),
                              want_col_lse=passes != "row-only" and passes != "no-column-lse", exclude=exclude)


def test_lse_stats_empty_and_excluded_rows(target):
    DEV = target.dev
    q = torch.randn(3, 8, dtype=torch.float64, device=DEV, requires_grad=True)
    k = torch.randn(1, 8, dtype=torch.float64, device=DEV)
    a = torch.ones(3, dtype=torch.float64, device=DEV)
    row, *_ = target.ops.lse_stats(q, k, a, exclude=torch.tensor([[0], [-1], [-1]], device=DEV))
    assert row[0, 0] == -math.inf and torch.isfinite(row[0, 1:]).all()
    grad, = torch.autograd.grad(row[0, 1:].sum(), q)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()
    row, ps, pc, col = target.ops.lse_stats(q, k[:0], a, want_col_lse=True)
    assert (row == -math.inf).all() and col.numel() == 0


# --------------------------------------------------------------------------------------------
# losses through the public API
# --------------------------------------------------------------------------------------------

def _check_loss(target, fn, tensors, grads, dtype, floor=1e-5):
    """_helpers.check_backend with the tensors moved to the target's device inside fn."""
    from _helpers import check_backend

    def on_target(backend, **t):
        return fn(backend=backend, **{k: v.to(target.dev) for k, v in t.items()})

    check_backend(on_target, tensors, grads, target.backend, dtype, floor=floor)


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return x * (1 + 0.3 * torch.rand(n, 1, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("mode", ["in_batch", "queue", "queue_grad", "queue+in_batch"])
@pytest.mark.parametrize("estimator", [(0.0, 0.0), (0.1, 0.5)])
def test_info_nce(target, dtype, similarity, mode, estimator):
    b, k, d = 37, 300, 24
    tensors = {"q": _features(b, d, 1), "p": _features(b, d, 2), "temperature": torch.tensor(0.3, dtype=torch.float64)}
    grads = ["q", "p", "temperature"]
    if mode != "in_batch":
        tensors["queue"] = _features(k, d, 3)
        if mode == "queue_grad":
            grads.append("queue")
    in_batch = {"in_batch": None, "queue": None, "queue_grad": False, "queue+in_batch": True}[mode]

    def fn(backend, q, p, temperature, queue=None):
        return ck.info_nce(q, p, queue, temperature=temperature, similarity=similarity,
                           in_batch_negatives=in_batch, tau_plus=estimator[0], beta=estimator[1],
                           backend=backend)

    _check_loss(target, fn, tensors, grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_clip_sup_con_nt_xent_multi_positive(target, dtype):
    DEV = target.dev
    x, y = _features(50, 16, 4), _features(50, 16, 5)
    _check_loss(target, lambda backend, x, y, s: ck.clip_loss(x, y, s, backend=backend),
                {"x": x, "y": y, "s": torch.tensor(7.0, dtype=torch.float64)}, ["x", "y", "s"], dtype)
    labels = torch.arange(50) % 7
    _check_loss(target, lambda backend, x: ck.sup_con(x, labels.to(DEV), backend=backend), {"x": x}, ["x"], dtype)
    multi = (torch.rand(50, 10, generator=torch.Generator().manual_seed(1)) < 0.3).long()
    _check_loss(target, lambda backend, x: ck.sup_con(x, multi.to(DEV), backend=backend), {"x": x}, ["x"], dtype)
    _check_loss(target, lambda backend, x, y: ck.nt_xent(x, y, backend=backend, tau_plus=0.1),
                {"x": x, "y": y}, ["x", "y"], dtype)
    pidx = torch.randint(-1, 50, (50, 3), generator=torch.Generator().manual_seed(2))
    _check_loss(target, lambda backend, x, y, z: ck.multi_positive_info_nce(x, y, pidx.to(DEV), z, backend=backend),
                {"x": x, "y": y, "z": _features(80, 16, 6)}, ["x", "y"], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_losses_stay_finite_and_close(target, dtype):
    """T = 0.01 and logit scale 100 in bf16/fp16: finite, and within the eager error budget."""
    b, k = (96, 1024) if target.emulated else (256, 8192)
    q, p, queue = _features(b, 128, 7), _features(b, 128, 8), _features(k, 128, 9)
    _check_loss(target, lambda backend, q, p, queue: ck.info_nce(q, p, queue, temperature=0.01, backend=backend),
                {"q": q, "p": p, "queue": queue}, ["q"], dtype, floor=1e-3)
    _check_loss(target, lambda backend, x, y: ck.clip_loss(x, y, 100.0, backend=backend),
                {"x": q, "y": p}, ["x", "y"], dtype, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bank_mode_large_matches_chunked():
    """GPU only: a 2^18-row bank (minutes under the emulator)."""
    if _why() is not None:
        pytest.skip(f"the cuda backend is unavailable: {_why()}")
    DEV = "cuda"
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(512, 128, device=DEV), dim=1).bfloat16().requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(512, 128, device=DEV), dim=1).bfloat16()
    queue = torch.nn.functional.normalize(torch.randn(2**18, 128, device=DEV), dim=1).bfloat16()
    out = {}
    for be in ("cuda", "chunked"):
        q.grad = None
        loss = ck.info_nce(q, k, queue, temperature=0.07, backend=be)
        loss.backward()
        out[be] = (loss.detach().float(), q.grad.float().clone())
    assert torch.allclose(out["cuda"][0], out["chunked"][0], rtol=2e-3, atol=2e-3)
    assert torch.allclose(out["cuda"][1], out["chunked"][1], rtol=3e-2, atol=3e-4)


# --------------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 300, 7), (17, 1000, 1000), (70, 5000, 64), (130, 70000, 256),
                                   (33, 20000, 1024), (64, 4000, 33)])
def test_topk_matches_spec(target, dtype, similarity, m, n, k):
    DEV = target.dev
    if target.emulated:  # the same k and tile paths over a shorter bank
        n = max(k, min(n, 4000))
    g = torch.Generator().manual_seed(m * n + k)
    q, bank = torch.randn(m, 40, generator=g).to(dtype), torch.randn(n, 40, generator=g).to(dtype)
    want_v, want_i = reference.topk_similarity(q, bank, k, similarity=similarity)
    got_v, got_i = target.ops.topk(q.to(DEV), bank.to(DEV), k, similarity=similarity, exclude_index=None,
                               query_labels=None, bank_labels=None)
    got_v, got_i = got_v.cpu(), got_i.cpu()
    assert got_i.dtype == torch.int64 and got_i.shape == (m, k)
    # values come back in the input dtype: a score within 1e-7 of a rounding boundary may round
    # the other way than the reference's, one unit in the last place of that dtype
    ulp = torch.finfo(dtype).eps * want_v.float().abs().max().item() if dtype.itemsize == 2 else 0.0
    assert torch.allclose(got_v.to(want_v.dtype).float(), want_v.float(), rtol=1e-5, atol=1e-4 + ulp)
    scores = reference.similarity_matrix(q.float(), bank.float(), similarity)
    assert torch.allclose(scores.gather(1, got_i), got_v.float(), rtol=1e-5, atol=1e-4)
    assert (got_i == want_i).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_topk_tensor_core_widths(target, dtype, d):
    """The widths whose bank tiles are copied by cp.async in whole columns of 16-byte chunks (d a
    multiple of 8 dividing into the block's threads), with exclusions and 70 query rows (a block
    whose last warps have no rows)."""
    DEV = target.dev
    g = torch.Generator().manual_seed(d)
    q, bank = torch.randn(70, d, generator=g).to(dtype), torch.randn(3000, d, generator=g).to(dtype)
    ex = torch.randint(0, 3000, (70,), generator=g)
    want_v, want_i = reference.topk_similarity(q, bank, 300, similarity="cosine", exclude_index=ex)
    got_v, got_i = target.ops.topk(q.to(DEV), bank.to(DEV), 300, similarity="cosine", exclude_index=ex.to(DEV),
                                   query_labels=None, bank_labels=None)
    got_v, got_i = got_v.cpu(), got_i.cpu()
    assert not (got_i == ex[:, None]).any()
    scores = reference.similarity_matrix(q.float(), bank.float(), "cosine")
    assert torch.allclose(scores.gather(1, got_i), got_v.float(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(got_v.float(), want_v.float(), rtol=1e-5, atol=1e-4 + torch.finfo(dtype).eps)
    assert (got_i == want_i).float().mean() > 0.98


def test_topk_ties_exclusions_labels_and_host_bank(target):
    DEV = target.dev
    bank = torch.tensor([[1.0], [2.0], [2.0], [0.0], [2.0], [-0.0], [0.0]], device=DEV)
    q = torch.tensor([[1.0], [-1.0], [0.0]], device=DEV)
    _, idx = target.ops.topk(q, bank, 7, similarity="dot", exclude_index=None, query_labels=None, bank_labels=None)
    assert idx[0].tolist() == [1, 2, 4, 0, 3, 5, 6]
    assert idx[1].tolist() == [3, 5, 6, 0, 1, 2, 4]
    assert idx[2].tolist() == list(range(7))
    # many exact ties across column splits: a bank of 100k identical rows
    same = torch.ones(20_000 if target.emulated else 100_000, 8, device=DEV)
    _, idx = target.ops.topk(torch.ones(3, 8, device=DEV), same, 50, similarity="dot", exclude_index=None,
                         query_labels=None, bank_labels=None)
    assert idx.tolist() == [list(range(50))] * 3
    qq, bb = torch.randn(6, 4), torch.randn(4000, 4)
    ex = torch.tensor([[0, 5], [1, -1], [-1, -1], [3999, 3998], [7, 7], [2, 3]])
    ql, bl = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(4000) % 3
    got = target.ops.topk(qq.to(DEV), bb.to(DEV), 10, similarity="dot", exclude_index=ex.to(DEV),
                      query_labels=ql.to(DEV), bank_labels=bl.to(DEV))[1].cpu()
    scores = qq @ bb.T
    for i in range(6):
        allowed = [j for j in range(4000) if j not in ex[i].tolist() and bl[j] != ql[i]]
        assert got[i].tolist() == sorted(allowed, key=lambda j: (-float(scores[i, j]), j))[:10]
    # a host bank streamed to the GPU equals a device bank; k > 1024 runs too
    hq, hb = torch.randn(9, 32), torch.randn(30000, 32)
    a = ck.topk_similarity(hq.to(DEV), hb, 1500, similarity="cosine", backend=target.backend)
    b = reference.topk_similarity(hq, hb, 1500, similarity="cosine")
    assert (a.indices.cpu() == b.indices).float().mean() > 0.99


def test_topk_ranks_nan_scores_first(target):
    """Every NaN score (inf - inf is -nan) ranks above +inf, NaNs tie (lower column first): the
    reference's torch.sort order."""
    DEV = target.dev
    q = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.0, 1.0]])
    bank = torch.tensor([[math.inf, math.inf], [1.0, 0.0], [math.nan, 1.0], [2.0, 0.0], [0.0, 3.0]])
    got_v, got_i = target.ops.topk(q.to(DEV), bank.to(DEV), 4, similarity="dot", exclude_index=None,
                                   query_labels=None, bank_labels=None)
    want_v, want_i = reference.topk_similarity(q, bank, 4)
    assert got_i.cpu().tolist() == want_i.tolist()
    assert torch.equal(got_v.cpu().isnan(), want_v.isnan())


def test_topk_ties_with_a_merge_inside_a_tile(target):
    """A row's candidate buffer fills in the middle of a bank tile whose scores all tie: the merge
    then puts some of the tile's columns in the queue while lower columns of the same score still
    wait, and those must win the tie against the new k-th key (64-row tiles: the first sets the
    threshold, the second leaves 30 candidates buffered, the third ties everywhere)."""
    DEV = target.dev
    vals = torch.cat([torch.ones(64), torch.zeros(64), torch.full((64,), 2.0)])
    vals[64:124:2] = 3.0
    bank = vals[:, None].to(DEV)
    got_v, got_i = target.ops.topk(torch.ones(1, 1, device=DEV), bank, 64, similarity="dot", exclude_index=None,
                                   query_labels=None, bank_labels=None)
    want_i = list(range(64, 124, 2)) + list(range(128, 162))
    assert got_i[0].tolist() == want_i
    assert got_v[0].tolist() == [3.0] * 30 + [2.0] * 34


def test_topk_streamed_in_chunks_equals_one_pass(target):
    """The host-bank path's merge of per-chunk top-k results (exclusions and labels shifted to each
    chunk), run over a device bank in chunks: identical to one pass, whatever the chunk size,
    including chunks smaller than k and a last chunk of one row. Integer features keep every score
    exact, so the comparison is bitwise."""
    DEV = target.dev
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-3, 4, (13, 16), generator=g).float().to(DEV)
    bank = torch.randint(-3, 4, (1201, 16), generator=g).float().to(DEV)
    ex = torch.randint(-1, 1201, (13, 3), generator=g).to(DEV)
    ql, bl = torch.randint(0, 3, (13,), generator=g).to(DEV), torch.randint(0, 3, (1201,), generator=g).to(DEV)
    for sim in ("dot", "l2"):
        once = target.ops.topk(q, bank, 40, similarity=sim, exclude_index=ex, query_labels=ql, bank_labels=bl)
        for rows in (600, 256, 30):
            streamed = target.ops.topk(q, bank, 40, similarity=sim, exclude_index=ex, query_labels=ql,
                                       bank_labels=bl, _chunk_rows=rows)
            assert torch.equal(streamed[0], once[0]) and torch.equal(streamed[1], once[1]), (sim, rows)
        scores = reference.similarity_matrix(q.cpu(), bank.cpu(), sim)
        ex_cpu = ex.cpu()
        rows = torch.arange(13)[:, None].expand_as(ex_cpu)
        scores[rows[ex_cpu >= 0], ex_cpu[ex_cpu >= 0]] = -math.inf
        scores[ql.cpu()[:, None] == bl.cpu()[None, :]] = -math.inf
        assert torch.equal(once[1].cpu(), scores.sort(dim=1, descending=True, stable=True).indices[:, :40]), sim


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", [False, True])
def test_topk_host_bank_equals_device_bank(pinned):
    """A host bank (pinned or not) streamed through _bank_chunks.HostChunks: equal to the device
    bank's result, with exclusions and labels, in chunks and with the default chunk size."""
    if _why() is not None:
        pytest.skip(_why())
    ops = functional.resolve_backend("cuda", "loss", torch.device("cuda"))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(300, 128, generator=g).half().cuda()
    bank_host = torch.randn(400_000, 128, generator=g).half()
    ex = torch.randint(-1, 400_000, (300, 2), generator=g).cuda()
    ql, bl = torch.randint(0, 50, (300,), generator=g).cuda(), torch.randint(0, 50, (400_000,), generator=g)
    bank = bank_host.pin_memory() if pinned else bank_host
    for sim in ("dot", "cosine"):
        for k in (1, 100, 1024):
            want = ops.topk(q, bank_host.cuda(), k, similarity=sim, exclude_index=ex, query_labels=ql,
                            bank_labels=bl.cuda())
            for rows in (None, 150_000):
                got = ops.topk(q, bank, k, similarity=sim, exclude_index=ex, query_labels=ql, bank_labels=bl,
                               _chunk_rows=rows)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (sim, k, rows)


# --------------------------------------------------------------------------------------------
# mixing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_mix_and_mixed_dots(target, dtype):
    DEV = target.dev
    q, neg = torch.randn(50, 96, dtype=dtype), torch.randn(300, 96, dtype=dtype)
    hard = torch.randint(0, 300, (50, 16))
    draws = draw_mixing(50, 16, 12, 5, torch.Generator().manual_seed(1), torch.device("cpu"))
    dd = type(draws)(*(t.to(DEV) for t in (draws.pair_index, draws.alpha, draws.query_index, draws.query_weight)))
    got = target.ops.mix(q.to(DEV), neg.to(DEV), hard.to(DEV), dd).cpu()
    want = reference.mix_points(q, neg, hard, draws)
    tol = 1e-6 if dtype != torch.bfloat16 else 1e-2
    assert got.dtype == dtype and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    qd = q.double().to(DEV).requires_grad_() if dtype == torch.float64 else q.float().to(DEV).requires_grad_()
    u = target.ops.mixed_dots(qd if dtype != torch.bfloat16 else q.to(DEV).requires_grad_(), q.to(DEV), neg.to(DEV),
                          hard.to(DEV), dd)
    h = reference.mix_points(q, neg, hard, draws)
    want_u = torch.einsum("bd,btd->bt", q.to(u.dtype), h.to(u.dtype))
    assert torch.allclose(u.detach().cpu(), want_u, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s,sq,gammas,bias", [(12, 5, [1.0], True), (0, 7, [1.5, 0.5], False), (9, 0, [1.0, 0.0], True)])
def test_mixed_lse(target, dtype, s, sq, gammas, bias):
    """mixed_lse = logsumexp_t(gamma (a u + c)) over the backend's own mixed_dots, value and the
    gradients of q, row_scale and row_bias (D = 200: threads stride the features unevenly)."""
    DEV = target.dev
    g = torch.Generator().manual_seed(s)
    q, neg = torch.randn(30, 200, generator=g).to(dtype), torch.randn(300, 200, generator=g).to(dtype)
    hard = torch.randint(0, 300, (30, 16), generator=g).to(DEV)
    draws = draw_mixing(30, 16, s, sq, torch.Generator().manual_seed(1), torch.device("cpu"))
    dd = type(draws)(*(t.to(DEV) for t in (draws.pair_index, draws.alpha, draws.query_index, draws.query_weight)))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a0 = (torch.rand(30, generator=g, dtype=acc) + 1.0).to(DEV)
    c0 = torch.randn(30, generator=g, dtype=acc).to(DEV) if bias else None
    w = torch.rand(len(gammas), 30, generator=g, dtype=acc).to(DEV)
    q, neg = q.to(DEV), neg.to(DEV)
    outs = []
    for fused in (True, False):
        qq, a = q.clone().requires_grad_(), a0.clone().requires_grad_()
        c = c0.clone().requires_grad_() if bias else None
        if fused:
            lse = target.ops.mixed_lse(qq, q, neg, hard, dd, a, c, gammas=gammas)
        else:
            logits = target.ops.mixed_dots(qq, q, neg, hard, dd) * a[:, None]
            logits = logits + c[:, None] if bias else logits
            lse = torch.stack([torch.logsumexp(gm * logits, 1) for gm in gammas])
        leaves = [qq, a] + ([c] if bias else [])
        outs.append([lse.detach()] + list(torch.autograd.grad((lse * w).sum(), leaves)))
    # fp32 sums in another order; dq in bf16 may then round to a neighbour
    tols = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0 ** -7, 1e-4)}
    for x, y in zip(*outs):
        rtol, atol = tols[x.dtype]
        assert x.dtype == y.dtype and torch.allclose(x, y, rtol=rtol, atol=atol)
    if bias:  # -inf logits weigh 0 (as on Triton and the CPU): a row of them gives lse = -inf
        c = c0.clone()
        c[3] = -float("inf")
        lse = target.ops.mixed_lse(q, q, neg, hard, dd, a0, c, gammas=gammas).cpu()
        live = [gi for gi, gm in enumerate(gammas) if gm > 0]  # gamma 0: 0 * -inf is NaN
        assert torch.all(lse[live, 3] == -float("inf"))
        assert torch.allclose(lse[:, 4:], outs[0][0][:, 4:].cpu(), rtol=1e-5, atol=1e-5)


def test_mix_equals_reference_bitwise_fp32(target):
    DEV = target.dev
    q, neg = torch.randn(8, 32, device=DEV), torch.randn(40, 32, device=DEV)
    hard = torch.randint(0, 40, (8, 5), device=DEV)
    g = lambda: torch.Generator().manual_seed(3)
    a = ck.mix_hard_negatives(q, neg, hard, 4, 3, generator=g(), backend=target.backend)
    b = ck.mix_hard_negatives(q, neg, hard, 4, 3, generator=g(), backend="reference")
    assert torch.equal(a, b)


def test_info_nce_with_mixing(target):
    q, p, queue = _features(20, 16, 11), _features(20, 16, 12), _features(200, 16, 13)
    for dtype in (torch.float64, torch.float32):
        _check_loss(target, lambda backend, q, p, queue: ck.info_nce(
            q, p, queue, temperature=0.2, mixing=ck.Mixing(10, 6, 3, torch.Generator().manual_seed(0)),
            backend=backend), {"q": q, "p": p, "queue": queue}, ["q", "p"], dtype)


# --------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------

def test_opcheck_cuda_ops(target):
    DEV = target.dev
    ops = target.lib
    q = torch.randn(20, 16, device=DEV, requires_grad=True)
    k = torch.randn(70, 16, device=DEV)
    a = torch.rand(20, device=DEV) + 0.5
    torch.library.opcheck(ops.lse_fwd, (q, k, a, None, None, None, [1.0], None, None, None, False, True))
    kk = k.clone().requires_grad_()
    torch.library.opcheck(ops.lse_fwd, (q, kk, a, None, None, None, [1.5, 0.5], None, None, None, True, False))
    torch.library.opcheck(ops.topk, (q.detach(), k, 5, "cosine", None, None, None))
    hard = torch.randint(0, 70, (20, 6), device=DEV)
    draws = draw_mixing(20, 6, 4, 2, None, torch.device(DEV))
    args = (hard, draws.pair_index, draws.alpha, draws.query_index, draws.query_weight)
    torch.library.opcheck(ops.mix, (q.detach(), k, *args))
    torch.library.opcheck(ops.mixed_dots, (q, q.detach(), k, *args))
    torch.library.opcheck(ops.mixed_lse, (q, q.detach(), k, *args, a.clone().requires_grad_(),
                                          torch.randn(20, device=DEV, requires_grad=True), [1.5, 0.5]))
    torch.library.opcheck(ops.mixed_lse, (q, q.detach(), k, *args, a, None, [1.0]))


def test_torch_compile_fullgraph(target):
    DEV = target.dev
    q = torch.randn(64, 32, device=DEV, requires_grad=True)
    p = torch.randn(64, 32, device=DEV)
    queue = torch.randn(1000, 32, device=DEV)
    f = torch.compile(lambda q, p, queue: ck.info_nce(q, p, queue, backend=target.backend), fullgraph=True)
    loss = f(q, p, queue)
    loss.backward()
    want = ck.info_nce(q.detach(), p, queue, backend="reference")
    assert torch.allclose(loss.detach(), want, rtol=1e-4, atol=1e-5) and q.grad is not None


# --------------------------------------------------------------------------------------------
# the emulator itself: it reports the faults it claims to check (csrc/emu/ck_emu.h)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    (0, "lanes of one warp at different collectives"),
    (1, "deadlock in block"),
    (2, "not 16-byte aligned"),
    (3, "returned"),  # a lane returned while others of its warp wait at (or later enter) a shuffle
])
def test_emulator_reports_faults(case, message):
    why = _cuda_emu.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA emulator is unavailable: {why}")
    with pytest.raises(RuntimeError, match=message):
        _cuda_emu.ops().emulator_probe(case, 1024)


@pytest.mark.parametrize("case,message", [
    (5, "read shared memory no thread wrote yet"),  # a missing __syncthreads
    (6, "read a cp.async copy that had not landed"),  # a missing cp.async wait
    (7, "never waited for"),
])
def test_emulator_schedules_show_races_that_thread_order_hides(case, message, monkeypatch):
    """Races pass unseen when thread 0 runs first and each cp.async lands at once (the forward
    schedule); the default shuffled schedule and the reverse one report them."""
    why = _cuda_emu.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA emulator is unavailable: {why}")
    ops = _cuda_emu.ops()
    monkeypatch.setenv("CK_EMU_SCHEDULE", "forward")
    assert ops.emulator_probe(case, 4096) == 0
    for schedule in ("shuffle", "reverse"):
        monkeypatch.setenv("CK_EMU_SCHEDULE", schedule)
        with pytest.raises(RuntimeError, match=message):
            ops.emulator_probe(case, 4096)
    monkeypatch.delenv("CK_EMU_SCHEDULE")
    with pytest.raises(RuntimeError, match=message):
        ops.emulator_probe(case, 4096)
    monkeypatch.setenv("CK_EMU_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="CK_EMU_SCHEDULE must be"):
        ops.emulator_probe(4, 1024)


def test_grid_planning_fills_the_waves():
    """plan_splits (glue.h), the column splits of every CUDA grid, on the emulated H100's 132 SMs:
    whole tiles, no empty split, splits of at least min_cols, and the block slots filled."""
    why = _cuda_emu.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA emulator is unavailable: {why}")
    plan = _cuda_emu.ops().emulator_plan_splits

    def fill(row_blocks, slices, splits, per_sm):
        blocks, slots = row_blocks * slices * splits, 132 * per_sm
        return blocks / (-(-blocks // slots) * slots)

    for row_blocks in (1, 4, 16, 128, 256):
        for slices in (1, 2):
            for cols in (0, 63, 2500, 65536, 2 ** 20):
                for per_sm in (1, 2, 3, 4):
                    splits, per = plan(row_blocks, slices, cols, 64, per_sm, 1024)
                    assert splits >= 1 and per >= 64 and per % 64 == 0
                    assert splits * per >= cols and (splits == 1 or (splits - 1) * per < cols)
                    assert splits == 1 or per >= 1024
    assert plan(1, 1, 2500, 64, 4, 1024)[0] == 2  # a tiny grid: as many splits as the columns allow
    assert plan(4, 1, 65536, 64, 3, 1024)[0] >= 60  # MoCo, B=256: about the 64 the queue allows
    assert plan(256, 2, 16384, 64, 2, 1024)[0] == 1  # CLIP N=16384: 512 blocks a split fill the GPU
    # a bank of 2^20 keys for B=1024 (16 row blocks), 3 blocks/SM: 17 splits (2 blocks per SM's
    # slot, 69 % of the slots) before the occupancy query; the slots filled now
    splits = plan(16, 1, 2 ** 20, 64, 3, 1024)[0]
    assert fill(16, 1, splits, 3) >= 0.96 and fill(16, 1, 17, 3) < 0.7


def test_emulator_runs_correct_code_and_enforces_the_smem_limit():
    why = _cuda_emu.unavailable_reason()
    if why is not None:
        pytest.skip(f"the CUDA emulator is unavailable: {why}")
    ops = _cuda_emu.ops()
    assert ops.emulator_probe(4, 1024) == 0  # cudaSuccess, and the kernel's own check passed
    assert ops.emulator_probe(4, 64 * 1024) == 1  # cudaErrorInvalidValue: over 48 KiB without opt-in
