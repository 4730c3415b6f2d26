"""DESIGN.md's bad-input table: every case raises ValueError/TypeError naming the argument and
what was expected, before any backend runs. And non-finite features never give a finite loss."""
import math

import pytest
import torch

import contrastive_kernels as ck

from conftest import FUSED_BACKENDS

q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)
ALL_BACKENDS = ["reference", *FUSED_BACKENDS]


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


BAD = [
    # (id, exception, message pattern, call)
    ("query rank", ValueError, "query must be 2-D", lambda: ck.info_nce(q[0], k)),
    ("query rank 3", ValueError, "query must be 2-D", lambda: ck.info_nce(q[None], k)),
    ("queue rank", ValueError, "queue must be 2-D", lambda: ck.info_nce(q, k, queue[0])),
    ("key dim", ValueError, "positive_key must have feature dimension 8", lambda: ck.info_nce(q, k[:, :5])),
    ("queue dim", ValueError, "queue must have feature dimension 8", lambda: ck.info_nce(q, k, queue[:, :3])),
    ("key rows", ValueError, "positive_key must have 4 rows", lambda: ck.info_nce(q, k[:3])),
    ("dtype mix", TypeError, "positive_key has dtype torch.float64", lambda: ck.info_nce(q, k.double())),
    ("queue dtype", TypeError, "queue has dtype torch.float16", lambda: ck.info_nce(q, k, queue.half())),
    ("device mix", ValueError, "positive_key is on meta", lambda: ck.info_nce(q, k.to("meta"))),
    ("int features", TypeError, "query must be a floating-point tensor", lambda: ck.info_nce(q.long(), k.long())),
    ("not a tensor", TypeError, "query must be a torch.Tensor", lambda: ck.info_nce(q.tolist(), k)),
    ("empty batch", ValueError, "query is empty", lambda: ck.info_nce(q[:0], k[:0])),
    ("zero dim", ValueError, "feature dimension 0", lambda: ck.info_nce(q[:, :0], k[:, :0])),
    ("T zero", ValueError, "temperature must be a finite number >= 1.18e-38", lambda: ck.info_nce(q, k, temperature=0.0)),
    ("T negative", ValueError, "temperature", lambda: ck.info_nce(q, k, temperature=-0.1)),
    ("T nan", ValueError, "temperature", lambda: ck.info_nce(q, k, temperature=math.nan)),
    ("T inf", ValueError, "temperature", lambda: ck.info_nce(q, k, temperature=math.inf)),
    ("T tensor zero", ValueError, "temperature must be a finite number >= 1.18e-38", lambda: ck.info_nce(q, k, temperature=torch.tensor(0.0))),
    # 1 / temperature overflows float32 below its smallest normal: an error, not a NaN loss
    ("T tiny", ValueError, "temperature must be a finite number >= 1.18e-38, got 1e-39", lambda: ck.info_nce(q, k, temperature=1e-39)),
    ("T tensor tiny", ValueError, "temperature must be a finite number >= 1.18e-38", lambda: ck.nt_xent(q, k, temperature=torch.tensor(1e-44))),
    ("T tensor inf", ValueError, "temperature", lambda: ck.sup_con(q, torch.arange(4), temperature=torch.tensor(math.inf))),
    ("T tensor 1-D", ValueError, "temperature must be a float or a 0-dim tensor", lambda: ck.info_nce(q, k, temperature=torch.ones(1))),
    ("T int tensor", TypeError, "temperature must be a floating-point tensor", lambda: ck.info_nce(q, k, temperature=torch.tensor(1))),
    ("T str", TypeError, "temperature must be a float", lambda: ck.info_nce(q, k, temperature="0.1")),
    ("T bool", TypeError, "temperature", lambda: ck.info_nce(q, k, temperature=True)),
    ("similarity", ValueError, "similarity must be one of 'dot', 'cosine', 'l2'; got 'euclid'", lambda: ck.info_nce(q, k, similarity="euclid")),
    ("reduction", ValueError, "reduction must be one of", lambda: ck.info_nce(q, k, reduction="avg")),
    ("backend", ValueError, "backend must be one of", lambda: ck.info_nce(q, k, backend="gpu")),
    ("tau_plus 1", ValueError, r"tau_plus must be in \[0.0, 1.0\)", lambda: ck.info_nce(q, k, tau_plus=1.0)),
    ("tau_plus neg", ValueError, "tau_plus", lambda: ck.info_nce(q, k, tau_plus=-0.1)),
    ("beta neg", ValueError, "beta", lambda: ck.info_nce(q, k, beta=-1.0)),
    ("beta str", TypeError, "beta must be a float", lambda: ck.info_nce(q, k, beta="x")),
    ("in_batch type", TypeError, "in_batch_negatives must be None or a bool", lambda: ck.info_nce(q, k, in_batch_negatives=1)),
    ("extra rank", ValueError, "extra_negatives must be 3-D", lambda: ck.info_nce(q, k, extra_negatives=queue)),
    ("extra rows", ValueError, "extra_negatives must have 4 rows", lambda: ck.info_nce(q, k, extra_negatives=torch.randn(3, 2, 8))),
    ("mixing no queue", ValueError, "mixing needs a queue with at least n_hard=4", lambda: ck.info_nce(q, k, mixing=ck.Mixing(4, 2, 1))),
    ("mixing n_hard", ValueError, "n_hard=32", lambda: ck.info_nce(q, k, queue, mixing=ck.Mixing(32, 2, 1))),
    ("mixing type", TypeError, "mixing must be a contrastive_kernels.Mixing", lambda: ck.info_nce(q, k, queue, mixing=(4, 2, 1))),
    ("Mixing fields", ValueError, "n_hard must be >= 1", lambda: ck.Mixing(0, 2)),
    ("Mixing type", TypeError, "n_synthetic must be an int", lambda: ck.Mixing(2, 2.5)),
    ("nt_xent rows", ValueError, "z2 must have 4 rows", lambda: ck.nt_xent(q, k[:2])),
    ("nt_xent mixing", ValueError, "exceeds the 6 in-batch negatives", lambda: ck.nt_xent(q, k, mixing=ck.Mixing(7, 2))),
    ("clip scale", ValueError, "logit_scale must be a finite number > 0", lambda: ck.clip_loss(q, k, 0.0)),
    ("clip scale tensor", ValueError, "logit_scale must be a finite number > 0", lambda: ck.clip_loss(q, k, torch.tensor(-1.0))),
    ("clip rows", ValueError, "text_features must have 4 rows", lambda: ck.clip_loss(q, k[:1], 10.0)),
    ("supcon float labels", TypeError, "labels must hold integer class ids", lambda: ck.sup_con(q, torch.ones(4))),
    ("supcon label rows", ValueError, "labels must have 4 rows", lambda: ck.sup_con(q, torch.zeros(5, dtype=torch.long))),
    ("supcon label rank", ValueError, "labels must be", lambda: ck.sup_con(q, torch.zeros(4, 2, 2, dtype=torch.long))),
    ("mp index float", TypeError, "positive_index must be an integer tensor", lambda: ck.multi_positive_info_nce(q, k, torch.zeros(4, 2))),
    ("mp index rows", ValueError, "positive_index must have 4 rows", lambda: ck.multi_positive_info_nce(q, k, torch.zeros(3, 2, dtype=torch.long))),
    ("mp index high", ValueError, r"positive_index must hold indices in \[-1, 20\), found 20", lambda: ck.multi_positive_info_nce(q, k, torch.full((4, 1), 20), queue)),
    ("mp index low", ValueError, "found -2", lambda: ck.multi_positive_info_nce(q, k, torch.full((4, 1), -2))),
    ("topk k 0", ValueError, "k must be >= 1", lambda: ck.topk_similarity(q, queue, 0)),
    ("topk k big", ValueError, "k=17 exceeds the 16 rows of bank", lambda: ck.topk_similarity(q, queue, 17)),
    ("topk k float", TypeError, "k must be an int", lambda: ck.topk_similarity(q, queue, 2.0)),
    ("topk k bool", TypeError, "k must be an int", lambda: ck.topk_similarity(q, queue, True)),
    ("topk k after exclusion", ValueError, "k=16 exceeds the bank rows left after exclusions: query row 0 has only 15",
     lambda: ck.topk_similarity(q, queue, 16, exclude_index=torch.tensor([3, -1, -1, -1]))),
    ("topk exclude range", ValueError, r"exclude_index must hold indices in \[-1, 16\)", lambda: ck.topk_similarity(q, queue, 2, exclude_index=torch.tensor([16, 0, 0, 0]))),
    ("topk exclude rows", ValueError, "exclude_index must have 4 rows", lambda: ck.topk_similarity(q, queue, 2, exclude_index=torch.tensor([1]))),
    ("topk labels missing", ValueError, "exclude_same_label=True needs both", lambda: ck.topk_similarity(q, queue, 2, exclude_same_label=True)),
    ("topk labels k", ValueError, "exceeds the bank rows left after exclusions",
     lambda: ck.topk_similarity(q, queue, 9, query_labels=torch.zeros(4, dtype=torch.long),
                                bank_labels=torch.arange(16) % 2, exclude_same_label=True)),
    ("topk dtype", TypeError, "bank has dtype", lambda: ck.topk_similarity(q, queue.double(), 2)),
    ("topk dim", ValueError, "bank must have feature dimension 8", lambda: ck.topk_similarity(q, queue[:, :2], 2)),
    ("topk similarity", ValueError, "similarity must be one of", lambda: ck.topk_similarity(q, queue, 2, similarity="ip")),
    ("mine k", ValueError, "k=4 exceeds the 3 other rows", lambda: ck.mine_semantic_positives(q, 4, 0.5)),
    ("mine threshold", ValueError, "threshold", lambda: ck.mine_semantic_positives(q, 2, math.nan)),
    ("mine threshold inf", ValueError, r"threshold must be in \[-inf, inf\), got inf", lambda: ck.mine_semantic_positives(q, 2, math.inf)),
    ("mix index range", ValueError, r"hard_index must hold indices in \[0, 16\)", lambda: ck.mix_hard_negatives(q, queue, torch.full((4, 2), 16), 2, 1)),
    ("mix index empty", ValueError, "hard_index must have at least one column", lambda: ck.mix_hard_negatives(q, queue, torch.zeros(4, 0, dtype=torch.long), 2, 1)),
    ("mix counts", ValueError, "n_synthetic must be >= 0", lambda: ck.mix_hard_negatives(q, queue, torch.zeros(4, 2, dtype=torch.long), -1, 1)),
    ("mix generator", TypeError, "generator must be a torch.Generator", lambda: ck.mix_hard_negatives(q, queue, torch.zeros(4, 2, dtype=torch.long), 1, 1, generator=3)),
    ("backend unavailable", ck.BackendUnavailableError, "backend='cuda' is not available on cpu", lambda: ck.info_nce(q, k, backend="cuda")),
    ("queue size", ValueError, "size must be a positive int", lambda: ck.nn.MoCoQueue(0, 8)),
    ("queue dtype", TypeError, "dtype must be a floating torch.dtype", lambda: ck.nn.MoCoQueue(4, 8, dtype=torch.int64)),
    ("enqueue shape", ValueError, r"keys must be \(n, 8\)", lambda: ck.nn.MoCoQueue(4, 8).enqueue(torch.randn(2, 3))),
    ("sparse features", TypeError, "query must be a dense tensor, got a torch.sparse_coo one", lambda: ck.info_nce(q.to_sparse(), k)),
    ("sparse bank", TypeError, "bank must be a dense tensor, got a torch.sparse_coo one", lambda: ck.topk_similarity(q, queue.to_sparse(), 2)),
    ("csr features", TypeError, "z1 must be a dense tensor, got a torch.sparse_csr one", lambda: ck.nt_xent(q.to_sparse_csr(), k)),
    ("nested features", TypeError, "query must be a dense tensor, got a nested one", lambda: ck.info_nce(torch.nested.nested_tensor([q[0], q[1]]), k)),
    ("sparse enqueue", TypeError, "keys must be a dense tensor", lambda: ck.nn.MoCoQueue(4, 8).enqueue(torch.randn(2, 8).to_sparse())),
    ("sparse labels", TypeError, "labels must be a dense tensor", lambda: ck.sup_con(q, torch.tensor([0, 1, 0, 1]).to_sparse())),
]


