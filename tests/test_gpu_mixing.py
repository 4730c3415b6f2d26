"""Hard-negative mixing with the Triton kernels on a CUDA device (``make test-gpu``).

The hard negatives taken from the loss kernel's own pass must be exactly ``topk_similarity``'s
(set and order) at the MoCHi shapes (B=256, D=128, n_hard=1024, K=65536 and 2^20) in bf16, fp16
and fp32, with the autotuned tiles too; info_nce(mixing=) against the explicit path under the
twice-the-eager-error rule; the mixing kernels (mix, mixed_dots, mixed_lse) at big shapes and past 2^31 elements; opcheck
with the compile-based check, torch.compile(fullgraph=True) through mixed_dots and mixed_lse,
reproducibility.
"""
import importlib
import warnings

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import _loss_topk as LT
from contrastive_kernels import functional, reference
from contrastive_kernels._common import draw_mixing

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
B, D, N_HARD, S, SQ = 256, 128, 1024, 512, 256


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    why = functional.backend_unavailable_reason("triton", torch.device(DEV))
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    infonce = importlib.import_module("contrastive_kernels.triton.infonce")
    infonce.set_autotune(False)  # correctness here; one test below autotunes
    yield
    infonce.set_autotune(True)


@pytest.fixture
def mixing_module(monkeypatch):
    m = importlib.import_module("contrastive_kernels.triton.mixing")
    monkeypatch.setattr(LT, "STATS", {"fused_calls": 0, "separate_calls": 0, "fallback_rows": 0})
    monkeypatch.setattr(LT, "_checked_keys", {})
    return m


def _unit(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return x.to(device=DEV, dtype=dtype)


def _fused_hard(m, q, queue, n_hard):
    scale = torch.full((q.shape[0],), 1 / 0.07, device=DEV)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m.lse_stats_topk(q, queue, scale, None, None, None, gammas=(1.0,), n_hard=n_hard)
    # the first-call comparison with topk must find no difference
    assert not [w for w in caught if "differ from topk_similarity" in str(w.message)]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [65536, 2**20])
def test_loss_pass_hard_negatives_equal_topk(mixing_module, dtype, k):
    q, queue = _unit(B, D, 1, dtype).requires_grad_(), _unit(k, D, 2, dtype)
    row, hard = _fused_hard(mixing_module, q, queue, N_HARD)
    want = ck.topk_similarity(q.detach(), queue, N_HARD, backend="triton").indices
    assert torch.equal(hard, want)
    assert LT.STATS["fused_calls"] == 1
    assert LT.STATS["fallback_rows"] <= 2  # the sample threshold rarely misses
    assert list(LT._checked_keys.values()) == [True]
    lse = torch.logsumexp(q.detach().double() @ queue.double().T / 0.07, 1)
    assert torch.allclose(row[0].double(), lse, rtol=1e-3, atol=1e-2)


