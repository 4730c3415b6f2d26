"""reference.py against independent statements of each method: the textbook formulas written
out here (MoCo, CLIP, SimCLR, DCL/HCL, SupCon, multi-positive), pytorch-metric-learning's
NTXentLoss and SupConLoss, and brute-force loops for mining and mixing."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_kernels import reference
from _helpers import unit

T = 0.2


def _sim(a, b, similarity):
    """Independent pairwise similarities: l2 by explicit differences, cosine by normalizing."""
    if similarity == "dot":
        return a @ b.T
    if similarity == "cosine":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return -(a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_info_nce_is_moco(similarity):
    q, k, queue = unit(8, 16), unit(8, 16), unit(50, 16)
    l_pos = _sim(q, k, similarity).diagonal()[:, None]
    l_neg = _sim(q, queue, similarity)
    want = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / T, torch.zeros(8, dtype=torch.long))
    got = reference.info_nce(q, k, queue, temperature=T, similarity=similarity)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_info_nce_in_batch_is_cross_entropy_over_keys(similarity):
    q, k = unit(9, 5) * 2, unit(9, 5)
    want = F.cross_entropy(_sim(q, k, similarity) / T, torch.arange(9))
    got = reference.info_nce(q, k, temperature=T, similarity=similarity)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_info_nce_queue_and_in_batch_and_extra():
    q, k, queue, extra = unit(6, 4), unit(6, 4), unit(11, 4), unit(6, 3, 4)
    rows = []
    for i in range(6):
        negs = [q[i] @ k[j] for j in range(6) if j != i] + [q[i] @ queue[j] for j in range(11)]
        negs += [q[i] @ extra[i, s] for s in range(3)]
        logits = torch.stack([q[i] @ k[i]] + negs) / T
        rows.append(-torch.log_softmax(logits, 0)[0])
    want = torch.stack(rows)
    got = reference.info_nce(q, k, queue, temperature=T, in_batch_negatives=True,
                             extra_negatives=extra, reduction="none")
    assert torch.allclose(got, want, rtol=1e-10)


def _dcl_hcl_textbook(l_pos_sim, l_neg_sim, tau_plus, beta, t):
    """Chuang et al. (DCL) / Robinson et al. (HCL) as written in their papers, plain exps in fp64."""
    n = l_neg_sim.shape[1]
    pos = torch.exp(l_pos_sim / t)
    neg = torch.exp(l_neg_sim / t)
    imp = torch.exp(beta * l_neg_sim / t)
    reweighted = n * (imp * neg).sum(1) / imp.sum(1)
    ng = (-tau_plus * n * pos + reweighted) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * math.exp(-1 / t))
    return -torch.log(pos / (pos + ng))


@pytest.mark.parametrize("tau_plus,beta", [(0.1, 0.0), (0.0, 1.0), (0.3, 0.5), (0.99, 0.0)])
def test_debiased_estimator_is_textbook(tau_plus, beta):
    q, k, queue = unit(7, 8), unit(7, 8), unit(30, 8)
    want = _dcl_hcl_textbook((q * k).sum(1), q @ queue.T, tau_plus, beta, 0.5)
    got = reference.info_nce(q, k, queue, temperature=0.5, tau_plus=tau_plus, beta=beta,
                             reduction="none")
    assert torch.allclose(got, want, rtol=1e-9)
    # the clamp at N exp(-1/T) is reached with tau_plus near 1: both forms agree there too
    assert torch.isfinite(got).all()


def test_debiased_estimator_is_stable_at_low_temperature():
    q, k, queue = unit(7, 8), unit(7, 8), unit(30, 8)
    got = reference.info_nce(q.float(), k.float(), queue.float(), temperature=0.01, tau_plus=0.1,
                             beta=1.0)
    want = _dcl_hcl_textbook((q * k).sum(1), q @ queue.T, 0.1, 1.0, 0.01).mean()  # fp64 copes
    assert torch.isfinite(got) and torch.allclose(got.double(), want, rtol=1e-4)


def test_clip_is_two_cross_entropies():
    img, txt = unit(10, 6), unit(10, 6)
    scale = 30.0
    logits = scale * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(10)) + F.cross_entropy(logits.T, torch.arange(10)))
    assert torch.allclose(reference.clip_loss(img, txt, scale), want, rtol=1e-10)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_nt_xent_is_simclr(similarity):
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    z = torch.cat([z1, z2])
    s = _sim(z, z, similarity) / 0.5
    s.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    want = F.cross_entropy(s, target)
    assert torch.allclose(reference.nt_xent(z1, z2, similarity=similarity), want, rtol=1e-10)


def test_nt_xent_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import NTXentLoss

    z1, z2 = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 12, dtype=torch.float64)
    labels = torch.cat([torch.arange(16), torch.arange(16)])
    want = NTXentLoss(temperature=0.5)(torch.cat([z1, z2]), labels)
    got = reference.nt_xent(z1, z2, temperature=0.5)
    assert torch.allclose(got, want.to(got.dtype), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_sup_con_matches_pytorch_metric_learning(temperature):
    from pytorch_metric_learning.losses import SupConLoss

    f = torch.randn(24, 10, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,))
    labels[0] = 99  # an anchor without positives: left out by both
    want = SupConLoss(temperature=temperature)(f, labels)
    got = reference.sup_con(f, labels, temperature=temperature)
    assert torch.allclose(got, want.to(got.dtype), rtol=1e-6)


def test_sup_con_is_khosla_l_out_with_multi_hot():
    f = unit(9, 4)
    hot = (torch.rand(9, 3) < 0.4).long()
    rows = []
    for i in range(9):
        others = [j for j in range(9) if j != i]
        denom = torch.logsumexp(torch.stack([f[i] @ f[j] / T for j in others]), 0)
        pos = [j for j in others if (hot[i] * hot[j]).sum() > 0]
        if pos:
            rows.append(torch.stack([denom - f[i] @ f[p] / T for p in pos]).mean())
    want = torch.stack(rows).mean() if rows else torch.tensor(0.0, dtype=torch.float64)
    got = reference.sup_con(f, hot, temperature=T)
    assert torch.allclose(got, want, rtol=1e-10)


def test_multi_positive_by_loops():
    q, keys, queue = unit(5, 4), unit(7, 4), unit(6, 4)
    index = torch.tensor([[0, 8, -1], [-1, -1, -1], [12, 12, 3], [1, -1, 2], [6, 7, 0]])
    cols = torch.cat([keys, queue])
    rows = []
    for i in range(5):
        lp = torch.log_softmax(q[i] @ cols.T / T, 0)
        pos = [int(p) for p in index[i] if p >= 0]
        if pos:
            rows.append(-torch.stack([lp[p] for p in pos]).mean())
    want = torch.stack(rows).mean()
    got = reference.multi_positive_info_nce(q, keys, index, queue, temperature=T)
    assert torch.allclose(got, want, rtol=1e-10)


# reference.topk_similarity against FAISS: tests/test_mining_mixing.py::test_topk_against_faiss[reference-*]


def test_mining_by_loops():
    e = torch.randn(30, 6, dtype=torch.float64)
    pairs, scores = reference.mine_semantic_positives(e, 4, 0.3)
    s = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T
    want = []
    for i in range(30):
        order = sorted((j for j in range(30) if j != i), key=lambda j: (-float(s[i, j]), j))[:4]
        want += [(i, j) for j in order if s[i, j] >= 0.3]
    assert pairs.tolist() == [list(p) for p in want]
    assert torch.allclose(scores, torch.stack([s[i, j] for i, j in want]).to(scores.dtype))


def test_mixing_by_loops():
    q, neg = unit(3, 5), unit(20, 5)
    hard = torch.randint(0, 20, (3, 6))
    g = torch.Generator().manual_seed(0)
    out = reference.mix_hard_negatives(q, neg, hard, 4, 2, generator=g)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (3, 10), generator=g)
    uni = torch.rand((3, 6), generator=g)
    for i in range(3):
        for t in range(4):
            x, y, a = neg[hard[i, idx[i, t]]], neg[hard[i, idx[i, 4 + t]]], float(uni[i, t])
            want = F.normalize(a * x + (1 - a) * y, dim=0)
            assert torch.allclose(out[i, t], want, atol=1e-6)
        for t in range(2):
            y, b = neg[hard[i, idx[i, 8 + t]]], float(uni[i, 4 + t]) * 0.5
            want = F.normalize(b * q[i] + (1 - b) * y, dim=0)
            assert torch.allclose(out[i, 4 + t], want, atol=1e-6)


def test_lse_stats_spec_by_loops():
    """The internal streaming op's spec against a direct evaluation of its formulas."""
    q, k = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    a, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.rand(6, dtype=torch.float64) + 0.5
    c, d = torch.randn(4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    exclude = torch.tensor([[0, -1], [1, 2], [-1, -1], [5, 5]])
    labels_q, labels_k = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 1, 2, 2, 0])
    row, ps, pc, col = reference.lse_stats(q, k, a, b, c, d, gammas=(1.5, 0.0), exclude=exclude,
                                           q_labels=labels_q, k_labels=labels_k, want_col_lse=True)
    for i in range(4):
        valid = [j for j in range(6) if j not in exclude[i].tolist()]
        l = {j: float(a[i] * b[j] * (q[i] @ k[j]) + c[i] + d[j]) for j in range(6)}
        assert math.isclose(row[0, i], math.log(sum(math.exp(1.5 * l[j]) for j in valid)), rel_tol=1e-12)
        assert math.isclose(row[1, i], math.log(len(valid)), rel_tol=1e-12)
        pos = [j for j in valid if labels_k[j] == labels_q[i]]
        assert math.isclose(ps[i], sum(l[j] for j in pos), abs_tol=1e-12) and pc[i] == len(pos)
    for j in range(6):
        rows = [i for i in range(4) if j not in exclude[i].tolist()]
        l = [float(a[i] * b[j] * (q[i] @ k[j]) + c[i] + d[j]) for i in rows]
        assert math.isclose(col[j], math.log(sum(math.exp(x) for x in l)), rel_tol=1e-12)