@pytest.mark.parametrize("exc,match,call", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(exc, match, call):
    _raises(exc, match, call)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_other_number_types(backend):
    """A Fraction temperature and numpy ints in Mixing are numbers like any other: the result of
    the plain float / int."""
    np = pytest.importorskip("numpy")
    from fractions import Fraction

    want = ck.info_nce(q, k, queue, temperature=0.1, backend=backend)
    got = ck.info_nce(q, k, queue, temperature=Fraction(1, 10), backend=backend)
    assert torch.allclose(got, want, rtol=1e-6)
    mix = ck.Mixing(np.int64(3), np.int32(2), np.int16(1))
    assert (mix.n_hard, mix.n_synthetic, mix.n_query_synthetic) == (3, 2, 1)
    assert all(type(n) is int for n in (mix.n_hard, mix.n_synthetic, mix.n_query_synthetic))
    _raises(TypeError, "Mixing.n_hard must be an int, got float", ck.Mixing, 3.0, 2)


NONFINITE = [math.nan, math.inf, -math.inf]


def _loss_calls(f, g, h):
    """Every loss on (f, g, h), h a queue / keys; each input of them can carry the bad value."""
    labels = torch.tensor([0, 1, 0, 1])
    index = torch.tensor([[0, 5], [1, -1], [2, 3], [4, 4]])
    return {
        "info_nce": lambda be: ck.info_nce(f, g, h, backend=be),
        "info_nce_in_batch": lambda be: ck.info_nce(f, g, h, in_batch_negatives=True, backend=be),
        "info_nce_dcl": lambda be: ck.info_nce(f, g, h, tau_plus=0.1, beta=0.5, backend=be),
        "nt_xent": lambda be: ck.nt_xent(f, g, backend=be),
        "clip": lambda be: ck.clip_loss(f, g, 10.0, backend=be),
        "sup_con": lambda be: ck.sup_con(f, labels, backend=be),
        "multi_positive": lambda be: ck.multi_positive_info_nce(f, h, index, backend=be),
    }


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["first", "second", "third"])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nonfinite_features_never_give_a_finite_loss(backend, where, bad):
    tensors = [torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)]
    slot = ["first", "second", "third"].index(where)
    tensors[slot][1, 2] = bad
    for name, call in _loss_calls(*tensors).items():
        if slot == 2 and name in ("nt_xent", "clip", "sup_con"):
            continue  # these do not read the third tensor
        if slot == 1 and name in ("multi_positive", "sup_con"):
            continue
        try:
            loss = call(backend)
        except (ValueError, TypeError):
            continue
        assert not torch.isfinite(loss), f"{name} gave a finite loss {loss} with {bad} in the {where} input"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_finite_features_stay_finite_at_low_temperature(backend, dtype, similarity):
    f = torch.nn.functional.normalize(torch.randn(6, 32), dim=1).to(dtype)
    g = torch.nn.functional.normalize(torch.randn(6, 32), dim=1).to(dtype)
    h = torch.nn.functional.normalize(torch.randn(40, 32), dim=1).to(dtype)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    index = torch.tensor([[0, 5], [1, -1], [2, 3], [4, 4], [9, 1], [30, -1]])
    calls = {
        "info_nce": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.01, similarity=similarity, backend=backend),
        "in_batch+queue": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.01, in_batch_negatives=True, similarity=similarity, backend=backend),
        "dcl/hcl": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.01, tau_plus=0.1, beta=1.0, similarity=similarity, backend=backend),
        "nt_xent": lambda f, g, h: ck.nt_xent(f, g, temperature=0.01, similarity=similarity, backend=backend),
        "clip": lambda f, g, h: ck.clip_loss(f, g, 100.0, similarity=similarity, backend=backend),
        "sup_con": lambda f, g, h: ck.sup_con(f, labels, temperature=0.01, similarity=similarity, backend=backend),
        "multi_positive": lambda f, g, h: ck.multi_positive_info_nce(f, h, index, temperature=0.01, similarity=similarity, backend=backend),
    }
    for name, call in calls.items():
        leaves = [t.clone().requires_grad_() for t in (f, g, h)]
        loss = call(*leaves)
        assert loss.dtype == torch.float32, name
        assert torch.isfinite(loss), f"{name}: {loss}"
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads):
            if grad is not None:
                assert grad.dtype == dtype and torch.isfinite(grad.float()).all(), name


