"""Small encoders: a two-layer conv net with a projection head for images, a bag-of-words text
encoder for CLIP, and the label-wise attention model of the multilabel method.

GroupNorm rather than BatchNorm: a single process has no shuffled BN across devices, and BN
statistics shared by a batch of queries and keys leak which key is the positive (MoCo's
"cheating" BN); GroupNorm is per-sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ConvBackbone(nn.Module):
    """conv3x3(C->w) - GN - ReLU - conv3x3 stride 2 (w->2w) - GN - ReLU - flatten - Linear(feat).

    ``features(x)`` (B, feat_dim) are what kNN evaluation uses; ``feature_map(x)`` is the
    (B, 2w, H/2, W/2) map before flattening (for label-wise attention)."""

    def __init__(self, in_shape, width: int = 32, feat_dim: int = 128):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(2 * width), 2 * width)
        self.map_shape = (2 * width, (h + 1) // 2, (w + 1) // 2)
        self.fc = nn.Linear(math.prod(self.map_shape), feat_dim)
        self.feat_dim = feat_dim

    def feature_map(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))

    def forward(self, x):
        return F.relu(self.fc(self.feature_map(x).flatten(1)))


class Encoder(nn.Module):
    """Backbone + MLP projection head; ``forward`` returns the projection (not normalized)."""

    def __init__(self, in_shape, width: int = 32, feat_dim: int = 128, out_dim: int = 64):
        super().__init__()
        self.backbone = ConvBackbone(in_shape, width, feat_dim)
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(),
                                  nn.Linear(feat_dim, out_dim))

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.backbone(x))


class TextEncoder(nn.Module):
    """Bag of words: mean of word embeddings over the non-padding tokens, then an MLP."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, out_dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(),
                                 nn.Linear(embed_dim, out_dim))

    def forward(self, tokens):
        mask = (tokens != 0).unsqueeze(-1).float()
        mean = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(mean)


class LabelWiseModel(nn.Module):
    """Per-class image features for multi-label alignment (after Fan et al. 2024): learnable
    class embeddings E (C, D) act as attention queries over the backbone's spatial feature map,
    giving one feature f_c per class and image; f_c is aligned with E_c by the contrastive loss
    and the class score is cos(f_c, E_c)."""

    def __init__(self, in_shape, num_classes: int, width: int = 32, feat_dim: int = 128,
                 dim: int = 64):
        super().__init__()
        self.backbone = ConvBackbone(in_shape, width, feat_dim)
        channels = self.backbone.map_shape[0]
        # a 3x3 context layer widens the receptive field of each location to a whole digit
        self.context = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                     nn.GroupNorm(_groups(channels), channels), nn.ReLU())
        self.keys = nn.Conv2d(channels, dim, 1)
        self.values = nn.Conv2d(channels, dim, 1)
        self.class_embed = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.out = nn.Linear(dim, dim)
        self.dim = dim

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        """(B, C, D) per-class features."""
        fmap = self.context(self.backbone.feature_map(x))
        k = self.keys(fmap).flatten(2)       # (B, D, L)
        v = self.values(fmap).flatten(2)     # (B, D, L)
        attn = torch.softmax(torch.einsum("cd,bdl->bcl", self.class_embed, k) / math.sqrt(self.dim), -1)
        return self.out(torch.einsum("bcl,bdl->bcd", attn, v))

    def scores(self, x):
        """(B, C) class scores cos(f_c, E_c)."""
        f = F.normalize(self.forward(x), dim=-1)
        return (f * F.normalize(self.class_embed, dim=-1)).sum(-1)
