"""The family ops of each fused backend against the spec in reference.py, directly: lse_stats
with every combination of inputs, masks, labels and column statistics (value and the gradient of
every input), top-k, and mixing. Plus fp64 gradcheck of the chunked backend."""

import pytest
import torch

from contrastive_kernels import chunked, functional, reference
from contrastive_kernels._common import draw_mixing
from _helpers import LSE_EXCLUDES, LSE_LABELS, lse_case, lse_inputs, lse_options


def _ops(name):
    return functional.resolve_backend(name, "loss", torch.device("cpu"))




@pytest.mark.parametrize("labels", LSE_LABELS)
@pytest.mark.parametrize("exclude", LSE_EXCLUDES)
@pytest.mark.parametrize("gammas", [(1.0,), (1.5, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("col_lse", [False, True])
@pytest.mark.parametrize("grad_side", ["rows", "both"])
def test_lse_stats_matches_spec(backend, labels, exclude, gammas, col_lse, grad_side):
    b, n, d = 9, 23, 5
    torch.manual_seed(0)
    inputs = lse_inputs(b, n, d)
    mask, kw = lse_options(b, n, exclude, labels, gammas, col_lse, grad_side)
    want = lse_case(reference.lse_stats, inputs, mask, **kw)
    got = lse_case(_ops(backend).lse_stats, inputs, mask, **kw)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10), (i, (g - w).abs().max())


@pytest.mark.parametrize("b,n,d", [(1, 1, 1), (2, 0, 3), (5, 1000, 3), (33, 65, 17)])
def test_lse_stats_shapes(backend, b, n, d):
    inputs = lse_inputs(b, n, d, col_scale=False, biases=False)
    for mask in ([True, False, True, False, False, False], [True, True, True, False, False, False]):
        want = lse_case(reference.lse_stats, inputs, mask, want_col_lse=n > 0)
        got = lse_case(_ops(backend).lse_stats, inputs, mask, want_col_lse=n > 0)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-10) or (n == 0 and torch.equal(g, w))


def test_lse_stats_row_without_columns(backend):
    """A row whose only column is excluded: log-sum-exp -inf, and finite gradients elsewhere."""
    q, k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(1, 4, dtype=torch.float64)
    a = torch.ones(3, dtype=torch.float64)
    row, *_ = _ops(backend).lse_stats(q, k, a, exclude=torch.tensor([[0], [-1], [-1]]))
    assert row[0, 0] == -float("inf") and torch.isfinite(row[0, 1:]).all()
    grad, = torch.autograd.grad(row[0, 1:].sum(), q)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()


@pytest.mark.parametrize("row_only", [False, True])
def test_chunked_gradcheck(row_only):
    torch.manual_seed(0)
    q, k, a, b, c, d = lse_inputs(4, 11, 3)
    q.requires_grad_(), a.requires_grad_(), c.requires_grad_()
    if not row_only:
        k.requires_grad_(), b.requires_grad_(), d.requires_grad_()
    labels = torch.tensor([0, 1, 0, 2]), torch.arange(11) % 3
    old = chunked.set_memory_budget(512)  # several chunks
    try:
        def f(q, k, a, b, c, d):
            row, ps, _, col = chunked.lse_stats(q, k, a, b, c, d, gammas=(1.3, 0.4),
                                                exclude=torch.tensor([[1], [-1], [3], [10]]),
                                                q_labels=labels[0], k_labels=labels[1],
                                                want_col_lse=not row_only)
            return row, ps, col
        assert torch.autograd.gradcheck(f, (q, k, a, b, c, d))
    finally:
        chunked.set_memory_budget(old)


def test_chunked_loss_gradcheck():
    import contrastive_kernels as ck

    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, p, queue, t: ck.info_nce(q, p, queue, temperature=t, similarity="cosine",
                                           in_batch_negatives=True, tau_plus=0.1, beta=0.5,
                                           backend="chunked"), (q, p, queue, t))
    assert torch.autograd.gradcheck(
        lambda q, p, t: ck.clip_loss(q, p, t, similarity="l2", backend="chunked"), (q, p, t))
    assert torch.autograd.gradcheck(
        lambda q, t: ck.sup_con(q, torch.tensor([0, 1, 0, 1, 1]), temperature=t, backend="chunked"), (q, t))