def _second_derivative_calls(backend):
    f, g = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    h = torch.randn(40, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    mixing = lambda: ck.Mixing(4, 3, 2, generator=torch.Generator().manual_seed(1))  # noqa: E731
    calls = {
        "info_nce": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.5, backend=backend),
        "dcl/hcl": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.5, tau_plus=0.1, beta=0.5, backend=backend),
        "mochi": lambda f, g, h: ck.info_nce(f, g, h, temperature=0.5, mixing=mixing(), backend=backend),
        "nt_xent": lambda f, g, h: ck.nt_xent(f, g, temperature=0.5, backend=backend),
        "nt_xent mixing": lambda f, g, h: ck.nt_xent(f, g, temperature=0.5, mixing=mixing(), backend=backend),
        "clip": lambda f, g, h: ck.clip_loss(f, g, 2.0, backend=backend),
        "sup_con": lambda f, g, h: ck.sup_con(f, labels, temperature=0.5, backend=backend),
    }
    return (f, g, h), calls


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_second_derivatives_are_refused_by_the_fused_backends(backend):
    """The fused backward formulas call kernels with no derivative of their own. With
    create_graph=True the first derivative still comes back (right: a penalty that does not
    differentiate it again works), but a second backward through it raises, naming the way out,
    where it was silently wrong. First derivatives under reentrant checkpointing work. The
    reference's second derivatives are plain autograd's (gradgradcheck)."""
    leaves, calls = _second_derivative_calls(backend)
    reference_calls = _second_derivative_calls("reference")[1]
    for name, call in calls.items():
        x = [t.clone().requires_grad_() for t in leaves]
        (want,) = torch.autograd.grad(reference_calls[name](*x), x[0])
        (got,) = torch.autograd.grad(call(*x), x[0], create_graph=True)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), name
        with pytest.raises(RuntimeError, match="first derivatives only.*backend='reference'"):
            torch.autograd.grad(got.pow(2).sum(), x[0])
        x = [t.clone().requires_grad_() for t in leaves]
        torch.utils.checkpoint.checkpoint(call, *x, use_reentrant=True).backward()
        assert torch.allclose(x[0].grad, want, rtol=1e-9, atol=1e-12), name


