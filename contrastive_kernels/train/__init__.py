"""Reference training loop: ``python -m contrastive_kernels.train`` (``--help`` lists the flags).

Methods: moco (+ MoCHi via --mixing), simclr (+ DCL/HCL, synthetic hard negatives), clip
(+ CLIP-C compositions), supcon, spp (semantic positive pairs), qk (QK Iteration), multilabel
(label-wise alignment, semi-supervised). ``--impl`` swaps the loss backend and nothing else;
``--compare reference,auto`` runs both and reports them side by side. Runs are deterministic on
the CPU and resume bit-exactly from their atomic checkpoints (``--resume``).
"""
from .cli import main

__all__ = ["main"]
