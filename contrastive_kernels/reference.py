"""The executable spec: every op of the library in plain eager PyTorch, written for clarity.

Each function here materializes the full score matrix; it is the oracle every other backend is
tested against (``backend="reference"`` runs it). Arguments are assumed valid: the public API in
``functional.py`` checks them first.

Conventions (DESIGN.md): s(q, k) is the similarity, T the temperature, logits l = s / T.
Similarities are computed in the input dtype (as eager user code would, so that a bf16 run shows
the error an eager bf16 run has); the softmax / log-sum-exp part and the loss are fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import NORM_EPS, Mixing, MixingDraws, TopK, draw_mixing, to_acc

# --------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """(M, D) x (N, D) -> (M, N): dot a.b, cosine a.b/(|a||b|), or l2 -|a-b|^2.

    l2 uses the expansion 2 a.b - |a|^2 - |b|^2 (the form every kernel uses)."""
    if similarity == "dot":
        return a @ b.T
    if similarity == "cosine":
        return F.normalize(a, dim=-1, eps=NORM_EPS) @ F.normalize(b, dim=-1, eps=NORM_EPS).T
    if similarity == "l2":
        return 2 * (a @ b.T) - a.pow(2).sum(-1, keepdim=True) - b.pow(2).sum(-1)[None, :]
    raise ValueError(f"unknown similarity {similarity!r}")


def paired_similarity(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """Row-wise s(a_i, b_i): (B, D) x (B, D) -> (B,); also (B, D) x (B, S, D) -> (B, S)."""
    if b.dim() == a.dim() + 1:
        a = a.unsqueeze(-2)
    if similarity == "dot":
        return (a * b).sum(-1)
    if similarity == "cosine":
        return (F.normalize(a, dim=-1, eps=NORM_EPS) * F.normalize(b, dim=-1, eps=NORM_EPS)).sum(-1)
    if similarity == "l2":
        return 2 * (a * b).sum(-1) - a.pow(2).sum(-1) - b.pow(2).sum(-1)
    raise ValueError(f"unknown similarity {similarity!r}")


def reduce_loss(loss: torch.Tensor, reduction: str, keep: Optional[torch.Tensor] = None):
    """mean / sum / none over rows; ``keep`` (bool) leaves rows out of mean and sum (rows left out
    are 0 under "none"). A mean over no rows is 0."""
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = loss.numel() if keep is None else keep.sum()
    return loss.sum() / (count.clamp(min=1) if torch.is_tensor(count) else max(count, 1))


# --------------------------------------------------------------------------------------------
# the debiased / hardness-reweighted estimator (DCL, HCL)
# --------------------------------------------------------------------------------------------


def debiased_nce(l_pos: torch.Tensor, l_neg: torch.Tensor, tau_plus: float, beta: float,
                 temperature) -> torch.Tensor:
    """Per-row DCL/HCL loss from logits l = s/T: l_pos (B,), l_neg (B, N).

    pos = exp(l_pos), neg_j = exp(l_j), w_j = exp(beta*l_j),
    Ng = max((-tau_plus*N*pos + N*sum_j(w_j*neg_j)/sum_j(w_j)) / (1-tau_plus), N*exp(-1/T)),
    loss = -log(pos / (pos + Ng)).
    """
    n = l_neg.shape[1]
    log_ratio = torch.logsumexp((1 + beta) * l_neg, 1) - torch.logsumexp(beta * l_neg, 1)
    return debiased_nce_from_stats(l_pos, log_ratio, n, tau_plus, temperature)


def debiased_nce_from_stats(l_pos, log_ratio, n, tau_plus, temperature):
    """The DCL/HCL loss from l_pos and log R, R = sum_j w_j neg_j / sum_j w_j over N negatives.

    Evaluated in log space: every exponential is shifted by m = max(l_pos, log R, -1/T), the
    largest of the three exponents, so none overflows (T = 0.01, or logits far below -1/T as l2
    similarities give) and the sum inside the log is at least 1. N = 0 gives loss 0.
    """
    if n == 0:
        return l_pos * 0.0  # no negatives: loss 0, still attached to the graph
    floor_logit = -1.0 / temperature
    m = torch.maximum(log_ratio, l_pos).clamp(min=floor_logit)  # floor_logit: float or tensor
    pos = torch.exp(l_pos - m)
    ng = n * (torch.exp(log_ratio - m) - tau_plus * pos) / (1 - tau_plus)
    floor = n * torch.exp(floor_logit - m)
    ng = torch.maximum(ng, floor)
    return torch.log(pos + ng) - (l_pos - m)


def _loss_from_logits(l_pos, l_neg, tau_plus, beta, temperature):
    """-log softmax of the positive (column 0), or the DCL/HCL estimator when asked for."""
    if tau_plus != 0.0 or beta != 0.0:
        return debiased_nce(l_pos, l_neg, tau_plus, beta, temperature)
    return torch.logsumexp(torch.cat([l_pos[:, None], l_neg], 1), 1) - l_pos


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def info_nce(query, positive_key, queue=None, *, temperature=0.07, similarity="dot",
             in_batch_negatives=None, tau_plus=0.0, beta=0.0, extra_negatives=None,
             mixing: Optional[Mixing] = None, reduction="mean"):
    """InfoNCE: row i's positive is positive_key[i]; negatives are the queue rows, the other rows
    of positive_key (in_batch_negatives; default: True iff there is no queue), extra_negatives[i]
    and, with ``mixing``, MoCHi's synthetic points. Equals MoCo's
    cross_entropy(cat([s(q,k+), s(q,queue)], 1) / T, 0) and, without a queue,
    cross_entropy(s(q, K) / T, arange(B))."""
    if in_batch_negatives is None:
        in_batch_negatives = queue is None
    b = query.shape[0]
    negatives = []  # similarity blocks (B, *) in the input dtype
    if in_batch_negatives:
        s = similarity_matrix(query, positive_key, similarity)
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=query.device)
        negatives.append(s[off_diagonal].view(b, b - 1))
    if queue is not None:
        negatives.append(similarity_matrix(query, queue, similarity))
    if extra_negatives is not None:
        negatives.append(paired_similarity(query, extra_negatives, similarity))
    if mixing is not None:
        hard = topk_similarity(query.detach(), queue.detach(), mixing.n_hard)[1]
        synthetic = mix_hard_negatives(query.detach(), queue.detach(), hard, mixing.n_synthetic,
                                       mixing.n_query_synthetic, generator=mixing.generator)
        negatives.append(paired_similarity(query, synthetic, similarity))
    l_pos = to_acc(paired_similarity(query, positive_key, similarity)) / temperature
    l_neg = to_acc(torch.cat(negatives, 1) if negatives else query.new_zeros(b, 0)) / temperature
    return reduce_loss(_loss_from_logits(l_pos, l_neg, tau_plus, beta, temperature), reduction)


def nt_xent(z1, z2, *, temperature=0.5, similarity="cosine", tau_plus=0.0, beta=0.0,
            mixing: Optional[Mixing] = None, reduction="mean"):
    """SimCLR's NT-Xent over the 2B views z = cat([z1, z2]): view i's positive is its other view,
    its negatives the other 2B-2 views (itself excluded). "none" gives (2B,) losses.

    ``mixing`` adds synthetic hard negatives (Dong et al. 2023): each view's n_hard hardest
    in-batch negatives (its positive and itself excluded) by cosine, mixed as in
    ``mix_hard_negatives`` from the normalized views (the query mix uses the normalized view),
    with one ``draw_mixing`` over the 2B rows."""
    b = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    logits = to_acc(similarity_matrix(z, z, similarity)) / temperature
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    rows = torch.arange(2 * b, device=z.device)
    l_pos = logits[rows, partner]
    negative = torch.ones((2 * b, 2 * b), dtype=torch.bool, device=z.device)
    negative[rows, rows] = False
    negative[rows, partner] = False
    # the negatives' columns by index (built from shapes alone): a boolean mask on the logits
    # would not batch under torch.func.vmap
    negative_cols = torch.arange(2 * b, device=z.device).expand(2 * b, 2 * b)[negative].view(2 * b, 2 * b - 2)
    l_neg = logits.gather(1, negative_cols)
    if mixing is not None and mixing.n_total > 0:
        unit = F.normalize(z.detach(), dim=-1, eps=NORM_EPS)
        scores = (to_acc(unit) @ to_acc(unit).T).float().masked_fill(~negative, -math.inf)
        hard = torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :mixing.n_hard]
        synthetic = mix_hard_negatives(unit, unit, hard, mixing.n_synthetic,
                                       mixing.n_query_synthetic, generator=mixing.generator)
        l_syn = to_acc(paired_similarity(z, synthetic, similarity)) / temperature
        l_neg = torch.cat([l_neg, l_syn], 1)
    return reduce_loss(_loss_from_logits(l_pos, l_neg, tau_plus, beta, temperature), reduction)


def clip_loss(image_features, text_features, logit_scale, *, similarity="dot",
              reduction="mean"):
    """0.5 * (CE(scale * I @ T.T, arange) + CE(scale * T @ I.T, arange)). "none" gives the (N,)
    per-pair losses 0.5 * (image-to-text_i + text-to-image_i)."""
    logits = to_acc(similarity_matrix(image_features, text_features, similarity)) * logit_scale
    diagonal = logits.diagonal()
    per_pair = 0.5 * ((torch.logsumexp(logits, 1) - diagonal) + (torch.logsumexp(logits, 0) - diagonal))
    return reduce_loss(per_pair, reduction)


def label_overlap(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """(M, N) bool: rows share a label. Integer labels (M,), (N,): equal; multi-hot (M, C),
    (N, C): any label in common."""
    if labels_a.dim() == 1:
        return labels_a[:, None] == labels_b[None, :]
    return ((labels_a != 0).double() @ (labels_b != 0).double().T) > 0


def sup_con(features, labels, *, temperature=0.07, similarity="cosine", reduction="mean"):
    """SupCon L_out: for anchor i, positives P(i) = other rows sharing a label, the denominator
    runs over all rows but i: loss_i = -mean_{p in P(i)} log softmax_i(p). Anchors without a
    positive are left out of mean and sum (0 under "none")."""
    b = features.shape[0]
    logits = to_acc(similarity_matrix(features, features, similarity)) / temperature
    self_mask = torch.eye(b, dtype=torch.bool, device=features.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), 1, keepdim=True)
    positive = label_overlap(labels, labels) & ~self_mask
    n_pos = positive.sum(1)
    loss = -(log_prob * positive).sum(1) / n_pos.clamp(min=1)
    return reduce_loss(loss, reduction, keep=n_pos > 0)


def multi_positive_info_nce(query, keys, positive_index, queue=None, *, temperature=0.07,
                            similarity="dot", reduction="mean"):
    """Row i's loss is the mean over its positives p (positive_index[i], -1 = padding) of
    -log softmax over (all keys + queue) at p. Rows without a positive are left out."""
    columns = keys if queue is None else torch.cat([keys, queue], 0)
    logits = to_acc(similarity_matrix(query, columns, similarity)) / temperature
    log_prob = torch.log_softmax(logits, 1)
    valid = positive_index >= 0
    picked = log_prob.gather(1, positive_index.clamp(min=0)) * valid
    n_pos = valid.sum(1)
    loss = -picked.sum(1) / n_pos.clamp(min=1)
    return reduce_loss(loss, reduction, keep=n_pos > 0)


# --------------------------------------------------------------------------------------------
# mining and mixing
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_similarity(query, bank, k, *, similarity="dot", exclude_index=None, query_labels=None,
                    bank_labels=None, exclude_same_label=False):
    """Exact top-k bank rows per query by similarity, largest first, ties broken by the lower
    index. Scores are fp32 (from the inputs upcast), values returned in the query's dtype,
    without gradient (as every backend's)."""
    bank = bank.to(query.device)
    scores = similarity_matrix(query.float(), bank.float(), similarity)
    scores = scores + 0.0  # -0.0 -> +0.0, so that equal scores really tie
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    if exclude_index is not None:
        rows = torch.arange(query.shape[0], device=query.device)
        hit = exclude_index >= 0
        excluded[rows[hit], exclude_index[hit]] = True
    if exclude_same_label:
        excluded |= query_labels.to(query.device)[:, None] == bank_labels.to(query.device)[None, :]
    scores = scores.masked_fill(excluded, -math.inf)
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return TopK(values[:, :k].to(query.dtype), indices[:, :k])


def mine_semantic_positives(embeddings, k, threshold, *, similarity="cosine"):
    """Directed pairs (i, j), i != j, j among the k most similar rows of i, score >= threshold;
    pairs (P, 2) sorted by i then descending score (ties: lower j first), scores (P,)."""
    n = embeddings.shape[0]
    rows = torch.arange(n, device=embeddings.device)
    values, indices = topk_similarity(embeddings, embeddings, k, similarity=similarity,
                                      exclude_index=rows)
    keep = values.float() >= threshold
    pairs = torch.stack([rows[:, None].expand(n, k)[keep], indices[keep]], 1)
    return pairs, values[keep]


@torch.no_grad()
def mix_hard_negatives(query, negatives, hard_index, n_synthetic, n_query_synthetic, *,
                       generator=None):
    """MoCHi: per row, n_synthetic points normalize(a*n_x + (1-a)*n_y) with x, y drawn from the
    row's hard_index and a ~ U(0,1), then n_query_synthetic points normalize(b*q + (1-b)*n_y) with
    b ~ U(0, 0.5). Returns (B, s+s', D) unit-norm points in the query's dtype, without gradient.
    Random draws: ``draw_mixing``."""
    draws = draw_mixing(hard_index.shape[0], hard_index.shape[1], n_synthetic, n_query_synthetic,
                        generator, query.device)
    return mix_points(query, negatives, hard_index, draws)


@torch.no_grad()
def mix_points(query, negatives, hard_index, draws: MixingDraws):
    """The deterministic part of mixing: the synthetic points of the given draws (fp32 math)."""
    negatives = negatives.to(query.device)
    rows = hard_index.to(query.device)
    x = to_acc(negatives[rows.gather(1, draws.pair_index[..., 0])])  # (B, s, D)
    y = to_acc(negatives[rows.gather(1, draws.pair_index[..., 1])])
    a = draws.alpha[..., None].to(x.dtype)
    mixed = F.normalize(a * x + (1 - a) * y, dim=-1, eps=NORM_EPS)
    yq = to_acc(negatives[rows.gather(1, draws.query_index)])  # (B, s', D)
    w = draws.query_weight[..., None].to(x.dtype)
    mixed_q = F.normalize(w * to_acc(query)[:, None, :] + (1 - w) * yq, dim=-1, eps=NORM_EPS)
    return torch.cat([mixed, mixed_q], 1).to(query.dtype)


# --------------------------------------------------------------------------------------------
# the streaming op every fused backend implements
# --------------------------------------------------------------------------------------------


def lse_stats(q, k, row_scale, col_scale=None, row_bias=None, col_bias=None, *,
              gammas: Sequence[float] = (1.0,), exclude=None, q_labels=None, k_labels=None,
              want_col_lse=False):
    """Spec of the one streaming op behind every loss (each fused backend implements it without
    forming the B x N matrix). With the logits

        l_ij = row_scale_i * col_scale_j * <q_i, k_j> + row_bias_i + col_bias_j

    (col_scale = 1 and biases = 0 when None), valid_ij = j not in exclude[i, :] (-1 = none), and
    pos_ij = valid_ij and rows i, j share a label (q_labels / k_labels: int64 (B,)/(N,) compared
    for equality, or int64 bitsets (B, W)/(N, W) tested for a common bit), it returns

        row_lse[g, i] = log sum_{j valid} exp(gammas[g] * l_ij)      (G, B) fp32*, -inf if no column
        pos_sum[i]    = sum_{j pos} l_ij                             (B,) fp32 (zeros w/o labels)
        pos_count[i]  = #{j pos}                                     (B,) fp32, no gradient
        col_lse[j]    = log sum_{i valid} exp(l_ij)                  (N,) fp32 (empty unless asked)

    Backward, given the output gradients dR (G, B), dP (B,), dC (N,):

        G_ij = valid_ij * (sum_g dR_gi gamma_g exp(gamma_g l_ij - R_gi) + dP_i pos_ij
                           + dC_j exp(l_ij - C_j))
        dq_i = row_scale_i sum_j G_ij col_scale_j k_j        dk_j = col_scale_j sum_i G_ij row_scale_i q_i
        d row_scale_i = sum_j G_ij col_scale_j <q_i, k_j>    d col_scale_j = sum_i G_ij row_scale_i <q_i, k_j>
        d row_bias_i = sum_j G_ij                            d col_bias_j = sum_i G_ij

    (*) fp32, or fp64 for fp64 inputs. Here it is written with autograd over the materialized
    matrix.
    """
    b, n = q.shape[0], k.shape[0]
    acc = to_acc(q).dtype
    dot = q.to(acc) @ k.to(acc).T
    logits = dot * row_scale.to(acc)[:, None]
    if col_scale is not None:
        logits = logits * col_scale.to(acc)[None, :]
    if row_bias is not None:
        logits = logits + row_bias.to(acc)[:, None]
    if col_bias is not None:
        logits = logits + col_bias.to(acc)[None, :]
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    if exclude is not None:
        cols = torch.arange(n, device=q.device)
        for e in exclude.unbind(1):
            valid &= cols[None, :] != e[:, None]
    row_lse = torch.stack([
        torch.logsumexp(torch.where(valid, g * logits, torch.full_like(logits, -math.inf)), 1)
        for g in gammas])
    if q_labels is not None:
        if q_labels.dim() == 1:
            share = q_labels[:, None] == k_labels[None, :]
        else:
            share = ((q_labels[:, None, :] & k_labels[None, :, :]) != 0).any(-1)
        positive = share & valid
        pos_sum = torch.where(positive, logits, torch.zeros_like(logits)).sum(1)
        pos_count = positive.sum(1).to(acc)
    else:
        pos_sum = logits.new_zeros(b)
        pos_count = logits.new_zeros(b)
    if want_col_lse:
        col_lse = torch.logsumexp(torch.where(valid, logits, torch.full_like(logits, -math.inf)), 0)
    else:
        col_lse = logits.new_zeros(0)
    return row_lse, pos_sum, pos_count, col_lse