def test_reference_second_derivatives():
    leaves, calls = _second_derivative_calls("reference")
    for name in ("info_nce", "dcl/hcl", "clip"):
        x = [t.clone().requires_grad_() for t in leaves]
        assert torch.autograd.gradgradcheck(calls[name], x), name


def test_gpu_side_checks_poison_instead_of_syncing():
    """On a GPU an invalid tensor temperature or index turns the loss into NaN (no sync); the
    same path is exercised here through the function that builds it."""
    from contrastive_kernels import functional

    t = functional._positive_scalar("temperature", torch.tensor(-1.0, device="meta"), "meta")
    assert t.device.type == "meta"  # went through torch.where, not a host check
    bad = torch.tensor(True)
    assert torch.isnan(functional._poison(torch.tensor(1.0), bad))
    assert functional._poison(torch.tensor(1.0), torch.tensor(False)) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value,valid", [(-1.0, False), (0.0, False), (1e-44, False), (math.inf, False),
                                         (math.nan, False), (0.5, True), (1.2e-38, True)])
def test_device_side_temperature_check_poisons_what_the_host_check_refuses(monkeypatch, value, valid, dtype):
    """The check a GPU (or a compiled graph) runs instead of the host's: the same values pass
    (in fp16 too, where float32's smallest normal rounds to 0)."""
    from contrastive_kernels import functional

    if valid and value < 1e-30 and dtype == torch.float16:
        valid = False  # 1.2e-38 is 0 in fp16
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # forces the tensor path
    given = torch.tensor(value, dtype=dtype)
    t = functional._positive_scalar("temperature", given, "cpu", functional.MIN_TEMPERATURE)
    assert torch.equal(t, given) if valid else math.isnan(t.item())


