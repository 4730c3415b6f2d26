"""Comparing a backend with reference.py: forward value and every gradient.

The tolerance policy of DESIGN.md: the fp64 reference is the truth; a backend run in fp64 must
match it closely, and a backend run in a lower precision may err at most twice as much as the
eager reference run in that same precision (plus a small floor).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch


def evaluate(fn: Callable, tensors: Dict[str, torch.Tensor], grad_names: Iterable[str],
             backend: str, dtype: torch.dtype):
    """Run ``fn(backend=..., **tensors cast to dtype)`` and return [output, *gradients].

    A non-scalar output is reduced with fixed unequal row weights so that every row's gradient
    is checked, not just their sum."""
    grad_names = list(grad_names)
    local = {}
    for name, t in tensors.items():
        x = t.detach().to(dtype) if t.is_floating_point() else t
        if name in grad_names:
            x.requires_grad_(True)
        local[name] = x
    out = fn(backend=backend, **local)
    if out.dim() == 0:
        scalar = out
    else:
        scalar = (out * torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype, device=out.device)).sum()
    needs = [local[n] for n in grad_names]
    grads = torch.autograd.grad(scalar, needs, allow_unused=True) if needs else ()
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, needs)]
    return [out.detach()] + [g.detach() for g in grads]


def check_backend(fn: Callable, tensors: Dict[str, torch.Tensor], grad_names, backend: str,
                  dtype=torch.float32, floor=1e-5):
    """Assert that ``backend`` matches the reference (value and every gradient) at ``dtype``."""
    grad_names = list(grad_names)
    ref64 = evaluate(fn, tensors, grad_names, "reference", torch.float64)
    got = evaluate(fn, tensors, grad_names, backend, dtype)
    names = ["value"] + [f"d/d{n}" for n in grad_names]
    for name, g, r in zip(names, got, ref64):
        assert g.shape == r.shape, f"{backend} {name}: shape {tuple(g.shape)} != reference {tuple(r.shape)}"
    if dtype == torch.float64:
        for name, g, r in zip(names, got, ref64):
            scale = 1.0 + r.abs().max().item() if r.numel() else 1.0
            err = (g - r).abs().max().item() if r.numel() else 0.0
            assert err <= 1e-7 * scale, f"{backend} {name}: max error {err:.3g} vs fp64 reference (scale {scale:.3g})"
        return
    same = evaluate(fn, tensors, grad_names, "reference", dtype)
    for name, g, s, r in zip(names, got, same, ref64):
        if r.numel() == 0:
            continue
        assert torch.isfinite(g.float()).all() == torch.isfinite(r).all(), f"{backend} {name}: finiteness differs"
        err = (g.double() - r).abs().max().item()
        err_ref = (s.double() - r).abs().max().item()
        scale = 1.0 + r.abs().max().item()
        assert err <= 2 * err_ref + floor * scale, (
            f"{backend} {name} at {dtype}: error {err:.3g} vs fp64 reference exceeds twice the eager "
            f"reference's {err_ref:.3g} + floor {floor * scale:.3g}")


def unit(*shape, dtype=torch.float64, generator=None):
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype, generator=generator), dim=-1)


def check_low_precision(fn: Callable, tensors: Dict[str, torch.Tensor], grad_names, backend: str,
                        dtype, quantum: float, floor=1e-5):
    """The twice-the-eager-error rule for fp16/bf16, in two forms.

    1. DESIGN's rule against the fp64 reference, with a floor of one ulp of ``dtype`` at 1.0
       (``quantum``): the rounding of the inputs to ``dtype`` is shared by every implementation,
       and on a single element an eager run can undo it by luck.
    2. The same rule against the fp64 reference run on the inputs rounded to ``dtype``, where only
       arithmetic error remains, with the small ``floor``: the backend's arithmetic must be at
       least half as accurate as eager PyTorch's in that dtype.
    """
    grad_names = list(grad_names)
    check_backend(fn, tensors, grad_names, backend, dtype, floor=quantum)
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in tensors.items()}
    exact = evaluate(fn, rounded, grad_names, "reference", torch.float64)
    got = evaluate(fn, tensors, grad_names, backend, dtype)
    eager = evaluate(fn, tensors, grad_names, "reference", dtype)
    for name, g, e, r in zip(["value"] + [f"d/d{n}" for n in grad_names], got, eager, exact):
        if r.numel() == 0:
            continue
        assert torch.isfinite(g.float()).all(), f"{backend} {name} at {dtype}: non-finite"
        err = (g.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        scale = 1.0 + r.abs().max().item()
        assert err <= 2 * err_eager + floor * scale, (
            f"{backend} {name} at {dtype} on rounded inputs: error {err:.3g} exceeds twice the eager "
            f"reference's {err_eager:.3g} + floor {floor * scale:.3g}")


def lse_inputs(b, n, d, dtype=torch.float64, seed=0, col_scale=True, biases=True):
    """[q, k, row scale, column scale, row bias, column bias] of an ``lse_stats`` case, drawn in
    fp64 (scales in [0.5, 1.5)) and cast to ``dtype``; a part left out is None."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(rows, d, dtype=torch.float64, generator=g) for rows in (b, n))
    a = torch.rand(b, dtype=torch.float64, generator=g) + 0.5
    bb = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
    c = torch.randn(b, dtype=torch.float64, generator=g)
    dd = torch.randn(n, dtype=torch.float64, generator=g)
    parts = [q, k, a, bb if col_scale else None, c if biases else None, dd if biases else None]
    return [t.to(dtype) if t is not None else None for t in parts]