@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 300, 7), (17, 1000, 1000), (3, 70, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_topk_matches_spec(backend, similarity, m, n, k, dtype):
    q, bank = torch.randn(m, 8).to(dtype), torch.randn(n, 8).to(dtype)
    want_v, want_i = reference.topk_similarity(q, bank, k, similarity=similarity)
    got_v, got_i = _ops(backend).topk(q, bank, k, similarity=similarity, exclude_index=None,
                                      query_labels=None, bank_labels=None)
    assert got_i.dtype == torch.int64 and got_i.shape == (m, k)
    assert torch.allclose(got_v.to(want_v.dtype), want_v, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)
    # each returned index really has its returned score
    scores = reference.similarity_matrix(q.float(), bank.float(), similarity)
    assert torch.allclose(scores.gather(1, got_i), got_v.float(), rtol=1e-5, atol=1e-4)
    assert (got_i == want_i).float().mean() > 0.98  # near-ties from rounding may swap


def test_topk_ties_take_the_lower_index(backend):
    bank = torch.tensor([[1.0], [2.0], [2.0], [0.0], [2.0], [-0.0], [0.0]])
    q = torch.tensor([[1.0], [-1.0], [0.0]])
    values, indices = _ops(backend).topk(q, bank, 7, similarity="dot", exclude_index=None,
                                         query_labels=None, bank_labels=None)
    assert indices[0].tolist() == [1, 2, 4, 0, 3, 5, 6]
    assert indices[1].tolist() == [3, 5, 6, 0, 1, 2, 4]
    assert indices[2].tolist() == list(range(7))  # all scores are (+-)0: index order


def test_topk_exclusions(backend):
    q, bank = torch.randn(6, 4), torch.randn(40, 4)
    ex = torch.tensor([[0, 5], [1, -1], [-1, -1], [39, 38], [7, 7], [2, 3]])
    ql, bl = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(40) % 3
    got_v, got_i = _ops(backend).topk(q, bank, 10, similarity="dot", exclude_index=ex,
                                      query_labels=ql, bank_labels=bl)
    scores = q @ bank.T
    for i in range(6):
        allowed = [j for j in range(40) if j not in ex[i].tolist() and bl[j] != ql[i]]
        order = sorted(allowed, key=lambda j: (-float(scores[i, j]), j))[:10]
        assert got_i[i].tolist() == order


def test_chunked_memory_budget_per_device():
    """Without an override the chunks are sized per device type (a GPU gets bigger chunks);
    set_memory_budget overrides every device and returns the previous setting."""
    old = chunked.set_memory_budget(None)
    try:
        assert chunked.memory_budget() == chunked.memory_budget("cpu") == 32 << 20
        assert chunked.memory_budget(torch.device("cuda", 0)) == 256 << 20
        assert chunked.memory_budget("meta") == 32 << 20  # other devices: the CPU's
        rows = 1024  # fp32, 4 temporaries: 16 KiB per column
        assert chunked.chunk_size(rows, 1 << 30) == 2048
        assert chunked.chunk_size(rows, 1 << 30, device="cuda") == 16384
        assert chunked.chunk_size(rows, 100, device="cuda") == 100
        assert chunked.set_memory_budget(1 << 20) is None
        assert chunked.memory_budget("cuda") == chunked.memory_budget("cpu") == 1 << 20
        assert chunked.set_memory_budget(None) == 1 << 20
        with pytest.raises(ValueError, match="positive"):
            chunked.set_memory_budget(0)
    finally:
        chunked.set_memory_budget(old)


def test_topk_host_bank_equals_device_bank(backend):
    """The bank may live elsewhere than the query; on the CPU this checks the streaming path."""
    q, bank = torch.randn(4, 8), torch.randn(3000, 8)
    old = chunked.set_memory_budget(4096)
    try:
        a = _ops(backend).topk(q, bank, 50, similarity="cosine", exclude_index=None,
                               query_labels=None, bank_labels=None)
    finally:
        chunked.set_memory_budget(old)
    b = reference.topk_similarity(q, bank, 50, similarity="cosine")
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mix_matches_spec(backend, dtype):
    q, neg = torch.randn(5, 6, dtype=dtype), torch.randn(30, 6, dtype=dtype)
    hard = torch.randint(0, 30, (5, 8))
    draws = draw_mixing(5, 8, 4, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    got = _ops(backend).mix(q, neg, hard, draws)
    want = reference.mix_points(q, neg, hard, draws)
    assert got.dtype == dtype and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5, 7, dtype=dtype), atol=1e-5)


def test_mixed_dots_match_materialized_points(backend):
    q = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(25, 5, dtype=torch.float64)
    hard = torch.randint(0, 25, (7, 6))
    draws = draw_mixing(7, 6, 4, 2, torch.Generator().manual_seed(2), torch.device("cpu"))
    u = _ops(backend).mixed_dots(q, q.detach(), neg, hard, draws)
    h = reference.mix_points(q.detach(), neg, hard, draws)
    want = torch.einsum("bd,btd->bt", q, h)
    assert torch.allclose(u, want, rtol=1e-10)
    w = torch.randn_like(u)
    g1, = torch.autograd.grad((u * w).sum(), q)
    g2, = torch.autograd.grad((want * w).sum(), q)
    assert torch.allclose(g1, g2, rtol=1e-10)