def test_vmap_over_a_tensor_temperature():
    temps = torch.tensor([0.1, 0.2, 0.5])
    got = torch.func.vmap(lambda t: ck.info_nce(q, k, queue, temperature=t))(temps)
    torch.testing.assert_close(got, torch.stack([ck.info_nce(q, k, queue, temperature=t, backend="reference")
                                                 for t in temps]))


def test_compiled_loss_follows_a_changing_float_temperature():
    """A float temperature that changes between calls (a schedule) is a SymFloat when dynamo
    recompiles; its validation must trace (math.isfinite on it broke the fullgraph trace)."""
    qq = torch.randn(6, 8, requires_grad=True)
    compiled = torch.compile(lambda a, t: ck.info_nce(a, k[:1].expand(6, 8), queue, temperature=t,
                                                      backend="reference"),
                             backend="aot_eager", fullgraph=True)
    for t in (0.1, 0.2, 0.3):
        got = compiled(qq, t)
        want = ck.info_nce(qq, k[:1].expand(6, 8), queue, temperature=t, backend="reference")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss", ["info_nce", "nt_xent", "clip_loss", "sup_con", "multi_positive"])
def test_torch_func_grad_and_vmap_take_auto_to_the_reference(loss):
    """The fused kernels have no functorch rules: under torch.func transforms backend='auto'
    runs the reference (its gradient equals the one autograd gives), an explicit fused backend
    is refused with the way out."""
    labels = torch.tensor([0, 1, 0, 2])
    calls = {"info_nce": lambda x, be: ck.info_nce(x, k, queue, temperature=0.2, backend=be),
             "nt_xent": lambda x, be: ck.nt_xent(x, k, temperature=0.5, backend=be),
             "clip_loss": lambda x, be: ck.clip_loss(x, k, 10.0, backend=be),
             "sup_con": lambda x, be: ck.sup_con(x, labels, temperature=0.1, backend=be),
             "multi_positive": lambda x, be: ck.multi_positive_info_nce(
                 x, k, torch.tensor([[0, 1], [1, -1], [2, 3], [3, -1]]), queue, temperature=0.1, backend=be)}
    fn = calls[loss]
    x = q.clone().requires_grad_()
    fn(x, "reference").backward()
    torch.testing.assert_close(torch.func.grad(lambda x: fn(x, "auto"))(q), x.grad)
    # per-example losses of a batch of query sets, as vmap gives them
    stacked = torch.stack([q, q.flip(0), 2 * q])
    torch.testing.assert_close(torch.func.vmap(lambda x: fn(x, "auto"))(stacked),
                               torch.stack([fn(s, "reference") for s in stacked]))
    with pytest.raises(ck.BackendUnavailableError, match="torch.func transforms.*backend='reference'"):
        torch.func.grad(lambda x: fn(x, "chunked"))(q)


def test_topk_under_vmap_takes_auto_to_the_reference():
    stacked = torch.stack([q, 2 * q])
    got = torch.func.vmap(lambda x: ck.topk_similarity(x, queue, 3).values)(stacked)
    torch.testing.assert_close(got, torch.stack([ck.topk_similarity(s, queue, 3).values for s in stacked]))
