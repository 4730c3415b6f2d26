"""Mining (top-k, semantic positives) and hard-negative mixing through the public API, on every
backend: against the reference, FAISS and the explicit MoCHi path of DESIGN.md."""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import _loss_topk as LT
from contrastive_kernels import chunked, functional, losses
from contrastive_kernels._common import draw_mixing

from conftest import FUSED_BACKENDS
from _helpers import faiss_topk

ALL = ["reference", *FUSED_BACKENDS]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_topk_against_faiss(backend, similarity):
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    q, bank = torch.randn(33, 24), torch.randn(2000, 24)
    k = 17
    want, idx = faiss_topk(q, bank, k, similarity)
    values, indices = ck.topk_similarity(q, bank, k, similarity=similarity, backend=backend)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.allclose(values, want, rtol=1e-4, atol=1e-4)
    assert (indices == idx).float().mean() > 0.99  # near-ties may swap


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_topk_half_dtypes(backend, dtype, similarity):
    """fp16/bf16 inputs are scored in fp32 (the Triton interpreter's bf16 tl.dot takes bit patterns
    for values: bf16 goes through fp32 there): the scores of fp32 copies of the same values."""
    g = torch.Generator().manual_seed(5)
    q, bank = torch.randn(9, 16, generator=g).to(dtype), torch.randn(300, 16, generator=g).to(dtype)
    got = ck.topk_similarity(q, bank, 7, similarity=similarity, backend=backend)
    want = ck.topk_similarity(q.float(), bank.float(), 7, similarity=similarity, backend="reference")
    assert got.values.dtype == dtype and torch.equal(got.indices, want.indices)
    assert torch.allclose(got.values.float(), want.values.to(dtype).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ALL)
def test_topk_limits_and_exclusions(backend):
    q, bank = torch.randn(6, 5), torch.randn(30, 5)
    rows = torch.arange(6)
    # k = N, k = 1, k = N after exclusions
    for k in (1, 30):
        v, i = ck.topk_similarity(q, bank, k, backend=backend)
        assert i.shape == (6, k) and (v[:, :-1] >= v[:, 1:]).all()
    v, i = ck.topk_similarity(q, bank, 29, exclude_index=rows, backend=backend)
    assert not (i == rows[:, None]).any()
    labels_q, labels_b = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(30) % 3
    v, i = ck.topk_similarity(q, bank, 19, exclude_index=rows, query_labels=labels_q,
                              bank_labels=labels_b, exclude_same_label=True, backend=backend)
    assert not (labels_b[i] == labels_q[:, None]).any() and not (i == rows[:, None]).any()
    assert torch.allclose(v, ck.topk_similarity(q, bank, 19, exclude_index=rows, query_labels=labels_q,
                                                bank_labels=labels_b, exclude_same_label=True,
                                                backend="reference")[0])


@pytest.mark.parametrize("backend", ALL)
def test_topk_ranks_nan_scores_first_whatever_their_sign(backend):
    """NaN scores rank above +inf and tie among themselves (lower index first), as torch.sort
    ranks them in the reference: q . (inf, inf) = inf - inf is -nan on x86, which bit-pattern keys
    ranked last."""
    q = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.0, 1.0]])
    bank = torch.tensor([[math.inf, math.inf], [1.0, 0.0], [math.nan, 1.0], [2.0, 0.0], [0.0, 3.0]])
    want = ck.topk_similarity(q, bank, 4, backend="reference")
    assert want.values[0, :2].isnan().all() and want.indices[0, :2].tolist() == [0, 2]
    got = ck.topk_similarity(q, bank, 4, backend=backend)
    assert got.indices.tolist() == want.indices.tolist()
    assert torch.equal(got.values.isnan(), want.values.isnan())
    ok = ~want.values.isnan()
    assert torch.equal(got.values[ok], want.values[ok])


@pytest.mark.parametrize("backend", ALL)
def test_mining_results_carry_no_gradient_and_minus_inf_keeps_every_pair(backend):
    e = torch.randn(12, 6, requires_grad=True)
    top = ck.topk_similarity(e, e.detach(), 3, backend=backend)
    assert not top.values.requires_grad
    pairs, scores = ck.mine_semantic_positives(e, 3, -math.inf, backend=backend)
    assert pairs.shape == (36, 2) and not scores.requires_grad
    assert (pairs[:, 0] != pairs[:, 1]).all()