def test_with_autotuned_tiles(mixing_module):
    """The autotuner may pick any tile shape for the candidate mode: still topk's hard set."""
    infonce = importlib.import_module("contrastive_kernels.triton.infonce")
    infonce.set_autotune(True)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            q, queue = _unit(B, D, 3, dtype).requires_grad_(), _unit(2**20, D, 4, dtype)
            for _ in range(2):  # the first call autotunes
                _, hard = _fused_hard(mixing_module, q, queue, N_HARD)
            assert torch.equal(hard, ck.topk_similarity(q.detach(), queue, N_HARD,
                                                        backend="triton").indices)
    finally:
        infonce.set_autotune(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_mixing_loss_twice_eager(mixing_module, dtype, similarity):
    """info_nce(mixing=) at the MoCo shape: value and query gradient against the fp64 loss on the
    same hard set and draws err at most twice as much as the explicit path run eagerly in the
    input dtype (materialized points in that dtype)."""
    k_rows = 65536
    q, p, queue = _unit(B, D, 5, dtype), _unit(B, D, 6, dtype), _unit(k_rows, D, 7, dtype)
    hard = ck.topk_similarity(q, queue, N_HARD, backend="triton").indices

    def loss(backend, q_, p_, queue_, synthetic=None):
        q_ = q_.detach().requires_grad_()
        kw = dict(temperature=0.07, similarity=similarity, reduction="none", backend=backend)
        if synthetic is None:
            out = ck.info_nce(q_, p_, queue_, mixing=ck.Mixing(N_HARD, S, SQ,
                                                               torch.Generator().manual_seed(0)),
                              **kw)
        else:
            out = ck.info_nce(q_, p_, queue_, extra_negatives=synthetic, **kw)
        w = torch.linspace(0.5, 1.5, out.shape[0], device=DEV, dtype=out.dtype)
        return out.detach().double(), torch.autograd.grad((out * w).sum(), q_)[0].double()

    fused = loss("triton", q, p, queue)
    assert LT.STATS["fused_calls"] == 1
    draws_gen = torch.Generator().manual_seed(0)
    synth64 = reference.mix_hard_negatives(q.double(), queue.double(), hard, S, SQ,
                                           generator=draws_gen)
    exact = loss("reference", q.double(), p.double(), queue.double(), synth64)
    synth = ck.mix_hard_negatives(q, queue, hard, S, SQ, generator=torch.Generator().manual_seed(0),
                                  backend="reference")
    eager = loss("reference", q, p, queue, synth)
    for got, ref_low, ref64 in zip(fused, eager, exact):
        err = (got - ref64).abs().max().item()
        err_eager = (ref_low - ref64).abs().max().item()
        assert err <= 2 * err_eager + 1e-5 * (1 + ref64.abs().max().item()), (err, err_eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mix_and_mixed_dots_big(dtype):
    m = importlib.import_module("contrastive_kernels.triton.mixing")
    q, neg = _unit(B, 768, 8, dtype), _unit(65536, 768, 9, dtype)
    hard = torch.randint(0, 65536, (B, N_HARD), device=DEV)
    draws = draw_mixing(B, N_HARD, S, SQ, torch.Generator().manual_seed(1), torch.device(DEV))
    points = m.mix(q, neg, hard, draws)
    want = reference.mix_points(q, neg, hard, draws)
    assert torch.allclose(points.float(), want.float(), atol=2 * torch.finfo(dtype).eps)
    qq = q.clone().requires_grad_()
    u = m.mixed_dots(qq, q, neg, hard, draws)
    g = torch.randn_like(u)
    dq, = torch.autograd.grad((u * g).sum(), qq)
    h64 = reference.mix_points(q.double(), neg.double(), hard, draws)
    u64 = torch.einsum("bd,btd->bt", q.double(), h64)
    dq64 = torch.einsum("bt,btd->bd", g.double(), h64)
    u_eager = torch.einsum("bd,btd->bt", q, want).double()
    dq_eager = torch.einsum("bt,btd->bd", g.to(dtype), want).double()
    for got, eager, exact in ((u, u_eager, u64), (dq, dq_eager, dq64)):
        err = (got.double() - exact).abs().max().item()
        assert err <= 2 * (eager - exact).abs().max().item() + 1e-5 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,b", [(128, B), (768, B), (128, 24)])
def test_mixed_lse_big(dtype, d, b):
    """mixed_lse at the MoCHi shape (one feature chunk: E in registers; 768: E in memory; 24 rows:
    the launcher splits the points and combines partials): the lse per gamma and the gradients of
    q, row_scale and row_bias err at most twice as much as the mixed_dots path against fp64."""
    m = importlib.import_module("contrastive_kernels.triton.mixing")
    q, neg = _unit(b, d, 20, dtype), _unit(65536, d, 21, dtype)
    hard = torch.randint(0, 65536, (b, N_HARD), device=DEV)
    draws = draw_mixing(b, N_HARD, S, SQ, torch.Generator().manual_seed(6), torch.device(DEV))
    gammas = [1.5, 0.5]
    a0 = torch.full((b,), 1 / 0.07, device=DEV)
    c0 = torch.randn(b, device=DEV)
    w = torch.rand(2, b, device=DEV)

    def run(fused, qd, negd, dt):
        qq, a, c = qd.clone().requires_grad_(), a0.to(dt).requires_grad_(), c0.to(dt).requires_grad_()
        if fused:
            lse = m.mixed_lse(qq, qd, negd, hard, draws, a, c, gammas=gammas)
        else:
            u = torch.einsum("bd,btd->bt", qq.to(dt), reference.mix_points(qd, negd, hard, draws).to(dt))
            lse = torch.stack([torch.logsumexp(g * (u * a[:, None] + c[:, None]), 1) for g in gammas])
        return [lse.detach().double()] + [x.double() for x in torch.autograd.grad((lse * w.to(dt)).sum(), [qq, a, c])]

    got = run(True, q, neg, torch.float32)
    eager = run(False, q, neg, torch.float32)
    exact = run(False, q.double(), neg.double(), torch.float64)
    for x, e, ref in zip(got, eager, exact):
        err = (x - ref).abs().max().item()
        assert err <= 2 * (e - ref).abs().max().item() + 1e-5 * (1 + ref.abs().max().item()), (err,)


def test_int64_offsets_past_2_31_elements():
    """A (2^24 + 64) x 128 bf16 bank (2^31 + 8192 elements): hard rows at its end."""
    m = importlib.import_module("contrastive_kernels.triton.mixing")
    n = 2**24 + 64
    neg = torch.empty((n, D), dtype=torch.bfloat16, device=DEV).normal_()
    q = _unit(4, D, 10, torch.bfloat16)
    hard = torch.randint(n - 200, n, (4, 16), device=DEV)
    draws = draw_mixing(4, 16, 9, 5, torch.Generator().manual_seed(2), torch.device(DEV))
    assert torch.allclose(m.mix(q, neg, hard, draws).float(),
                          reference.mix_points(q, neg, hard, draws).float(), atol=1e-2)
    u = m.mixed_dots(q, q, neg, hard, draws)
    h = reference.mix_points(q.float(), neg[n - 200:].float(), hard - (n - 200), draws)
    assert torch.allclose(u, torch.einsum("bd,btd->bt", q.float(), h), atol=1e-3)


def test_nt_xent_mixing_bf16():
    z1, z2 = _unit(512, D, 11, torch.bfloat16), _unit(512, D, 12, torch.bfloat16)

    def run(backend, a, b):
        return ck.nt_xent(a, b, temperature=0.2, backend=backend,
                          mixing=ck.Mixing(64, 32, 16, torch.Generator().manual_seed(3)))

    got, want = run("triton", z1, z2), run("reference", z1.double(), z2.double())
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())


def test_opcheck_with_aot_dispatch():
    q, neg = _unit(32, 96, 13, torch.float32), _unit(500, 96, 14, torch.float32)
    hard = torch.randint(0, 500, (32, 40), device=DEV)
    d = draw_mixing(32, 40, 24, 9, torch.Generator().manual_seed(4), torch.device(DEV))
    args = (q.requires_grad_(), q.detach(), neg, hard, d.pair_index, d.alpha, d.query_index,
            d.query_weight)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_dots_fwd.default, args)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mix.default,
                          (q.detach(),) + args[2:])
    scale = torch.rand(32, device=DEV).add_(1.0).requires_grad_()
    bias = torch.randn(32, device=DEV).requires_grad_()
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_lse.default,
                          args + (scale, bias, [1.5, 0.5]))
    extra = torch.randn(32, device=DEV).requires_grad_()  # the queue's lse chained in
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_mixed_lse.default,
                          args + (scale, bias, [1.0], extra))


