"""Candidates for the "mixing" case (info_nce with MoCHi hard-negative mixing), registered with the
harness:

- ``eager-mochi``: MoCHi as it is usually written (Kalantidis et al. 2020's recipe in plain
  PyTorch): the full (B, K) logits q @ queue.T, ``torch.topk`` over them for the n_hard hardest
  negatives, gather those queue rows, mix pairs of them (and the query with one of them, weight
  < 0.5), normalize, concatenate the synthetic logits to [positive | queue] and take the
  cross-entropy. It holds the logits (B x K) and the gathered hard rows (B x n_hard x D) and the
  synthetic points (B x (s+s') x D). Its random draws follow ``draw_mixing``, so with equal
  generators it computes the same loss as ``info_nce(mixing=)`` (up to ties in the logits).
- ``triton-separate-topk``, ``cpu-separate-topk``: that backend with the hard negatives from its
  separate top-k kernel instead of the loss's own pass (``CK_MIXING_FUSED_TOPK=0``): the A/B of
  the fusion.
- ``triton-mixed-dots``, ``cpu-mixed-dots``, ``cuda-mixed-dots``: that backend with the synthetic
  logits as a (B, s+s') tensor from ``mixed_dots`` (whose backward gathers the hard rows again)
  instead of their log-sum-exp from ``mixed_lse`` (``CK_MIXING_LSE=0``): the A/B of that fusion.

The plain fused InfoNCE at the same shape is the preset's ``info_nce_bank`` case (backend triton),
so that the overhead of mixing (target: at most 15 %) reads off one table (``vs_plain`` column).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _loss_topk, losses
from .._common import draw_mixing
from .cases import DTYPES, Case, _train_step, _unit, build_step, register_baseline


def eager_mochi_loss(q, k, queue, temperature, n_hard, n_synthetic, n_query_synthetic, generator):
    """MoCHi the usual way (see the module docstring); q gets the gradient, the rest is constant."""
    b, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    with torch.no_grad():
        hard = torch.topk(l_neg, n_hard, dim=1).indices
        hard_rows = queue[hard]  # (B, n_hard, D)
        draws = draw_mixing(b, n_hard, n_synthetic, n_query_synthetic, generator, q.device)

        def pick(pos):
            return hard_rows.gather(1, pos[..., None].expand(-1, -1, d)).to(acc)

        a = draws.alpha[..., None]
        mixed = F.normalize(a * pick(draws.pair_index[..., 0])
                            + (1 - a) * pick(draws.pair_index[..., 1]), dim=-1)
        w = draws.query_weight[..., None]
        mixed_q = F.normalize(w * q.to(acc)[:, None, :] + (1 - w) * pick(draws.query_index), dim=-1)
        synthetic = torch.cat([mixed, mixed_q], 1).to(q.dtype)
    l_syn = torch.einsum("bd,btd->bt", q, synthetic)
    logits = torch.cat([l_pos, l_neg, l_syn], 1).to(acc) / temperature
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=q.device))


@register_baseline("eager-mochi", ops=("mixing",))
def _eager_mochi(c: Case, device: str):
    d = c.dims
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[c.dtype]
    q = _unit(d["B"], d["D"], gen, dtype, device, True)
    k = _unit(d["B"], d["D"], gen, dtype, device)
    queue = _unit(d["K"], d["D"], gen, dtype, device)
    mix_gen = torch.Generator(device).manual_seed(0)
    return _train_step(lambda: eager_mochi_loss(q, k, queue, 0.07, d["n_hard"], d["s"], d["s_q"],
                                                mix_gen), [q])


# the backends whose info_nce(mixing=) takes the hard negatives from the loss's own pass, and those
# that reduce the synthetic logits with mixed_lse
FUSED_TOPK_BACKENDS = ("triton", "cpu")
MIXED_LSE_BACKENDS = ("triton", "cpu", "cuda")


def _with_flag_off(backend: str, module, flag: str):
    """``backend``'s mixing step with ``module.flag`` set to False while it runs."""
    def build(c: Case, device: str):
        step, _ = build_step(c, backend, device)

        def run():
            old = getattr(module, flag)
            setattr(module, flag, False)
            try:
                step()
            finally:
                setattr(module, flag, old)
        return run
    return build


for _backend in FUSED_TOPK_BACKENDS:
    register_baseline(f"{_backend}-separate-topk", ops=("mixing",))(_with_flag_off(_backend, _loss_topk, "FUSED_TOPK"))
for _backend in MIXED_LSE_BACKENDS:
    register_baseline(f"{_backend}-mixed-dots", ops=("mixing",))(_with_flag_off(_backend, losses, "MIXED_LSE"))