@pytest.mark.parametrize("backend", ALL)
def test_topk_half_precision_values_in_input_dtype(backend):
    q, bank = torch.randn(4, 16).half(), torch.randn(100, 16).half()
    v, i = ck.topk_similarity(q, bank, 5, backend=backend)
    assert v.dtype == torch.float16
    exact = (q.float() @ bank.float().T).gather(1, i)
    assert torch.allclose(v.float(), exact, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ALL)
def test_mine_semantic_positives(backend):
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(10, 16), dim=1)
    emb = centers.repeat_interleave(20, 0) + 0.05 * torch.randn(200, 16)
    pairs, scores = ck.mine_semantic_positives(emb, 5, 0.9, backend=backend)
    assert pairs.dtype == torch.int64 and pairs.shape[1] == 2 and scores.shape == (pairs.shape[0],)
    assert (pairs[:, 0] != pairs[:, 1]).all() and (scores >= 0.9).all()
    assert (pairs[:, 0] // 20 == pairs[:, 1] // 20).all()  # same cluster
    key = pairs[:, 0].double() * 10 - scores.double()
    assert (key[1:] >= key[:-1]).all()  # by i, then descending score
    want_pairs, want_scores = ck.mine_semantic_positives(emb, 5, 0.9, backend="reference")
    assert torch.equal(pairs, want_pairs) and torch.allclose(scores, want_scores, atol=1e-6)


def _count_searches(monkeypatch):
    """Query rows of each backend call the public functions make (functional._topk_once)."""
    calls = []
    real = functional._topk_once
    monkeypatch.setattr(functional, "_topk_once", lambda ops, q, *a: calls.append(len(q)) or real(ops, q, *a))
    return calls


def _make_runs_long(monkeypatch, rows_per_0_2_s, n, d):
    """A search counts as long from here on and a block takes ``rows_per_0_2_s`` query rows."""
    monkeypatch.setattr(functional, "_SCORE_RATE", {"cpu": rows_per_0_2_s * 2 * n * d / 0.2})
    monkeypatch.setattr(functional, "PROGRESS_AFTER_S", 0.01)


@pytest.mark.parametrize("backend", ALL)
def test_mine_semantic_positives_shows_progress_on_long_runs(backend, capsys, monkeypatch):
    """A long run goes in query blocks under a progress bar (stderr) and returns exactly what one
    call returns; a short one stays quiet. Here "long" is made to hold at 64 rows: 20-row blocks."""
    torch.manual_seed(2)
    emb = torch.randn(64, 8)
    want_pairs, want_scores = ck.mine_semantic_positives(emb, 4, 0.2, backend=backend)
    assert "mine_semantic_positives" not in capsys.readouterr().err
    _make_runs_long(monkeypatch, 20, 64, 8)
    calls = _count_searches(monkeypatch)
    for progress in (None, True):
        pairs, scores = ck.mine_semantic_positives(emb, 4, 0.2, backend=backend, progress=progress)
        assert torch.equal(pairs, want_pairs) and torch.equal(scores, want_scores)
        assert "mine_semantic_positives: 100%" in capsys.readouterr().err
    assert calls == [20, 20, 20, 4] * 2
    calls.clear()
    ck.mine_semantic_positives(emb, 4, 0.2, backend=backend, progress=False)
    assert calls == [64] and "mine_semantic_positives" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be a bool"):
        ck.mine_semantic_positives(emb, 4, 0.2, progress="yes")


@pytest.mark.parametrize("backend", ALL)
def test_topk_similarity_shows_progress_on_long_runs(backend, capsys, monkeypatch):
    """topk_similarity's blocks slice the exclusions and labels with the query rows: the same
    indices and values (up to rounding) as one call, a bar on stderr only for a long run (or progress=True)."""
    torch.manual_seed(3)
    q, bank = torch.randn(50, 8), torch.randn(300, 8)
    ex = torch.randint(-1, 300, (50,))
    ql, bl = torch.randint(0, 4, (50,)), torch.randint(0, 4, (300,))
    kw = dict(similarity="cosine", exclude_index=ex, query_labels=ql, bank_labels=bl,
              exclude_same_label=True, backend=backend)
    want = ck.topk_similarity(q, bank, 7, **kw)
    assert "topk_similarity" not in capsys.readouterr().err
    _make_runs_long(monkeypatch, 16, 300, 8)
    calls = _count_searches(monkeypatch)
    for progress in (None, True):
        got = ck.topk_similarity(q, bank, 7, progress=progress, **kw)
        # the same up to rounding: a matmul of fewer rows may add in another order
        assert torch.equal(got.indices, want.indices)
        assert torch.allclose(got.values, want.values, rtol=1e-6, atol=1e-6)
        assert "topk_similarity: 100%" in capsys.readouterr().err
    assert calls == [16, 16, 16, 2] * 2
    calls.clear()
    ck.topk_similarity(q, bank, 7, progress=False, **kw)
    assert calls == [50] and "topk_similarity" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be a bool"):
        ck.topk_similarity(q, bank, 7, progress=1)


def test_search_plan_blocks():
    """When a bar is due and how many query rows a block takes: about 100 blocks, each at least
    0.2 s of scoring and, for a bank streamed from the host, at least one pass of its copies."""
    plan = functional._search_plan
    # 8192 x 2^20 x 128 on a CPU: 2 x 1.1e12 multiply-adds at 2e11 FLOP/s, 11 s: a bar, blocks
    # of 0.2 s (150 rows of 1.34 ms)
    assert plan(8192, 2**20, 128, "cpu", 0, None) == (150, True)
    assert plan(4096, 2**20, 128, "cpu", 0, None) == (4096, False)   # 5.5 s: none
    assert plan(4096, 2**20, 128, "cpu", 0, True) == (150, True)
    assert plan(10**6, 2**20, 128, "cpu", 0, False) == (10**6, False)
    # many rows: blocks of 1 % of them
    assert plan(10**6, 2**20, 128, "cpu", 0, None) == (10**4, True)
    # a 50M x 128 fp16 host bank on a GPU: one pass of its copies is 0.51 s, and a block of query
    # rows is at least as long in scoring (8,000 rows), whatever 1 % of the rows would be
    host = 50_000_000 * 128 * 2
    row_s = 2.0 * 50_000_000 * 128 / functional._SCORE_RATE["cuda"]
    rows, show = plan(200_000, 50_000_000, 128, "cuda", host, None)
    bank_pass_s = host / functional._HOST_BANK_BANDWIDTH
    assert show and rows * row_s >= bank_pass_s and rows in (8000, 8001)  # 0.512 s / 64 us
    assert plan(8192, 50_000_000, 128, "cuda", host, None) == (8192, False)
    # a bank pass alone can make a search long; its one block is then all the rows
    assert plan(10, 10**9, 128, "cuda", 10**9 * 128 * 2, None) == (10, True)


def test_mine_large_set_in_blocks():
    """Query blocks and bank chunks both smaller than the set."""
    torch.manual_seed(1)
    emb = torch.randn(5000, 8)
    old = chunked.set_memory_budget(1 << 20)
    try:
        pairs, scores = ck.mine_semantic_positives(emb, 3, 0.8, backend="chunked")
    finally:
        chunked.set_memory_budget(old)
    want_pairs, want_scores = ck.mine_semantic_positives(emb, 3, 0.8, backend="reference")
    assert pairs.shape == want_pairs.shape
    assert (pairs == want_pairs).all(1).float().mean() > 0.999


@pytest.mark.parametrize("backend", ALL)
def test_mix_hard_negatives_statistics(backend):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 12), dim=1).requires_grad_()
    neg = F.normalize(torch.randn(50, 12), dim=1)
    hard = ck.topk_similarity(q.detach(), neg, 10, backend=backend)[1]
    out = ck.mix_hard_negatives(q, neg, hard, 6, 4, generator=torch.Generator().manual_seed(0),
                                backend=backend)
    assert out.shape == (8, 10, 12) and not out.requires_grad
    assert torch.allclose(out.norm(dim=-1), torch.ones(8, 10), atol=1e-5)
    for i in range(8):
        hard_rows = neg[hard[i]]
        for t in range(6):  # in the cone of two of the row's hard negatives
            found = False
            for x in range(10):
                for y in range(10):
                    basis = torch.stack([hard_rows[x], hard_rows[y]], 1)
                    coef = torch.linalg.lstsq(basis, out[i, t, :, None]).solution[:, 0]
                    if torch.allclose(basis @ coef, out[i, t], atol=1e-4) and (coef >= -1e-5).all():
                        found = True
                        break
                if found:
                    break
            assert found, (i, t)
        for t in range(6, 10):  # query weight below one half
            ok = False
            for y in range(10):
                basis = torch.stack([q[i].detach(), hard_rows[y]], 1)
                coef = torch.linalg.lstsq(basis, out[i, t, :, None]).solution[:, 0]
                if torch.allclose(basis @ coef, out[i, t], atol=1e-4) and (coef >= -1e-5).all():
                    ok = coef[0] / coef.sum() < 0.5
                    break
            assert ok, (i, t)