def lse_case(fn, inputs, grad_mask, device=None, **kw):
    """Outputs and input gradients (fp64, on the CPU) of ``fn`` = an ``lse_stats`` on ``device``
    (default: where the inputs are), each output weighted by fixed random weights so that every
    entry's gradient is checked."""
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    leaves = [move(t.detach().clone()).requires_grad_(m) if t is not None else None
              for t, m in zip(inputs, grad_mask)]
    kw = {name: (move(v) if torch.is_tensor(v) else v) for name, v in kw.items()}
    row, ps, pc, col = fn(*leaves, **kw)
    gen = torch.Generator().manual_seed(5)

    def weighted(x):
        w = torch.rand(x.shape, generator=gen, dtype=torch.float64)
        return (x * w.to(x.device, x.dtype)).sum()

    total = weighted(row) + weighted(ps) + (weighted(col) if col.numel() else 0)
    needs = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(total, needs) if needs else []
    return [x.detach().double().cpu() for x in (row, ps, pc, col, *grads)]


def faiss_topk(q, bank, k, similarity):
    """Exact top-k (values, indices) by FAISS flat indexes, the independent oracle of top-k;
    l2 values are negated squared distances, as topk_similarity defines them."""
    import faiss
    import torch.nn.functional as F
    if similarity == "l2":
        index = faiss.IndexFlatL2(q.shape[1])
        index.add(bank.numpy())
        dist, idx = index.search(q.numpy(), k)
        return -torch.from_numpy(dist), torch.from_numpy(idx)
    if similarity == "cosine":
        q, bank = F.normalize(q, dim=1), F.normalize(bank, dim=1)
    index = faiss.IndexFlatIP(q.shape[1])
    index.add(bank.numpy())
    dist, idx = index.search(q.numpy(), k)
    return torch.from_numpy(dist), torch.from_numpy(idx)


LSE_LABELS = ("none", "eq", "bits")
LSE_EXCLUDES = ("none", "one", "two")


def lse_options(b, n, exclude, labels, gammas, col_lse, grad_side):
    """(grad mask, keyword arguments) of an lse_stats case over every option: exclusions (none,
    one or two per row; row 0 excludes nothing), labels (none, integer, multi-hot bitsets),
    gammas, the column log-sum-exp, and gradients for the query side only or both sides."""
    from contrastive_kernels._common import pack_multi_hot

    excl = {"none": None, "one": torch.arange(b)[:, None] % n,
            "two": torch.stack([torch.arange(b) % n, (torch.arange(b) * 7 + 3) % n], 1)}[exclude]
    if excl is not None:
        excl[0] = -1  # a row that excludes nothing
    ql, kl = {"none": lambda: (None, None),
              "eq": lambda: (torch.arange(b) % 3, torch.arange(n) % 4),
              "bits": lambda: (pack_multi_hot((torch.rand(b, 70) < 0.1).long()),
                               pack_multi_hot((torch.rand(n, 70) < 0.1).long()))}[labels]()
    both = grad_side == "both"
    mask = [True, both, True, both, True, both]
    return mask, dict(gammas=gammas, exclude=excl, q_labels=ql, k_labels=kl, want_col_lse=col_lse)


def queue_case(b, n, d, dtype, affine="dot", gammas=(1.0,), seed=0, integer=False):
    """(q, k, row_scale, col_scale, row_bias, col_bias, gammas) of lse_stats over a queue, with
    the affine form of a similarity (tests of lse_stats_topk)."""
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact scores with many ties
        q = torch.randint(-1, 2, (b, d), generator=g).to(dtype)
        k = torch.randint(-1, 2, (n, d), generator=g).to(dtype)
    else:
        q = torch.randn(b, d, generator=g).to(dtype)
        k = torch.randn(n, d, generator=g).to(dtype)
    a = torch.rand(b, generator=g) + 2.0
    col = torch.rand(n, generator=g) + 0.5 if affine == "cosine" else None
    rb = -torch.rand(b, generator=g) if affine == "l2" else None
    cb = -torch.rand(n, generator=g) if affine == "l2" else None
    return q, k, a, col, rb, cb, list(gammas)
