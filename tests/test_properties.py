"""Property tests: random shapes and options, each fused backend against the reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import contrastive_kernels as ck
from _helpers import check_backend

from conftest import FUSED_BACKENDS

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tensor(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g) * 0.7


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@SETTINGS
@given(b=st.integers(1, 12), k=st.integers(0, 60), d=st.integers(1, 9), s=st.integers(0, 4),
       similarity=st.sampled_from(["dot", "cosine", "l2"]),
       in_batch=st.sampled_from([None, True, False]),
       tau_plus=st.sampled_from([0.0, 0.05, 0.5]), beta=st.sampled_from([0.0, 0.3, 2.0]),
       temperature=st.floats(0.05, 2.0), queue_grad=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_info_nce_property(backend, b, k, d, s, similarity, in_batch, tau_plus, beta, temperature,
                           queue_grad, reduction, seed):
    tensors = {"q": _tensor(seed, b, d), "p": _tensor(seed + 1, b, d), "queue": _tensor(seed + 2, k, d)}
    grads = ["q", "p"] + (["queue"] if queue_grad else [])
    if s:
        tensors["extra"] = _tensor(seed + 3, b, s, d)
        grads.append("extra")

    def fn(backend, q, p, queue, extra=None):
        return ck.info_nce(q, p, queue, temperature=temperature, similarity=similarity,
                           in_batch_negatives=in_batch, tau_plus=tau_plus, beta=beta,
                           extra_negatives=extra, reduction=reduction, backend=backend)

    check_backend(fn, tensors, grads, backend, torch.float64)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@SETTINGS
@given(b=st.integers(1, 16), d=st.integers(1, 9), classes=st.integers(1, 6),
       multi_hot=st.booleans(), similarity=st.sampled_from(["dot", "cosine", "l2"]),
       temperature=st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
def test_sup_con_property(backend, b, d, classes, multi_hot, similarity, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    labels = ((torch.rand(b, classes, generator=g) < 0.4).long() if multi_hot
              else torch.randint(0, classes, (b,), generator=g))

    def fn(backend, f):
        return ck.sup_con(f, labels, temperature=temperature, similarity=similarity,
                          reduction="none", backend=backend)

    check_backend(fn, {"f": _tensor(seed, b, d)}, ["f"], backend, torch.float64)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@SETTINGS
@given(n=st.integers(1, 20), d=st.integers(1, 9), similarity=st.sampled_from(["dot", "cosine", "l2"]),
       scale=st.floats(0.5, 50.0), seed=st.integers(0, 2**16))
def test_clip_property(backend, n, d, similarity, scale, seed):
    def fn(backend, img, txt):
        return ck.clip_loss(img, txt, scale, similarity=similarity, reduction="none", backend=backend)

    check_backend(fn, {"img": _tensor(seed, n, d), "txt": _tensor(seed + 1, n, d)}, ["img", "txt"],
                  backend, torch.float64)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@SETTINGS
@given(m=st.integers(1, 10), n=st.integers(1, 200), d=st.integers(1, 8), data=st.data(),
       similarity=st.sampled_from(["dot", "cosine", "l2"]), seed=st.integers(0, 2**16))
def test_topk_property(backend, m, n, d, data, similarity, seed):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    # small integer-valued features: many exact ties, which must resolve to the lower index
    q = torch.randint(-2, 3, (m, d), generator=g).float()
    bank = torch.randint(-2, 3, (n, d), generator=g).float()
    want = ck.topk_similarity(q, bank, k, similarity=similarity, backend="reference")
    got = ck.topk_similarity(q, bank, k, similarity=similarity, backend=backend)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    if similarity != "cosine":  # exact integer scores: the order must match exactly
        assert torch.equal(got[1], want[1])