@pytest.mark.parametrize("backend", ALL)
def test_mixing_generator_reproducibility(backend):
    q, neg = torch.randn(4, 6), torch.randn(20, 6)
    hard = torch.randint(0, 20, (4, 5))
    run = lambda seed: ck.mix_hard_negatives(q, neg, hard, 3, 2,
                                             generator=torch.Generator().manual_seed(seed),
                                             backend=backend)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    torch.manual_seed(5)
    a = ck.mix_hard_negatives(q, neg, hard, 3, 2, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(a, ck.mix_hard_negatives(q, neg, hard, 3, 2, backend=backend))
    # the same draws as the reference (a kernel's rounding may differ in the last bit; a
    # different draw would differ by O(1))
    want = ck.mix_hard_negatives(q, neg, hard, 3, 2, backend="reference",
                                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run(0), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("estimator", [(0.0, 0.0), (0.1, 0.5)])
def test_fused_mixing_equals_explicit_path(backend, similarity, estimator):
    """DESIGN.md: info_nce(mixing=Mixing(n, s, s', g)) equals extra_negatives=mix_hard_negatives(
    query.detach(), queue, topk_similarity(query.detach(), queue, n).indices, s, s', g)."""
    torch.manual_seed(0)
    tau_plus, beta = estimator
    q = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(64, 16, dtype=torch.float64), dim=1)
    fused = ck.info_nce(q, k, queue, temperature=0.1, similarity=similarity, tau_plus=tau_plus,
                        beta=beta, mixing=ck.Mixing(12, 8, 4, torch.Generator().manual_seed(9)),
                        backend=backend)
    hard = ck.topk_similarity(q.detach(), queue, 12, backend=backend).indices
    synthetic = ck.mix_hard_negatives(q.detach(), queue, hard, 8, 4,
                                      generator=torch.Generator().manual_seed(9), backend=backend)
    explicit = ck.info_nce(q, k, queue, temperature=0.1, similarity=similarity, tau_plus=tau_plus,
                           beta=beta, extra_negatives=synthetic, backend=backend)
    g_fused = torch.autograd.grad(fused, [q, k])
    g_explicit = torch.autograd.grad(explicit, [q, k])
    assert torch.allclose(fused, explicit, rtol=1e-10)
    for a, b in zip(g_fused, g_explicit):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def _mochi_by_loops(q, k, queue, temperature, similarity, n_hard, s, sq, seed):
    """MoCHi stated independently, one row and one synthetic point at a time (the draws follow
    ``draw_mixing``'s documented order; everything else is written out here)."""
    from contrastive_kernels._common import draw_mixing

    b = q.shape[0]
    draws = draw_mixing(b, n_hard, s, sq, torch.Generator().manual_seed(seed), torch.device("cpu"))

    def sim(x, y):
        if similarity == "dot":
            return x @ y
        if similarity == "cosine":
            return (x @ y) / (x.norm() * y.norm())
        return -((x - y) ** 2).sum()

    def unit(v):
        return v / max(float(v.norm()), 1e-12)

    losses = []
    for i in range(b):
        qd = q[i].detach()
        order = sorted(range(queue.shape[0]), key=lambda j: (-float(qd @ queue[j]), j))
        hard = order[:n_hard]
        points = []
        for t in range(s):
            a = float(draws.alpha[i, t])
            x = queue[hard[int(draws.pair_index[i, t, 0])]]
            y = queue[hard[int(draws.pair_index[i, t, 1])]]
            points.append(unit(a * x + (1 - a) * y).detach())
        for t in range(sq):
            w = float(draws.query_weight[i, t])
            assert w < 0.5
            y = queue[hard[int(draws.query_index[i, t])]]
            points.append(unit(w * qd + (1 - w) * y).detach())
        logits = [sim(q[i], k[i])] + [sim(q[i], queue[j]) for j in range(queue.shape[0])]
        logits += [sim(q[i], h) for h in points]
        logits = torch.stack(logits) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("counts", [(6, 4, 3), (5, 0, 4), (1, 3, 0)], ids=str)
def test_mixing_against_a_per_row_statement_of_mochi(backend, similarity, counts):
    """info_nce(mixing=) on every backend equals MoCHi written as per-row loops: value and the
    gradients of the query and the positive key (fp64; odd B, K, D; no pair mixes, no query mixes,
    a single hard negative)."""
    n_hard, s, sq = counts
    g = torch.Generator().manual_seed(sum(counts))
    q = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_()
    queue = torch.randn(23, 7, dtype=torch.float64, generator=g)
    want = _mochi_by_loops(q, k, queue, 0.3, similarity, n_hard, s, sq, seed=4)
    got = ck.info_nce(q, k, queue, temperature=0.3, similarity=similarity,
                      mixing=ck.Mixing(n_hard, s, sq, torch.Generator().manual_seed(4)),
                      backend=backend)
    assert torch.allclose(got, want, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(got, [q, k]), torch.autograd.grad(want, [q, k])):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
@pytest.mark.parametrize("estimator", [(0.0, 0.0), (0.1, 0.5)])
@pytest.mark.parametrize("shape", [(6, 64, 16, 12, 8, 4), (7, 300, 20, 9, 0, 5), (3, 150, 24, 40, 13, 0)],
                         ids=str)
def test_fused_mixing_equals_explicit_path_fp32(backend, similarity, estimator, shape, monkeypatch):
    """The same contract in fp32, where the Triton and C++ CPU backends take the hard negatives from
    the loss kernel's own pass (_loss_topk.py, lse_stats_topk): the hard set and its order must be the
    separate top-k's, so both paths give the same loss and gradients (up to fp32 rounding). Short
    queues too (whose threshold sample is the whole queue; by default they take the separate top-k)."""
    monkeypatch.setattr(LT, "MIN_SAMPLE_STRIDE", 1)
    b, n, d, n_hard, s, sq = shape
    tau_plus, beta = estimator
    g = torch.Generator().manual_seed(n)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(n, d, generator=g), dim=1)
    fused_before = LT.STATS["fused_calls"]
    fused = ck.info_nce(q, k, queue, temperature=0.1, similarity=similarity, tau_plus=tau_plus,
                        beta=beta, mixing=ck.Mixing(n_hard, s, sq, torch.Generator().manual_seed(2)),
                        reduction="none", backend=backend)
    if backend in ("triton", "cpu"):  # the loss pass gave the hard negatives
        assert LT.STATS["fused_calls"] == fused_before + 1
    hard = ck.topk_similarity(q.detach(), queue, n_hard, backend=backend).indices
    synthetic = ck.mix_hard_negatives(q.detach(), queue, hard, s, sq,
                                      generator=torch.Generator().manual_seed(2), backend=backend)
    explicit = ck.info_nce(q, k, queue, temperature=0.1, similarity=similarity, tau_plus=tau_plus,
                           beta=beta, extra_negatives=synthetic, reduction="none", backend=backend)
    w = torch.linspace(0.5, 1.5, b)
    assert torch.allclose(fused, explicit, rtol=1e-5, atol=1e-5)
    for a, c in zip(torch.autograd.grad((fused * w).sum(), [q, k]),
                    torch.autograd.grad((explicit * w).sum(), [q, k])):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5)


