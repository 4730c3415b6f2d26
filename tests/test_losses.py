"""Every fused backend against reference.py: the loss value and every gradient, for every option
of every loss, in fp64 (tight) and fp32 (DESIGN.md's twice-the-eager-error rule), at odd shapes."""

import math

import pytest
import torch

import contrastive_kernels as ck
from _helpers import check_backend, unit

DTYPES = [torch.float64, torch.float32]
SIMS = ["dot", "cosine", "l2"]
ESTIMATORS = {"ce": (0.0, 0.0), "dcl": (0.1, 0.0), "hcl": (0.0, 0.5), "dcl+hcl": (0.2, 1.0)}
QUEUE_MODES = ["in_batch", "queue", "queue_grad", "queue+in_batch"]


def _features(b, d, n=None, scale=1.0):
    """Unit-ish features (cosine-friendly), slightly off unit norm so l2/dot see the norms."""
    n = b if n is None else n
    return unit(n, d) * (1 + 0.3 * torch.rand(n, 1, dtype=torch.float64)) * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("mode", QUEUE_MODES)
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_info_nce_modes(backend, dtype, similarity, mode, estimator):
    b, k, d = 6, 37, 11
    tau_plus, beta = ESTIMATORS[estimator]
    tensors = {"q": _features(b, d), "p": _features(b, d),
               "temperature": torch.tensor(0.3, dtype=torch.float64)}
    grads = ["q", "p", "temperature"]
    if mode != "in_batch":
        tensors["queue"] = _features(k, d)
        if mode == "queue_grad":
            grads.append("queue")
    in_batch = {"in_batch": None, "queue": None, "queue_grad": False, "queue+in_batch": True}[mode]

    def fn(backend, q, p, temperature, queue=None):
        return ck.info_nce(q, p, queue, temperature=temperature, similarity=similarity,
                           in_batch_negatives=in_batch, tau_plus=tau_plus, beta=beta,
                           backend=backend)

    check_backend(fn, tensors, grads, backend, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("estimator", ["ce", "dcl+hcl"])
@pytest.mark.parametrize("similarity", SIMS)
def test_info_nce_extra_negatives_and_reductions(backend, reduction, estimator, similarity):
    b, k, s, d = 5, 19, 4, 9
    tau_plus, beta = ESTIMATORS[estimator]
    tensors = {"q": _features(b, d), "p": _features(b, d), "queue": _features(k, d),
               "extra": _features(b * s, d).view(b, s, d)}

    def fn(backend, q, p, queue, extra):
        return ck.info_nce(q, p, queue, temperature=0.2, similarity=similarity,
                           in_batch_negatives=True, tau_plus=tau_plus, beta=beta,
                           extra_negatives=extra, reduction=reduction, backend=backend)

    check_backend(fn, tensors, ["q", "p", "queue", "extra"], backend, torch.float64)
    check_backend(fn, tensors, ["q", "p", "queue", "extra"], backend, torch.float32)


@pytest.mark.parametrize("b,k,d", [(1, 0, 3), (1, 1, 1), (3, 17, 5), (127, 300, 33), (8, 2500, 16),
                                   (2, 4100, 130)])
@pytest.mark.parametrize("mode", ["queue", "queue_grad", "queue+in_batch"])
def test_info_nce_odd_shapes(backend, b, k, d, mode):
    tensors = {"q": _features(b, d), "p": _features(b, d), "queue": _features(k, d)}
    grads = ["q", "p"] + (["queue"] if mode == "queue_grad" else [])
    in_batch = mode == "queue+in_batch"

    def fn(backend, q, p, queue):
        return ck.info_nce(q, p, queue, temperature=0.1, in_batch_negatives=in_batch,
                           similarity="cosine", reduction="none", backend=backend)

    for dtype in DTYPES:
        check_backend(fn, tensors, grads, backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("estimator", ["ce", "dcl", "dcl+hcl"])
@pytest.mark.parametrize("b", [1, 3, 20])
def test_nt_xent(backend, dtype, similarity, estimator, b):
    tau_plus, beta = ESTIMATORS[estimator]
    tensors = {"z1": _features(b, 7), "z2": _features(b, 7),
               "temperature": torch.tensor(0.5, dtype=torch.float64)}

    def fn(backend, z1, z2, temperature):
        return ck.nt_xent(z1, z2, temperature=temperature, similarity=similarity,
                          tau_plus=tau_plus, beta=beta, reduction="none", backend=backend)

    check_backend(fn, tensors, ["z1", "z2", "temperature"], backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("n,d", [(1, 4), (5, 8), (67, 30)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_clip_loss(backend, dtype, similarity, n, d, reduction):
    tensors = {"img": _features(n, d), "txt": _features(n, d),
               "scale": torch.tensor(14.0, dtype=torch.float64)}

    def fn(backend, img, txt, scale):
        return ck.clip_loss(img, txt, scale, similarity=similarity, reduction=reduction,
                            backend=backend)

    check_backend(fn, tensors, ["img", "txt", "scale"], backend, dtype)


def _int_labels(b, classes):
    return torch.randint(0, classes, (b,))


def _multi_hot(b, classes, p=0.3):
    return (torch.rand(b, classes) < p).long()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("labels", ["int", "int_singletons", "multi_hot", "multi_hot_wide"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sup_con(backend, dtype, similarity, labels, reduction):
    b = 13
    lab = {"int": lambda: _int_labels(b, 4), "int_singletons": lambda: torch.arange(b) % 11,
           "multi_hot": lambda: _multi_hot(b, 5), "multi_hot_wide": lambda: _multi_hot(b, 130, 0.02)}[labels]()
    tensors = {"f": _features(b, 10), "temperature": torch.tensor(0.2, dtype=torch.float64)}

    def fn(backend, f, temperature):
        return ck.sup_con(f, lab, temperature=temperature, similarity=similarity,
                          reduction=reduction, backend=backend)

    check_backend(fn, tensors, ["f", "temperature"], backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("with_queue", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_multi_positive_info_nce(backend, dtype, similarity, with_queue, reduction):
    b, n, k, p, d = 7, 12, 25, 3, 6
    cols = n + (k if with_queue else 0)
    index = torch.randint(0, cols, (b, p))
    index[torch.rand(b, p) < 0.3] = -1
    index[2] = -1  # a row without a positive
    tensors = {"q": _features(b, d), "keys": _features(n, d),
               "temperature": torch.tensor(0.25, dtype=torch.float64)}
    grads = ["q", "keys", "temperature"]
    if with_queue:
        tensors["queue"] = _features(k, d)
        grads.append("queue")

    def fn(backend, q, keys, temperature, queue=None):
        return ck.multi_positive_info_nce(q, keys, index, queue, temperature=temperature,
                                          similarity=similarity, reduction=reduction,
                                          backend=backend)

    check_backend(fn, tensors, grads, backend, dtype)


@pytest.mark.parametrize("estimator", ["ce", "dcl+hcl"])
@pytest.mark.parametrize("similarity", SIMS)
def test_info_nce_mixing_matches_reference(backend, estimator, similarity):
    b, k, d = 6, 40, 8
    tau_plus, beta = ESTIMATORS[estimator]
    tensors = {"q": unit(b, d), "p": unit(b, d), "queue": unit(k, d)}

    def fn(backend, q, p, queue):
        mixing = ck.Mixing(10, 6, 3, generator=torch.Generator().manual_seed(7))
        return ck.info_nce(q, p, queue, temperature=0.2, similarity=similarity, tau_plus=tau_plus,
                           beta=beta, mixing=mixing, backend=backend)

    # the queue gets no gradient through the synthetic points, only through its own logits
    check_backend(fn, tensors, ["q", "p", "queue"], backend, torch.float64)


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("estimator", ["ce", "dcl"])
def test_nt_xent_mixing_matches_reference(backend, similarity, estimator):
    tau_plus, beta = ESTIMATORS[estimator]
    tensors = {"z1": _features(9, 6), "z2": _features(9, 6)}

    def fn(backend, z1, z2):
        mixing = ck.Mixing(5, 4, 2, generator=torch.Generator().manual_seed(3))
        return ck.nt_xent(z1, z2, temperature=0.3, similarity=similarity, tau_plus=tau_plus,
                          beta=beta, mixing=mixing, backend=backend)

    check_backend(fn, tensors, ["z1", "z2"], backend, torch.float64)


def test_chunking_boundaries(backend):
    """Tiny chunks: every loss crosses many chunk boundaries (and exclusions fall across them)."""
    from contrastive_kernels import chunked

    old = chunked.set_memory_budget(2048)
    try:
        test_info_nce_modes(backend, torch.float64, "l2", "queue+in_batch", "dcl+hcl")
        test_nt_xent(backend, torch.float64, "cosine", "dcl", 20)
        test_clip_loss(backend, torch.float64, "dot", 67, 30, "none")
        test_sup_con(backend, torch.float64, "cosine", "multi_hot", "none")
    finally:
        chunked.set_memory_budget(old)


def _dcl_fp64(l_pos, l_neg, tau_plus, beta, temperature):
    """DCL/HCL straight from Chuang et al. / Robinson et al. in fp64 (no shifts: the logits here
    are far from fp64's range)."""
    n = l_neg.shape[1]
    w = torch.exp(beta * l_neg)
    pos, neg = torch.exp(l_pos), torch.exp(l_neg)
    ng = (-tau_plus * n * pos + n * (w * neg).sum(1) / w.sum(1)) / (1 - tau_plus)
    ng = torch.maximum(ng, torch.full_like(ng, n * math.exp(-1.0 / temperature)))
    return -torch.log(pos / (pos + ng))


@pytest.mark.parametrize("fn_name", ["info_nce", "nt_xent"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_debiased_loss_finite_when_every_logit_is_far_below_minus_one_over_t(backend, fn_name, beta):
    """DCL/HCL's floor N e^{-1/T} once overflowed (inf loss, NaN gradient) in fp32 when every logit
    was far below -1/T (l2 similarities at T = 0.01): finite features must give a finite loss,
    here the fp64 formula's."""
    t = 0.01
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    p = torch.tensor([[0.0, 1.0], [-0.8, 0.6]])
    queue = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [0.6, -0.8]])
    qg = q.clone().requires_grad_()
    if fn_name == "info_nce":
        loss = ck.info_nce(qg, p, queue, temperature=t, similarity="l2", tau_plus=0.1, beta=beta,
                           backend=backend)
        l_all = -torch.cdist(q.double(), torch.cat([p, queue]).double()) ** 2 / t
        want = _dcl_fp64(l_all[torch.arange(2), torch.arange(2)], l_all[:, 2:], 0.1, beta, t).mean()
    else:  # four unit vectors 90 degrees apart: every logit -200 or -400
        q, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
        qg = q.clone().requires_grad_()
        loss = ck.nt_xent(qg, p, temperature=t, similarity="l2", tau_plus=0.1, beta=beta,
                          backend=backend)
        z = torch.cat([q, p]).double()
        l_all = -torch.cdist(z, z) ** 2 / t
        rows = []
        for i in range(4):
            j = (i + 2) % 4
            others = [c for c in range(4) if c not in (i, j)]
            rows.append(_dcl_fp64(l_all[i, j].view(1), l_all[i, others].view(1, -1), 0.1, beta, t))
        want = torch.cat(rows).mean()
    (grad,) = torch.autograd.grad(loss, qg)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.double() - want).item() < 1e-5 * abs(want.item())


@pytest.mark.parametrize("backend_name", ["chunked", "cpu"])
def test_fp16_temperature_gradient_stays_finite(backend_name):
    """A learned fp16 temperature whose gradient fits fp16: DCL/HCL with l2 at B=300, K=5000 has
    d/dT = -49667 (fp32), but its partial gradients along separate uses of T exceeded 65504 when
    each use cast T on its own (d/dT was -inf on every backend, seen on an H100); one cast keeps
    the sum in fp32."""
    if ck.available_backends("cpu")[backend_name] is not None:
        pytest.skip(ck.available_backends("cpu")[backend_name])
    g = torch.Generator().manual_seed(1)

    def rows(n):
        x = torch.nn.functional.normalize(torch.randn(n, 96, generator=g, dtype=torch.float64), dim=1)
        return x * (1 + 0.3 * torch.rand(n, 1, generator=g, dtype=torch.float64))

    q, p, queue = rows(300), rows(300), rows(5000)
    grads = {}
    for dtype in (torch.float16, torch.float32):
        t = torch.tensor(0.1, dtype=dtype, requires_grad=True)
        loss = ck.info_nce(q.to(dtype), p.to(dtype), queue.to(dtype), temperature=t, similarity="l2",
                           in_batch_negatives=True, tau_plus=0.1, beta=0.5, reduction="sum",
                           backend=backend_name)
        grads[dtype] = torch.autograd.grad(loss, [t])[0].double()
    assert abs(grads[torch.float32].item()) > 4e4  # the case is the one that overflowed
    assert torch.isfinite(grads[torch.float16])
    assert abs(grads[torch.float16] - grads[torch.float32]).item() < 2e-3 * abs(grads[torch.float32].item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paired_dot_in_chunks(dtype, monkeypatch):
    """losses._PairedDot (row dots of low-precision rows, fp32 formed a chunk at a time) against
    plain fp32 autograd: value and both gradients, with chunks of 7 rows (a ragged last one) and
    the same tensor on both sides (squared norms)."""
    from contrastive_kernels import losses

    monkeypatch.setattr(losses, "_PAIRED_CHUNK_ELEMENTS", 7 * 33)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 33, generator=g).to(dtype).requires_grad_()
    b = torch.randn(50, 33, generator=g).to(dtype).requires_grad_()
    w = torch.randn(50, generator=g)
    af, bf = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    cases = [(losses._paired_dot(a, b), (af * bf).sum(-1), [a, b], [af, bf]),
             (losses._paired_dot(a, a), (af * af).sum(-1), [a], [af])]
    for got, want, leaves, leaves_f in cases:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
        got_g = torch.autograd.grad((got * w).sum(), leaves)
        want_g = torch.autograd.grad((want * w).sum(), leaves_f)
        for gg, wg in zip(got_g, want_g):
            assert gg.dtype == dtype
            torch.testing.assert_close(gg.float(), wg.to(dtype).float(), rtol=1e-2, atol=1e-2)
