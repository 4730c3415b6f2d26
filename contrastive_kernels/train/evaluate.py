"""Held-out evaluation: weighted kNN classification, copy-detection retrieval, multi-label mAP.

kNN (as in Wu et al. 2018 and MoCo's monitor): cosine similarity of L2-normalized backbone
features; each held-out image takes its k most similar training images (exact top-k through
``contrastive_kernels.topk_similarity``) and every neighbour votes for its label with weight
exp(similarity / 0.07). Top-1 accuracy = the most voted class is the true one. For multi-label
images the neighbours' multi-hot vectors vote and top-1 counts a hit when the most voted class is
among the image's labels.

The evaluation always uses ``backend="auto"`` whatever ``--impl`` is, so that two runs compared
with ``--compare`` differ in their loss backend only.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import contrastive_kernels as ck

KNN_TEMPERATURE = 0.07
EVAL_BATCH = 1024


@torch.no_grad()
def embed(fn: Callable, x: torch.Tensor, device) -> torch.Tensor:
    """fn over x in batches, on ``device``; returns fp32 CPU features, L2-normalized."""
    outs = [fn(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)]
    return F.normalize(torch.cat(outs), dim=1)


def knn_votes(test_f, train_f, train_targets, k: int) -> torch.Tensor:
    """(M, C) vote mass; train_targets (N, C) one-hot or multi-hot."""
    k = min(k, train_f.shape[0])
    values, indices = ck.topk_similarity(test_f, train_f, k, backend="auto")
    weights = (values / KNN_TEMPERATURE).exp()
    return (train_targets[indices] * weights.unsqueeze(-1)).sum(1)


def knn_top1(test_f, train_f, train_y, test_y, k: int, num_classes: int) -> float:
    if train_y.dim() == 1:
        votes = knn_votes(test_f, train_f, F.one_hot(train_y, num_classes).float(), k)
        return float((votes.argmax(1) == test_y).float().mean())
    votes = knn_votes(test_f, train_f, train_y.float(), k)
    top = votes.argmax(1)
    return float(test_y[torch.arange(len(top)), top].gt(0).float().mean())


def retrieval_top1(query_f, gallery_f, target) -> float:
    """Fraction of queries whose most similar gallery row is ``target``."""
    _, indices = ck.topk_similarity(query_f, gallery_f, 1, backend="auto")
    return float((indices[:, 0] == target).float().mean())


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mAP over classes that have at least one positive (scikit-learn's AP)."""
    from sklearn.metrics import average_precision_score

    aps = []
    y = labels.numpy() > 0
    s = scores.double().numpy()
    for c in range(y.shape[1]):
        if y[:, c].any():
            aps.append(average_precision_score(y[:, c], s[:, c]))
    return float(sum(aps) / len(aps))


def classification_metrics(feature_fn, data, device, k: int) -> Dict[str, float]:
    train_f = embed(feature_fn, data.train_x, device)
    test_f = embed(feature_fn, data.test_x, device)
    return {"knn_top1": knn_top1(test_f, train_f, data.train_y, data.test_y, k, data.num_classes)}