MIXED_LSE = [b for b in FUSED_BACKENDS if hasattr(functional._module(b), "mixed_lse")]


@pytest.mark.parametrize("backend", MIXED_LSE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,n_hard,s,sq,d,gammas", [(9, 7, 5, 3, 20, [1.0]), (4, 9, 0, 11, 24, [1.5, 0.5]),
                                                   (5, 6, 19, 0, 200, [1.0, 0.0]), (3, 1, 2, 2, 8, [2.0])])
def test_mixed_lse_is_the_logsumexp_of_the_synthetic_logits(backend, dtype, b, n_hard, s, sq, d, gammas):
    """The optional family op mixed_lse = logsumexp_t(gamma (a u + c)) with u from the backend's
    mixed_dots, and its O(B D) backward gives that formula's gradients to q, row_scale and row_bias
    (h constant). Shapes: several point blocks, one kind of point missing, D over one feature chunk
    (Triton: 128), a single hard negative."""
    ops = functional._module(backend)
    g = torch.Generator().manual_seed(s + sq)
    q = torch.randn(b, d, generator=g).to(dtype)
    neg = torch.randn(40, d, generator=g).to(dtype)
    hard = torch.randint(0, 40, (b, n_hard), generator=g)
    draws = draw_mixing(b, n_hard, s, sq, torch.Generator().manual_seed(1), torch.device("cpu"))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a0, c0 = torch.rand(b, generator=g, dtype=acc) + 1.0, torch.randn(b, generator=g, dtype=acc)
    w = torch.rand(len(gammas), b, generator=g, dtype=acc)
    grads = []
    for fused in (True, False):
        qq, a, c = q.clone().requires_grad_(), a0.clone().requires_grad_(), c0.clone().requires_grad_()
        if fused:
            lse = ops.mixed_lse(qq, q, neg, hard, draws, a, c, gammas=gammas)
        else:
            logits = ops.mixed_dots(qq, q, neg, hard, draws) * a[:, None] + c[:, None]
            lse = torch.stack([torch.logsumexp(gm * logits, 1) for gm in gammas])
        grads.append((lse.detach(),) + torch.autograd.grad((lse * w).sum(), [qq, a, c]))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for x, y in zip(*grads):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.allclose(x, y, **tol)


