"""The Triton mixing kernels (triton/mixing.py) beyond the shared suites.

test_mining_mixing / test_ops / test_losses already run backend="triton" (under the interpreter on
CPU). Here: the kernels against the spec at every dtype and at shapes that cut the point blocks,
the feature chunks and the backward's point splits unevenly (s = 0, s' = 0, n_hard = 1, D not a
power of two and wider than one chunk); the fused top-k of the loss pass (``lse_stats_topk``)
against the separate top-k (random and tied scores, every similarity's affine form, both
estimators, gradients, forced sample misses and overflows, non-finite rows, the first-call check);
the custom ops (schemas, fake kernels, autograd registration); and the AOT compile of the kernels.
"""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import FUSED_BACKENDS
from contrastive_kernels import reference
from contrastive_kernels._common import draw_mixing

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS,
                                reason="the Triton backend is unavailable")

if "triton" in FUSED_BACKENDS:
    M = importlib.import_module("contrastive_kernels.triton.mixing")
    INF = importlib.import_module("contrastive_kernels.triton.infonce")
    TK = importlib.import_module("contrastive_kernels.triton.topk")
    from contrastive_kernels import ops
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (B, n_hard, s, s', D): several point blocks (BLOCK_T is 8 under the interpreter), a last block
# cut short, one kind of point missing, a single hard negative, D over one feature chunk
SHAPES = [(5, 7, 13, 9, 24), (3, 1, 0, 5, 20), (4, 9, 11, 0, 40), (6, 4, 17, 3, 200)]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _inputs(b, n_hard, s, sq, d, dtype, n_neg=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    neg = torch.randn(n_neg, d, generator=g, dtype=torch.float64).to(dtype)
    hard = torch.randint(0, n_neg, (b, n_hard), generator=g)
    draws = draw_mixing(b, n_hard, s, sq, torch.Generator().manual_seed(seed + 1),
                        torch.device("cpu"))
    return q, neg, hard, draws


@pytest.fixture(autouse=True)
def _narrow_chunks(monkeypatch):
    """Feature chunks of 64: D = 200 takes four of them."""
    if "triton" in FUSED_BACKENDS:
        monkeypatch.setattr(M, "BLOCK_D_MAX", 64)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_mix_matches_spec(shape, dtype):
    q, neg, hard, draws = _inputs(*shape, dtype)
    got = M.mix(q, neg, hard, draws)
    want = reference.mix_points(q, neg, hard, draws)
    assert got.dtype == dtype and got.shape == want.shape == (shape[0], shape[2] + shape[3], shape[4])
    if dtype in ULP:  # the same fp32 math; the final rounding to 16 bits may differ by one ulp
        assert (got.double() - want.double()).abs().max() <= ULP[dtype]
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert torch.allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mixed_dots_value_and_gradient(shape, dtype):
    """u = <q, h> and dq = sum_t g_t h_t against the materialized points (fp64 spec); the mix
    query differs from q (NT-Xent mixes the normalized view)."""
    q, neg, hard, draws = _inputs(*shape, dtype)
    mq = torch.nn.functional.normalize(q, dim=1)
    q = q.clone().requires_grad_()
    u = M.mixed_dots(q, mq, neg, hard, draws)
    assert u.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    h = reference.mix_points(mq.double(), neg.double(), hard, draws)
    want = torch.einsum("bd,btd->bt", q.detach().double(), h)
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dq, = torch.autograd.grad((u * w.to(u.dtype)).sum(), q)
    want_dq = torch.einsum("bt,btd->bd", w, h)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = 1.0 + want.abs().max().item() if want.numel() else 1.0
    assert (u.double() - want).abs().max().item() <= tol * scale if want.numel() else u.numel() == 0
    assert dq.dtype == dtype
    assert (dq.double() - want_dq).abs().max().item() <= tol * (1.0 + want_dq.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_dots_half_precision_twice_eager(dtype):
    """Half-precision inputs: u and dq err at most twice as much as eager PyTorch in that dtype
    (materialized points, einsum) against the fp64 spec on the rounded inputs."""
    shape = (6, 5, 19, 7, 48)
    q, neg, hard, draws = _inputs(*shape, dtype)
    q = q.requires_grad_()
    u = M.mixed_dots(q, q.detach(), neg, hard, draws)
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dq, = torch.autograd.grad((u * w.float()).sum(), q)
    h64 = reference.mix_points(q.detach().double(), neg.double(), hard, draws)
    u64 = torch.einsum("bd,btd->bt", q.detach().double(), h64)
    dq64 = torch.einsum("bt,btd->bd", w, h64)
    h = reference.mix_points(q.detach(), neg, hard, draws)  # eager: points in the input dtype
    u_eager = torch.einsum("bd,btd->bt", q.detach(), h)
    dq_eager = torch.einsum("bt,btd->bd", w.to(dtype), h)
    for got, eager, exact in ((u, u_eager, u64), (dq, dq_eager, dq64)):
        err = (got.double() - exact).abs().max().item()
        err_eager = (eager.double() - exact).abs().max().item()
        assert err <= 2 * err_eager + 1e-5 * (1 + exact.abs().max().item()), (err, err_eager)


def test_empty_point_sets_and_rows():
    q, neg, hard, draws = _inputs(3, 4, 0, 0, 16, torch.float32)
    assert M.mix(q, neg, hard, draws).shape == (3, 0, 16)
    q = q.requires_grad_()
    u = M.mixed_dots(q, q.detach(), neg, hard, draws)
    assert u.shape == (3, 0)
    dq, = torch.autograd.grad(u.sum(), q, allow_unused=True, materialize_grads=True)
    assert torch.equal(dq, torch.zeros_like(q))


def test_backward_splits_are_summed(monkeypatch):
    """The backward's point splits (partials summed on the host) give the one-split result."""
    q, neg, hard, draws = _inputs(4, 6, 40, 21, 24, torch.float64)
    args = (hard, draws.pair_index, draws.alpha, draws.query_index, draws.query_weight)
    u, nrm = M.mixed_dots_forward(q, q, neg, *args)
    g = torch.randn(u.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    two = M.mixed_dots_backward(g, nrm, q, neg, *args, torch.float64)
    monkeypatch.setattr(M, "INTERPRETER", False)  # CPU tensors: the one-split plan
    one = M.mixed_dots_backward(g, nrm, q, neg, *args, torch.float64)
    assert torch.allclose(one, two, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# the hard negatives from the loss's own pass (lse_stats_topk)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def stats(monkeypatch):
    s = {"fused_calls": 0, "separate_calls": 0, "fallback_rows": 0}
    monkeypatch.setattr(M, "STATS", s)
    monkeypatch.setattr(M, "_checked_keys", {})
    return s


def _lse_case(b, n, d, dtype, affine="dot", gammas=(1.0,), seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact scores with many ties
        q = torch.randint(-1, 2, (b, d), generator=g).to(dtype)
        k = torch.randint(-1, 2, (n, d), generator=g).to(dtype)
    else:
        q = torch.randn(b, d, generator=g).to(dtype)
        k = torch.randn(n, d, generator=g).to(dtype)
    a = torch.rand(b, generator=g) + 2.0
    col = torch.rand(n, generator=g) + 0.5 if affine == "cosine" else None
    rb = -torch.rand(b, generator=g) if affine == "l2" else None
    cb = -torch.rand(n, generator=g) if affine == "l2" else None
    return q, k, a, col, rb, cb, list(gammas)


def _separate(q, k, a, col, rb, cb, gammas, n_hard):
    row = INF.lse_stats(q, k, a, col, rb, cb, gammas=gammas)[0]
    return row, TK.topk(q.detach(), k.detach(), n_hard, similarity="dot")[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("affine,gammas", [("dot", (1.0,)), ("cosine", (1.0,)),
                                           ("l2", (1.5, 0.5))])
@pytest.mark.parametrize("n,n_hard", [(50, 12), (700, 12), (700, 45), (40, 40)])
def test_fused_topk_equals_separate_topk(stats, dtype, affine, gammas, n, n_hard):
    """The hard set AND its order equal topk's; the LSE equals lse_stats'. Queues of 50/40 rows
    take the whole queue as the threshold sample (f = 1), 700 rows a 1/7 or 1/2 sample;
    n_hard = K keeps every row."""
    case = _lse_case(19, n, 24, dtype, affine, gammas, seed=n + n_hard)
    row, hard = M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=n_hard)
    want_row, want_hard = _separate(*case, n_hard)
    assert torch.equal(hard, want_hard)
    assert torch.allclose(row, want_row, rtol=1e-6, atol=1e-5)
    assert stats == {"fused_calls": 1, "separate_calls": 0, "fallback_rows": 0}


def test_fused_topk_ties(stats):
    """Integer features: many equal scores; ties go to the lower index, as in topk."""
    case = _lse_case(21, 600, 6, torch.float32, integer=True, seed=3)
    for n_hard in (1, 30, 200):
        _, hard = M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=n_hard)
        assert torch.equal(hard, _separate(*case, n_hard)[1])
    # a threshold on a heavily tied value may overflow a row's list (then topk redoes the row):
    # nearly all rows must still come from the fused path
    assert stats["fused_calls"] == 3 and stats["fallback_rows"] <= 2


@pytest.mark.parametrize("queue_grad", [False, True])
def test_fused_topk_gradients(stats, queue_grad):
    """The custom op's autograd: row-only (MoCo) and recompute (queue with a gradient) backward
    give lse_stats' gradients."""
    q, k, a, col, rb, cb, gammas = _lse_case(13, 300, 16, torch.float32, "l2", (1.3, 0.3), seed=4)
    w = torch.rand(2, 13, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *t: M.lse_stats_topk(*t, gammas=gammas, n_hard=20)[0],
               lambda *t: INF.lse_stats(*t, gammas=gammas)[0]):
        leaves = [t.detach().clone().requires_grad_(r) for t, r in
                  ((q, True), (k, queue_grad), (a, True), (rb, True))]
        out = fn(leaves[0], leaves[1], leaves[2], None, leaves[3], cb)
        need = [t for t in leaves if t.requires_grad]
        grads.append(torch.autograd.grad((out * w).sum(), need))
    for x, y in zip(*grads):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert stats["fused_calls"] == 1


def test_threshold_misses_fall_back_to_topk(stats, monkeypatch):
    """A threshold above every score (no candidate) and a capacity below the count (overflow):
    every row is recomputed by topk, and the result is still exact."""
    case = _lse_case(17, 500, 12, torch.float32, seed=5)
    want = _separate(*case, 25)[1]
    monkeypatch.setattr(M, "sample_threshold", lambda q, k, f, ks: torch.full((q.shape[0],), 1e30))
    assert torch.equal(M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=25)[1], want)
    assert stats["fallback_rows"] == 17
    monkeypatch.undo()
    monkeypatch.setattr(M, "STATS", stats)
    plan = M.candidate_plan
    monkeypatch.setattr(M, "candidate_plan", lambda n, k: plan(n, k)[:2] + (k,))  # capacity n_hard
    monkeypatch.setattr(M, "sample_threshold", lambda q, k, f, ks: torch.full((q.shape[0],), -1e30))
    assert torch.equal(M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=25)[1], want)
    assert stats["fallback_rows"] == 34


def test_nonfinite_rows_fall_back(stats):
    """A NaN query row has a non-finite LSE: that row is recomputed by topk (the others stay
    fused), and the hard negatives equal topk's for every row."""
    q, k, a, col, rb, cb, gammas = _lse_case(11, 400, 8, torch.float32, seed=6)
    q[3, 2] = float("nan")
    row, hard = M.lse_stats_topk(q, k, a, col, rb, cb, gammas=gammas, n_hard=10)
    assert torch.isnan(row[0, 3]) and torch.isfinite(row[0, torch.arange(11) != 3]).all()
    assert torch.equal(hard, TK.topk(q, k, 10)[1])
    assert stats["fallback_rows"] == 1


def test_first_call_check_disables_a_mismatching_key(stats, monkeypatch):
    """Should the loss kernel's scores ever differ from the top-k kernel's (another GPU, another
    compiler), the first call of a shape key sees it, warns, returns topk's answer and sends that
    key to the separate top-k from then on."""
    case = _lse_case(9, 300, 8, torch.float32, seed=7)
    real = TK.topk

    def shuffled(*a, **kw):  # a "top-k kernel" that orders differently
        v, i = real(*a, **kw)
        return v.flip(1), i.flip(1)

    monkeypatch.setattr(M._topk, "topk", shuffled)
    with pytest.warns(RuntimeWarning, match="differ from topk_similarity"):
        _, hard = M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=15)
    assert torch.equal(hard, shuffled(case[0], case[1], 15)[1])
    assert list(M._checked_keys.values()) == [False]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again = M.lse_stats_topk(*case[:6], gammas=case[6], n_hard=15)
    assert not [w for w in caught if "differ from topk_similarity" in str(w.message)]
    assert torch.equal(again, hard) and stats["separate_calls"] == 1


def test_when_the_fused_path_is_not_taken(stats, monkeypatch):
    q, k, a, col, rb, cb, gammas = _lse_case(5, 60, 8, torch.float64)
    assert "float64" in M.fused_topk_reason(q, k, 5, 1)
    assert M.fused_topk_reason(q.bfloat16(), k.bfloat16(), 5, 1) is not None  # interpreter bf16
    assert M.fused_topk_reason(q.float(), k.float(), 5, 1) is None
    monkeypatch.setattr(M, "FUSED_TOPK", False)
    assert M.fused_topk_reason(q.float(), k.float(), 5, 1) == "CK_MIXING_FUSED_TOPK=0"
    row, hard = M.lse_stats_topk(q, k, a, col, rb, cb, gammas=gammas, n_hard=5)
    assert torch.equal(hard, TK.topk(q, k, 5)[1]) and stats["separate_calls"] == 1


def test_candidate_plan():
    for n, k in [(65536, 1024), (2**20, 1024), (700, 12), (40, 40), (4096, 1)]:
        f, k_s, cap = M.candidate_plan(n, k)
        n_sample = -(-n // f)
        assert 1 <= f and 1 <= k_s <= n_sample and k <= cap <= n
        assert k_s >= k * n_sample / n  # the sample's share of the top n_hard, plus margin
    assert M.candidate_plan(2**20, 1024)[0] == 128  # a 8192-row sample at the MoCHi shape


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------


def _op_args(dtype=torch.float64):
    q, neg, hard, draws = _inputs(5, 6, 9, 4, 12, dtype)
    return (q.requires_grad_(), q.detach().clone(), neg, hard, draws.pair_index, draws.alpha,
            draws.query_index, draws.query_weight)


def test_opcheck_mixing_ops():
    """torch.library.opcheck's schema, fake-tensor and autograd-registration checks (the
    compile-based aot_dispatch check needs a GPU: tests/test_gpu_mixing.py)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = _op_args()
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_dots_fwd.default, args,
                          test_utils=utils)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mix.default,
                          (args[1],) + args[2:], test_utils=utils)
    u, nrm = ops.triton_mixed_dots_fwd(*args)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_dots_bwd.default,
                          (torch.ones_like(u), nrm) + args[1:] + (torch.float64,), test_utils=utils)
    q, k, a, col, rb, cb, gammas = _lse_case(7, 90, 8, torch.float32, "l2", (1.0, 0.5))
    thr = M.sample_threshold(q, k, 2, 5)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_topk_fwd.default,
                          (q.requires_grad_(), k, a.requires_grad_(), col, rb, cb, gammas, False,
                           thr, 48), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_fake_kernels_give_the_real_shapes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = tuple(t.detach() for t in _op_args(dtype))
    calls = [(ops.triton_mixed_dots_fwd, args), (ops.triton_mix, (args[1],) + args[2:])]
    u, nrm = ops.triton_mixed_dots_fwd(*args)
    calls.append((ops.triton_mixed_dots_bwd, (u, nrm) + args[1:] + (dtype,)))
    if dtype != torch.float64:
        q, k, a, col, rb, cb, gammas = _lse_case(7, 90, 8, dtype)
        calls.append((ops.triton_lse_topk_fwd, (q, k, a, col, rb, cb, gammas, True,
                                                M.sample_threshold(q, k, 2, 5), 32)))
    for op, call_args in calls:
        real = op(*call_args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(t) if torch.is_tensor(t) else t for t in call_args])
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert len(real) == len(fake)
        for f, r in zip(fake, real):
            assert f.shape == r.shape and f.dtype == r.dtype, op


# ------------------------------------------------------------------------------------------------
# ahead-of-time compile (no GPU needed)
# ------------------------------------------------------------------------------------------------


def _aot(only, arch="90"):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "scripts/triton_aot_check.py", "--arch", arch, "--jobs", "1", "--only",
         only], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COMPILE ERROR" not in proc.stdout and " ok in " in proc.stdout


def test_aot_compile_of_the_mixing_kernels():
    """The mixing kernels compile for sm_90 (the errors the interpreter cannot see); the full
    report over every spec and config is ``make triton-check``."""
    _aot("mixed_dots_fwd[D=768],mixed_dots_bwd[D=128],mix[D=768]")


@pytest.mark.slow
def test_aot_compile_of_the_candidate_mode():
    """The loss kernel's candidate mode (every autotune config for fp32 on sm_90, the fallback
    config on sm_80): about a minute."""
    _aot("lse_fwd[bank,cand,2 gammas,l2", arch="80,90")
