"""The Triton mixing kernels (triton/mixing.py) beyond the shared suites.

test_mining_mixing / test_ops / test_losses already run backend="triton" (under the interpreter on
CPU). Here: the kernels against the spec at every dtype and at shapes that cut the point blocks,
the feature chunks and the backward's point splits unevenly (s = 0, s' = 0, n_hard = 1, D not a
power of two and wider than one chunk); the custom ops (schemas, fake kernels, autograd
registration); and the AOT compile of the kernels. The hard negatives from the loss's own pass
(``lse_stats_topk``) are tested for every backend that has it in test_loss_topk.py.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from _helpers import queue_case as _lse_case
from conftest import FUSED_BACKENDS
from contrastive_kernels import _loss_topk as LT
from contrastive_kernels import reference
from contrastive_kernels._common import draw_mixing

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS,
                                reason="the Triton backend is unavailable")

if "triton" in FUSED_BACKENDS:
    M = importlib.import_module("contrastive_kernels.triton.mixing")
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


@pytest.mark.parametrize("d", [24, 200])
def test_mixed_lse_splits_are_combined(monkeypatch, d):
    """mixed_lse's point splits (online-softmax partials merged by _mixed_combine_kernel, over
    several row, feature and split blocks) give the one-split result, with the feature dim in one
    chunk (E in registers) and in four (E in memory)."""
    b = 5  # not a multiple of the combine kernel's row block
    q, neg, hard, draws = _inputs(b, 6, 40, 21, d, torch.float64)
    args = (q, q, neg, hard, draws.pair_index, draws.alpha, draws.query_index, draws.query_weight,
            torch.rand(b, dtype=torch.float64) + 1.0, torch.randn(b, dtype=torch.float64), [1.5, 0.5])
    one = M.mixed_lse_forward(*args)
    n_blocks = -(-40 // M.BLOCK_T) + -(-21 // M.BLOCK_T)
    for splits in (2, 3, n_blocks):
        monkeypatch.setattr(M, "_lse_splits", lambda b, n, dev, k=splits: k)
        for x, y in zip(M.mixed_lse_forward(*args), one):
            assert torch.allclose(x, y, rtol=1e-13, atol=1e-13), splits


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("d", [24, 200])
def test_mixed_lse_row_extra_is_one_more_term(monkeypatch, splits, d):
    """row_extra (the queue's log-sum-exp chained into the synthetic one): lse equals
    logsumexp(lse without it, x) and every gradient (q, row_scale, row_bias, x) is that formula's,
    in one split (the kernel merges x) and in several (the combine kernel does); also for a row
    whose x is -inf."""
    monkeypatch.setattr(M, "_lse_splits", lambda b, n, dev: splits)
    b = 5
    q, neg, hard, draws = _inputs(b, 6, 40, 21, d, torch.float64)
    x = torch.randn(b, dtype=torch.float64) * 4
    x[1] = float("-inf")
    scale, bias = torch.rand(b, dtype=torch.float64) + 1.0, torch.randn(b, dtype=torch.float64)
    wts = torch.linspace(0.5, 1.5, b, dtype=torch.float64)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, scale, bias, x)]
        lq, ls, lb, lx = leaves
        if fused:
            lse = M.mixed_lse(lq, q, neg, hard, draws, ls, lb, row_extra=lx)[0]
        else:
            lse = torch.logsumexp(torch.stack([M.mixed_lse(lq, q, neg, hard, draws, ls, lb)[0], lx]), 0)
        results.append([lse.detach()] + list(torch.autograd.grad((lse * wts).sum(), leaves)))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()


def test_mixed_lse_takes_one_or_two_gammas():
    q, neg, hard, draws = _inputs(3, 4, 5, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="1 or 2 gammas"):
        M.mixed_lse(q, q, neg, hard, draws, torch.ones(3), gammas=(1.0, 0.5, 0.25))


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
    scale, bias = torch.rand(5, dtype=torch.float64) + 1.0, torch.randn(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_lse.default,
                          args + (scale.requires_grad_(), bias.requires_grad_(), [1.5, 0.5]),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_lse.default,
                          args + (scale.detach(), None, [1.0]), test_utils=utils)
    extra = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_lse.default,
                          args + (scale.detach(), bias.detach(), [1.0], extra), test_utils=utils)
    q, k, a, col, rb, cb, gammas = _lse_case(7, 90, 8, torch.float32, "l2", (1.0, 0.5))
    thr = LT.sample_kth(q, k, 2, 5)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_topk_fwd.default,
                          (q.requires_grad_(), k, a.requires_grad_(), col, rb, cb, gammas, False,
                           thr, 48, 5), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lse_topk_kernel_lowers_the_sample_score(dtype):
    """The loss kernel lists exactly the columns with <q_i, k_j> >= lower_threshold(t)_i, the
    margin applied as it loads t (in the input dtype). Integer features: exact scores; t_i sits
    half a unit above a score of row i, so only the margin (2^-7 |t_i| >= 0.5) lets that column in."""
    T = M._topk
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 9, (9, 16), generator=g).to(dtype)
    k = torch.randint(-8, 9, (300, 16), generator=g).to(dtype)
    s = q.double() @ k.double().T
    v = s.topk(20, dim=1).values[:, -1].clamp(min=64.0)  # a score of the row, or 64
    t = (v + 0.5).to(dtype)
    lowered = LT.lower_threshold(t).double()
    want = s >= lowered[:, None]
    assert (want & (s < t.double()[:, None])).any(), "the margin must matter for some column"
    keys, count = M._infonce.lse_forward_topk(q, k, torch.ones(9), None, None, None, [1.0], True, t,
                                              300, 5, lists=True)[5:]
    assert torch.equal(count.long(), want.sum(1))
    listed = torch.zeros_like(want)
    for i in range(9):
        cols = T.decode_indices(keys[i, :int(count[i])])
        assert cols.unique().numel() == cols.numel()
        listed[i, cols] = True
    assert torch.equal(listed, want)


def test_candidate_merge_kernel_sorts_each_list_and_flags_rows():
    """_cand_merge_kernel on hand-made lists: row i's hard negatives are the columns of the
    n_hard largest of its first min(count_i, cap) keys (slots past them hold garbage that must
    not be read), in topk's order (ties: the lower column); the flag marks a short list, an
    overflow and a non-finite lse."""
    T, n_hard, cap = M._topk, 6, 20
    g = torch.Generator().manual_seed(3)
    count = torch.tensor([20, 9, 5, 21, 12, 6], dtype=torch.int32)
    scores = torch.randint(-4, 5, (6, cap), generator=g).float()  # ties on purpose
    cols = torch.stack([torch.randperm(1000, generator=g)[:cap] for _ in range(6)])
    keys = T.encode_keys(scores, cols)
    garbage = torch.arange(cap)[None, :] >= count[:, None].clamp(max=cap)
    keys = keys.masked_fill(garbage, 2**62)  # larger than any written key
    lse = torch.zeros(2, 6)
    lse[1, 4] = float("nan")
    hard, inexact = torch.empty(6, n_hard, dtype=torch.int64), torch.empty(6, dtype=torch.int32)
    M._infonce._cand_merge_kernel[(6,)](keys, count, lse, hard, inexact, 6, cap, n_hard,
                                        N_GAMMA=2, WIDTH=32)
    for i in range(6):
        n = min(int(count[i]), cap)
        # topk's order: score descending, then the lower column
        order = sorted(range(n), key=lambda j: (-scores[i, j].item(), cols[i, j].item()))
        want = cols[i, order[:n_hard]]
        assert torch.equal(hard[i, :want.numel()], want), i
    assert inexact.tolist() == [0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_fake_kernels_give_the_real_shapes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = tuple(t.detach() for t in _op_args(dtype))
    calls = [(ops.triton_mixed_dots_fwd, args), (ops.triton_mix, (args[1],) + args[2:])]
    u, nrm = ops.triton_mixed_dots_fwd(*args)
    calls.append((ops.triton_mixed_dots_bwd, (u, nrm) + args[1:] + (dtype,)))
    scale = torch.rand(5, dtype=u.dtype) + 1.0
    calls.append((ops.triton_mixed_lse, args + (scale, None, [1.5, 0.5])))
    if dtype != torch.float64:
        q, k, a, col, rb, cb, gammas = _lse_case(7, 90, 8, dtype)
        calls.append((ops.triton_lse_topk_fwd, (q, k, a, col, rb, cb, gammas, True,
                                                LT.sample_kth(q, k, 2, 5), 32, 5)))
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
    _aot("mixed_dots_fwd[D=768],mixed_dots_bwd[D=128],mix[D=768],mixed_lse[")


@pytest.mark.slow
def test_aot_compile_of_the_candidate_mode():
    """The loss kernel's candidate mode (every autotune config for fp32 on sm_90, the fallback
    config on sm_80): about a minute."""
    _aot("lse_fwd[bank,cand,2 gammas,l2", arch="80,90")