def test_torch_compile_fullgraph_mixed_dots():
    q, neg = _unit(64, D, 15, torch.bfloat16), _unit(4096, D, 16, torch.bfloat16)
    hard = torch.randint(0, 4096, (64, 128), device=DEV)
    d = draw_mixing(64, 128, 48, 16, torch.Generator().manual_seed(5), torch.device(DEV))

    def f(q):  # the op itself (the family function imports ops lazily; dynamo traces no imports)
        u = torch.ops.contrastive_kernels.triton_mixed_dots_fwd(
            q, q.detach(), neg, hard, d.pair_index, d.alpha, d.query_index, d.query_weight)[0]
        return (u ** 2).sum()

    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    eager = f(q1)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(q2)
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert torch.allclose(torch.autograd.grad(compiled, q2)[0].float(),
                          torch.autograd.grad(eager, q1)[0].float(), rtol=1e-2, atol=1e-3)


def test_torch_compile_fullgraph_mixed_lse():
    q, neg = _unit(64, D, 22, torch.bfloat16), _unit(4096, D, 23, torch.bfloat16)
    hard = torch.randint(0, 4096, (64, 128), device=DEV)
    d = draw_mixing(64, 128, 48, 16, torch.Generator().manual_seed(8), torch.device(DEV))
    scale = torch.full((64,), 1 / 0.07, device=DEV)

    def f(q):
        lse = torch.ops.contrastive_kernels.triton_mixed_lse(
            q, q.detach(), neg, hard, d.pair_index, d.alpha, d.query_index, d.query_weight, scale,
            None, [1.0])[0]
        return lse.sum()

    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    eager = f(q1)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(q2)
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert torch.allclose(torch.autograd.grad(compiled, q2)[0].float(),
                          torch.autograd.grad(eager, q1)[0].float(), rtol=1e-2, atol=1e-3)


def test_repeated_runs_are_bitwise_reproducible():
    """Candidate slots are reserved with atomics (order varies), the merge is by key: the hard
    set, the loss and the gradient repeat bit for bit with equally seeded generators."""
    q, p, queue = _unit(B, D, 17, torch.bfloat16), _unit(B, D, 18, torch.bfloat16), \
        _unit(65536, D, 19, torch.bfloat16)
    outs = []
    for _ in range(2):
        qq = q.clone().requires_grad_()
        loss = ck.info_nce(qq, p, queue, temperature=0.07, backend="triton",
                           mixing=ck.Mixing(N_HARD, S, SQ, torch.Generator(DEV).manual_seed(7)))
        outs.append((loss.detach(), torch.autograd.grad(loss, qq)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