@pytest.mark.parametrize("backend", MIXED_LSE)
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the Triton interpreter's max over the NaN row
def test_mixed_lse_edges(backend):
    """No points: lse = -inf and no gradient; a row without a bias; a NaN query row makes its own
    lse NaN and no other row's."""
    ops = functional._module(backend)
    q = torch.randn(4, 16, dtype=torch.float64)
    neg = torch.randn(30, 16, dtype=torch.float64)
    hard = torch.randint(0, 30, (4, 5))
    a = torch.rand(4, dtype=torch.float64) + 0.5
    none = draw_mixing(4, 5, 0, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    qq = q.clone().requires_grad_()
    lse = ops.mixed_lse(qq, q, neg, hard, none, a, None, gammas=(1.0,))
    assert lse.shape == (1, 4) and torch.all(lse == float("-inf"))
    dq, = torch.autograd.grad(lse.clamp(min=-1.0).sum(), qq, allow_unused=True, materialize_grads=True)
    assert torch.equal(dq, torch.zeros_like(q))
    draws = draw_mixing(4, 5, 6, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    want = torch.logsumexp(ops.mixed_dots(q, q, neg, hard, draws) * a[:, None], 1)
    assert torch.allclose(ops.mixed_lse(q, q, neg, hard, draws, a, None, gammas=(1.0,))[0], want, rtol=1e-12)
    bad = q.clone()
    bad[2, 3] = float("nan")
    got = ops.mixed_lse(bad, q, neg, hard, draws, a, None, gammas=(1.0,))[0]
    assert torch.isnan(got[2]) and torch.allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-12)
    # -inf logits weigh 0: a row of them gives lse = -inf, not NaN
    c = torch.zeros(4, dtype=torch.float64)
    c[1] = -float("inf")
    got = ops.mixed_lse(q, q, neg, hard, draws, a, c, gammas=(1.0,))[0]
    assert got[1] == -float("inf") and torch.allclose(got[[0, 2, 3]], want[[0, 2, 3]], rtol=1e-12)


@pytest.mark.parametrize("backend", MIXED_LSE)
@pytest.mark.parametrize("estimator", [(0.0, 0.0), (0.1, 0.5)])
def test_losses_take_mixed_lse_and_equal_the_mixed_dots_path(backend, estimator, monkeypatch):
    """info_nce and nt_xent with mixing give the same value and gradients with the synthetic logits
    reduced by mixed_lse and as a (B, s+s') tensor from mixed_dots (CK_MIXING_LSE=0)."""
    tau_plus, beta = estimator
    q = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(64, 16, dtype=torch.float64), dim=1)
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    calls = []
    module = functional._module(backend)
    monkeypatch.setattr(module, "mixed_lse", lambda *a, _f=module.mixed_lse, **kw: calls.append(1) or _f(*a, **kw))
    results = []
    for use in (True, False):
        monkeypatch.setattr(losses, "MIXED_LSE", use)
        mixing = ck.Mixing(12, 8, 4, torch.Generator().manual_seed(9))
        moco = ck.info_nce(q, k, queue, temperature=t, similarity="cosine", tau_plus=tau_plus, beta=beta,
                           mixing=mixing, backend=backend)
        simclr = ck.nt_xent(q, k, temperature=t, tau_plus=tau_plus, beta=beta,
                            mixing=ck.Mixing(4, 6, 3, torch.Generator().manual_seed(2)), backend=backend)
        results.append([moco, simclr, *torch.autograd.grad(moco + simclr, [q, k, t])])
        assert len(calls) == 2  # info_nce and nt_xent with MIXED_LSE on; no call with it off
    for x, y in zip(*results):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
