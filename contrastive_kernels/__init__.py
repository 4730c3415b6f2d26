"""contrastive_kernels: fused kernels for contrastive learning in PyTorch.

Large-negative InfoNCE without the B x K logits, exact top-k mining over big banks, and
hard-negative mixing, behind one functional API (see README.md and DESIGN.md)."""
from . import nn
from ._common import Mixing, TopK
from .functional import (
    BackendUnavailableError,
    available_backends,
    clip_loss,
    info_nce,
    mine_semantic_positives,
    mix_hard_negatives,
    multi_positive_info_nce,
    nt_xent,
    sup_con,
    topk_similarity,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Mixing",
    "TopK",
    "available_backends",
    "clip_loss",
    "info_nce",
    "mine_semantic_positives",
    "mix_hard_negatives",
    "multi_positive_info_nce",
    "nn",
    "nt_xent",
    "sup_con",
    "topk_similarity",
]
