"""The Triton InfoNCE-family kernels beyond the shared suites.

test_losses / test_ops / test_properties / test_validation already run backend="triton" (under the
interpreter on CPU: conftest.FUSED_BACKENDS). Here: fp16 against the twice-the-eager-error rule,
tile-edge shapes, several key splits and row groups (the split-K merges), the row-only forward
accumulation against the recompute backward, the chunked feature-dim path, the fused (atomic)
and the deterministic backward, and the custom ops (schemas, fake kernels, autograd
registration). On CPU these run through Triton's interpreter, so the shapes are small.
"""

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import functional, reference
from contrastive_kernels._common import pack_multi_hot
from _helpers import check_backend, check_low_precision, lse_case, lse_inputs

DEVICE = torch.device("cpu")
_why = functional.backend_unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_why is not None, reason=f"triton backend unavailable: {_why}")

if _why is None:
    from contrastive_kernels import ops
    from contrastive_kernels.triton import infonce
else:  # pragma: no cover
    ops = infonce = None

# interpreter tiles are 16 x 32: B, N not multiples of them, D not a power of two
B, N, D = 19, 45, 24
QUANTUM = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # one ulp at 1.0


def _features(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return x * (1 + 0.3 * torch.rand(n, 1, dtype=torch.float64, generator=g)) * scale


def _loss_cases():
    """(id, fn(backend, **tensors), tensors, grad names): every loss mode at tile-edge shapes."""
    q, p, queue = _features(B, D, 1), _features(B, D, 2), _features(N, D, 3)
    t = torch.tensor(0.2, dtype=torch.float64)
    labels = torch.arange(B) % 4
    multi_hot = (torch.rand(B, 70, generator=torch.Generator().manual_seed(4)) < 0.05).long()
    multi_hot[:, 0] = torch.arange(B) % 2
    index = torch.randint(0, B + N, (B, 3), generator=torch.Generator().manual_seed(5))
    index[::3, 1:] = -1
    cases = []

    def add(name, fn, tensors, grads):
        cases.append(pytest.param(fn, tensors, grads, id=name))

    for sim in ("dot", "cosine", "l2"):
        add(f"moco-bank-{sim}",
            lambda backend, q, p, queue, t, sim=sim: ck.info_nce(
                q, p, queue, temperature=t, similarity=sim, reduction="none", backend=backend),
            {"q": q, "p": p, "queue": queue, "t": t}, ["q", "t"])
    add("moco-queue-grad",
        lambda backend, q, p, queue, t: ck.info_nce(q, p, queue, temperature=t, similarity="cosine",
                                                    reduction="none", backend=backend),
        {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    add("in-batch",
        lambda backend, q, p, t: ck.info_nce(q, p, temperature=t, reduction="none", backend=backend),
        {"q": q, "p": p, "t": t}, ["q", "p", "t"])
    add("queue+in-batch-dcl-hcl",
        lambda backend, q, p, queue, t: ck.info_nce(
            q, p, queue, temperature=t, in_batch_negatives=True, tau_plus=0.1, beta=0.5,
            similarity="l2", reduction="none", backend=backend),
        {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    add("clip",
        lambda backend, q, p, t: ck.clip_loss(q, p, 1.0 / t, similarity="cosine", reduction="none",
                                              backend=backend),
        {"q": q, "p": p, "t": t}, ["q", "p", "t"])
    add("nt_xent",
        lambda backend, q, p, t: ck.nt_xent(q, p, temperature=t, reduction="none", backend=backend),
        {"q": q, "p": p, "t": t}, ["q", "p", "t"])
    add("sup_con-int",
        lambda backend, q, t: ck.sup_con(q, labels, temperature=t, reduction="none", backend=backend),
        {"q": q, "t": t}, ["q", "t"])
    add("sup_con-multi-hot",
        lambda backend, q, t: ck.sup_con(q, multi_hot, temperature=t, similarity="dot",
                                         reduction="none", backend=backend),
        {"q": q, "t": t}, ["q", "t"])
    add("multi_positive",
        lambda backend, q, p, queue, t: ck.multi_positive_info_nce(
            q, p, index, queue, temperature=t, reduction="none", backend=backend),
        {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    return cases


LOSS_CASES = _loss_cases()


@pytest.mark.parametrize("fn,tensors,grads", LOSS_CASES)
def test_losses_fp32(fn, tensors, grads):
    check_backend(fn, tensors, grads, "triton", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn,tensors,grads", LOSS_CASES)
def test_losses_half_precision_twice_eager(fn, tensors, grads, dtype):
    """DESIGN's rule in fp16 / bf16 (see _helpers.check_low_precision: against the fp64 reference
    with a floor of one ulp, and against the fp64 reference on the rounded inputs with a 1e-5
    floor). Under the interpreter bf16 tiles go through fp32 (its bf16 tl.dot is unusable): this
    checks the bf16 handling around the products, the GPU suite the tensor-core products."""
    check_low_precision(fn, tensors, grads, "triton", dtype, QUANTUM[dtype])


# ------------------------------------------------------------------------------------------------
# the op itself: plans, paths, chunking
# ------------------------------------------------------------------------------------------------




def _full_kw(b, n, labels="bits"):
    excl = torch.stack([torch.arange(b) % n, (torch.arange(b) * 7 + 3) % n], 1)
    excl[0] = -1
    if labels == "bits":
        g = torch.Generator().manual_seed(9)
        ql = pack_multi_hot((torch.rand(b, 70, generator=g) < 0.1).long())
        kl = pack_multi_hot((torch.rand(n, 70, generator=g) < 0.1).long())
    else:
        ql, kl = torch.arange(b) % 3, torch.arange(n) % 4
    return dict(gammas=(1.3, 0.4), exclude=excl, q_labels=ql, k_labels=kl, want_col_lse=True)


def _assert_close(got, want, rtol=1e-9, atol=1e-10):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        assert torch.allclose(g, w, rtol=rtol, atol=atol), (i, (g - w).abs().max().item())


@pytest.mark.parametrize("plan", [(16, 32), (32, 64), (48, 96), (4096, 4096)],
                         ids=["many-splits", "two-tile", "three-tile", "one-split"])
@pytest.mark.parametrize("labels", ["bits", "int"])
def test_split_plans_match_spec(plan, labels):
    """Every row-group / key-split plan (the split-K merges, the column-statistics merges, the
    backward partial sums) gives the spec's values and gradients."""
    b, n, d = 37, 75, 13
    inputs = lse_inputs(b, n, d)
    kw = _full_kw(b, n, labels)
    mask = [True] * 6
    want = lse_case(reference.lse_stats, inputs, mask, **kw)
    with infonce.plan_override(fwd=plan, q=plan, k=plan):
        got = lse_case(infonce.lse_stats, inputs, mask, **kw)
    _assert_close(got, want)


@pytest.mark.parametrize("d", [16, 17, 40])
@pytest.mark.parametrize("grad_side", ["rows", "both"])
def test_chunked_feature_dim(d, grad_side):
    """Feature dims wider than the resident limit loop over chunks (accumulators in the partial
    buffers); forced here with a 16-wide limit: D = 16 stays resident, 17 and 40 are chunked."""
    b, n = 21, 50
    inputs = lse_inputs(b, n, d)
    kw = _full_kw(b, n)
    mask = [True, grad_side == "both", True, grad_side == "both", True, grad_side == "both"]
    want = lse_case(reference.lse_stats, inputs, mask, **kw)
    with infonce.plan_override(max_reg_d=16, chunk_d=16):
        got = lse_case(infonce.lse_stats, inputs, mask, **kw)
    _assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_biases", [False, True])
def test_row_only_equals_recompute(dtype, with_biases):
    """The row-only forward accumulation (E = softmax-weighted keys, O(B D) backward) and the
    recompute backward give the same query-side gradients."""
    q, k, a, bb, c, dd = lse_inputs(B, N, D, torch.float64)
    q, k = q.to(dtype), k.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, bb, c, dd = (t.to(acc) for t in (a, bb, c, dd))
    if not with_biases:
        c = dd = None
    results = []
    for row_only in (True, False):
        leaves = [q.clone().requires_grad_(), a.clone().requires_grad_(),
                  c.clone().requires_grad_() if c is not None else None]
        out = ops.triton_lse_fwd(leaves[0], k, leaves[1], bb, leaves[2], dd, [1.0], None, None, None,
                                 False, row_only)
        assert out[4].shape == ((B, D) if row_only else (0, D))
        w = torch.linspace(0.5, 1.5, B, dtype=acc)
        needs = [t for t in leaves if t is not None]
        results.append([out[0].detach()] + list(torch.autograd.grad((out[0][0] * w).sum(), needs)))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for x, y in zip(*results):
        assert torch.allclose(x.double(), y.double(), rtol=tol, atol=tol), (x - y).abs().max()


@pytest.mark.parametrize("row_only", [True, False])
@pytest.mark.parametrize("with_biases", [False, True])
def test_row_extra_is_one_more_logit(row_only, with_biases):
    """row_extra (InfoNCE's positive merged by the row merge kernel): row_lse equals the
    log-sum-exp of the reference lse and the extra logit, with every gradient (q, k, the scales,
    the biases, the extra) that of that formula; also on rows of -inf logits."""
    q, k, a, bb, c, dd = lse_inputs(B, N, D, torch.float64)
    if not with_biases:
        c = dd = None
    extra = torch.randn(B, dtype=torch.float64) * 3
    extra[3] = float("-inf")  # a row whose extra adds nothing
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    results = []
    for use_kernel in (True, False):
        leaves = [t.clone().requires_grad_() if t is not None else None
                  for t in (q, k, a, bb, c, dd, extra)]
        lq, lk, la, lb, lc, ld, lx = leaves
        if row_only:  # only the query side wants gradients
            lk, lb, ld = k, bb, dd
        if use_kernel:
            out = ops.triton_lse_fwd(lq, lk, la, lb, lc, ld, [1.0], None, None, None, False,
                                     row_only, lx)
            lse = out[0][0]
            assert out[4].shape == ((B, D) if row_only else (0, D))
        else:
            ref = reference.lse_stats(lq, lk, la, lb, lc, ld, gammas=(1.0,))[0][0]
            lse = torch.logsumexp(torch.stack([ref, lx]), 0)
        needs = [t for t in (lq, lk, la, lb, lc, ld, lx) if t is not None and t.requires_grad]
        results.append([lse.detach()] + list(torch.autograd.grad((lse * w).sum(), needs)))
    assert len(results[0]) == len(results[1])
    for x, y in zip(*results):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-10), (x - y).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,d,strided", [(1, 1, False), (37, 200, False), (19, 24, True)])
def test_paired_dot_kernel(dtype, n, d, strided):
    """triton_paired_dot (the positive logits' dot products, one launch each way): values within
    fp32 summation-order rounding of the fp64 formula, gradients g_i b_i / g_i a_i rounded to the
    input dtype exactly as the torch path (losses._PairedDot) rounds them; strided rows too."""
    from contrastive_kernels import losses

    g = torch.Generator().manual_seed(n + d)
    a0, b0 = (torch.randn(n, 2 * d if strided else d, generator=g).to(dtype) for _ in range(2))
    if strided:  # rows of stride 2d, features of stride 1: no copy needed
        a0, b0 = a0[:, :d], b0[:, d:]
    w = torch.randn(n, generator=g)
    results = []
    for path in ("kernel", "torch"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = ops.triton_paired_dot(a, b) if path == "kernel" else losses._PairedDot.apply(a, b) \
            if dtype != torch.float32 else (a.float() * b.float()).sum(-1)
        results.append([out.detach(), *torch.autograd.grad((out * w).sum(), [a, b])])
    want = (a0.double() * b0.double()).sum(-1)
    assert results[0][0].dtype == torch.float32
    assert torch.allclose(results[0][0].double(), want, rtol=1e-5, atol=1e-5 * d)
    for x, y in zip(results[0][1:], results[1][1:]):
        assert x.dtype == dtype and torch.equal(x, y)
    args = (a0.clone().requires_grad_(), b0.clone().requires_grad_())
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_paired_dot.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_losses_take_the_paired_dot_kernel(monkeypatch):
    """info_nce, nt_xent and clip_loss on the Triton backend form their positive logits with the
    backend's paired_dot (fp16 here), and not under torch.compile tracing."""
    import contrastive_kernels.triton as backend

    calls = []
    real = backend.paired_dot
    monkeypatch.setattr(backend, "paired_dot", lambda a, b: calls.append(a.shape) or real(a, b))
    q, k, queue = (_features(n, 16, seed).half() for n, seed in ((6, 1), (6, 2), (40, 3)))
    ck.info_nce(q, k, queue, backend="triton")
    ck.nt_xent(q, k, backend="triton")
    ck.clip_loss(q, k, torch.tensor(10.0), backend="triton")
    assert calls == [(6, 16), (12, 16), (6, 16)]


def test_host_integer_helpers_equal_tritons():
    import triton

    from contrastive_kernels.triton import cdiv, next_power_of_2
    for n in list(range(0, 70)) + [1000, 1023, 1024, 1025, 2**31 - 1, 2**31, 3 * 2**40]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.parametrize("case", ["moco", "mochi", "queue-grads"])
def test_eager_fast_path_equals_the_custom_op(monkeypatch, case):
    """Plain eager calls run the ops' host functions and autograd formulas through an
    autograd.Function (ops._eager_fast), not the dispatcher: the loss and every gradient are
    bitwise those of the registered custom ops, for each op a MoCo, MoCHi or queue-gradient step
    uses; the fast path is off under fake tensors and for tensor subclasses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, pos, queue = (_features(n, 24, seed).float() for n, seed in ((9, 1), (9, 2), (300, 3)))
    mixing = (64, 16, 8) if case == "mochi" else None

    def step():
        leaves = [q.clone().requires_grad_(), queue.clone().requires_grad_(case == "queue-grads")]
        mix = ck.Mixing(*mixing, generator=torch.Generator().manual_seed(5)) if mixing else None
        loss = ck.info_nce(leaves[0], pos, leaves[1], temperature=0.1, mixing=mix, backend="triton")
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
        return [loss.detach(), *grads]

    calls = []
    real = ops._plain_eager
    monkeypatch.setattr(ops, "_plain_eager", lambda args: calls.append(real(args)) or calls[-1])
    fast = step()
    assert calls and all(calls)
    monkeypatch.setattr(ops, "_plain_eager", lambda args: False)
    slow = step()
    for x, y in zip(fast, slow, strict=True):
        assert torch.equal(x, y)
    assert real((q,)) and real((torch.nn.Parameter(q),)) and not real((q.as_subclass(_Sub),))
    with FakeTensorMode() as mode:
        assert not real((mode.from_tensor(q),))


class _Sub(torch.Tensor):
    pass


def test_row_only_path_is_taken_for_a_frozen_bank(monkeypatch):
    """lse_stats picks the row-only op when only the query side needs gradients."""
    seen = []
    real = ops.triton_lse_fwd

    def spy(*args):
        seen.append(args[11])  # row_only (row_extra, the positive, follows)
        return real(*args)

    monkeypatch.setattr(ops, "triton_lse_fwd", spy)
    q, k, queue = _features(4, 8, 1).float(), _features(4, 8, 2).float(), _features(40, 8, 3).float()
    ck.info_nce(q.requires_grad_(), k, queue, backend="triton").backward()
    ck.info_nce(q, k, queue.requires_grad_(), backend="triton").backward()
    with torch.no_grad():
        ck.info_nce(q, k, queue, backend="triton")
    assert seen == [True, False, False]


def test_fused_and_deterministic_backward_agree():
    """dQ and dK from one recompute (atomics) equal the two-kernel backward; with
    torch.use_deterministic_algorithms(True) repeated runs are bitwise equal."""
    b, n, d = 37, 75, 13
    inputs = lse_inputs(b, n, d)
    kw = _full_kw(b, n)
    want = lse_case(reference.lse_stats, inputs, [True] * 6, **kw)
    fused = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
    with infonce.plan_override(fused=False):
        split = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
    _assert_close(fused, want)
    _assert_close(split, want)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
        again = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
    finally:
        torch.use_deterministic_algorithms(old)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    _assert_close(first, want)


def test_three_gammas_is_a_clear_error():
    q, k, a, *_ = lse_inputs(3, 5, 4)
    with pytest.raises(ValueError, match="1 or 2 gammas"):
        infonce.lse_stats(q, k, a, gammas=(1.0, 2.0, 3.0))


def test_low_temperature_bf16_bank_stays_finite():
    """T = 0.01 (logits up to 100) with half-precision inputs: no overflow in the online
    log-sum-exp, the merges or the backward (fp16: bf16 tl.dot is unreliable in the interpreter)."""
    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1).half().requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(B, D), dim=1).half()
    queue = torch.nn.functional.normalize(torch.randn(N, D), dim=1).half()
    for kwargs in ({}, {"in_batch_negatives": True}):
        loss = ck.info_nce(q, p, queue, temperature=0.01, backend="triton", **kwargs)
        grad, = torch.autograd.grad(loss, q)
        assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()


# ------------------------------------------------------------------------------------------------
# the custom ops
# ------------------------------------------------------------------------------------------------


def _op_args(b=B, n=N, d=D, dtype=torch.float32, col=True, row_only=False, labels=True):
    q, k, a, bb, c, dd = lse_inputs(b, n, d, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, bb, c, dd = (t.to(acc) for t in (a, bb, c, dd))
    excl = torch.arange(b)[:, None] % n
    ql, kl = (torch.arange(b) % 3, torch.arange(n) % 3) if labels else (None, None)
    return (q, k, a, bb, c, dd, [1.0, 0.5] if not row_only else [1.0], excl if not row_only else None,
            ql, kl, col, row_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("col,row_only", [(True, False), (False, True), (False, False)])
def test_fake_kernels_give_the_real_shapes(dtype, col, row_only):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args(dtype=dtype, col=col, row_only=row_only, labels=not row_only)
    real = torch.ops.contrastive_kernels.triton_lse_fwd(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) if torch.is_tensor(t) else t for t in args]
        fake = torch.ops.contrastive_kernels.triton_lse_fwd(*fake_args)
    assert len(fake) == len(real) == 5
    for f, r in zip(fake, real):
        assert f.shape == r.shape and f.dtype == r.dtype and f.device == r.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = 1 if row_only else 2
    assert [tuple(t.shape) for t in real] == [(g, B), (B,), (B,), (N if col else 0,),
                                              (B if row_only else 0, D)]
    assert all(t.dtype == acc for t in real)
    if row_only:
        return
    q, k, a, bb, c, dd, gammas, excl, ql, kl, _, _ = args
    need = [True, True, True, False, True, True]
    bwd_args = (torch.ones_like(real[0]), torch.ones_like(real[1]), torch.ones_like(real[3]), q, k,
                a, bb, c, dd, gammas, excl, ql, kl, real[0], real[3], need, False)
    grads = torch.ops.contrastive_kernels.triton_lse_bwd(*bwd_args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) if torch.is_tensor(t) else t for t in bwd_args]
        fake = torch.ops.contrastive_kernels.triton_lse_bwd(*fake_args)
    for f, r, t, wanted in zip(fake, grads, (q, k, a, bb, c, dd), need):
        assert f.shape == r.shape and f.dtype == r.dtype
        assert r.shape == (t.shape if wanted else (0,))
        if wanted:
            assert r.dtype == t.dtype


@pytest.mark.parametrize("row_only", [False, True])
def test_opcheck_on_cpu(row_only):
    """torch.library.opcheck's schema, fake-tensor and autograd-registration checks (the
    compile-based aot_dispatch check needs a GPU: tests/test_gpu_loss.py)."""
    args = _op_args(dtype=torch.float64, col=not row_only, row_only=row_only, labels=not row_only)
    args = list(args)
    args[0] = args[0].requires_grad_()
    args[2] = args[2].requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_fwd.default, tuple(args),
                          test_utils=utils)
    if row_only:  # with InfoNCE's positive merged in (row_extra)
        extra = torch.randn(args[0].shape[0], dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_fwd.default,
                              tuple(args) + (extra,), test_utils=utils)


def test_compile_fullgraph_through_the_chunked_backend():
    """The CPU backends keep a compile path: torch.compile(fullgraph=True) traces the chunked
    autograd.Function (aot_eager here: Inductor's C++ build is too slow for CI; the GPU suite
    compiles the Triton ops with Inductor). Triton's interpreter cannot run under compile."""
    q = _features(6, 8, 1).float().requires_grad_()
    k = _features(6, 8, 2).float().requires_grad_()
    queue = _features(30, 8, 3).float()

    def f(q, k, queue):
        return ck.info_nce(q, k, queue, temperature=0.1, similarity="cosine",
                           in_batch_negatives=True, backend="chunked")

    ck.available_backends("cpu")  # functional._module imports lazily; dynamo cannot trace imports
    eager = f(q, k, queue)
    g_eager = torch.autograd.grad(eager, [q, k])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, queue)
    g_comp = torch.autograd.grad(compiled, [q, k])
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_comp, g_eager):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_split_count_tuning(monkeypatch):
    """The first call of a shape key times the launch plans at SPLIT_WAVES programs per SM and
    keeps the fastest (the timer is faked here: the interpreter's times mean nothing); the choice
    is cached, changes the plan, and gives the spec's results; fake tensors never trigger it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fastest = {1: 3.0, 2: 2.0, 4: 1.0}
    timed = []

    def fake_bench(fn):
        fn()
        timed.append(infonce._forced_waves)
        return fastest[infonce._forced_waves]

    monkeypatch.setattr(infonce, "_bench", fake_bench)
    monkeypatch.setattr(infonce, "_waves_cache", {})
    b, n, d = 9, 200, 8
    inputs = lse_inputs(b, n, d)
    kw = _full_kw(b, n)
    plans = []
    real_plan = infonce._fwd_plan
    monkeypatch.setattr(infonce, "_fwd_plan", lambda *a: plans.append(a[-1]) or real_plan(*a))
    want = lse_case(reference.lse_stats, inputs, [True] * 6, **kw)
    with infonce.plan_override(tune_on_cpu=True):
        got = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
        assert timed == [1, 2, 4, 1, 2, 4]  # forward, then backward
        assert len(infonce._waves_cache) == 2 and set(infonce._waves_cache.values()) == {4}
        assert plans[-1] == 4
        again = lse_case(infonce.lse_stats, inputs, [True] * 6, **kw)
        assert len(timed) == 6  # cached
        with FakeTensorMode() as mode:  # traced calls (torch.compile) never time anything
            fake = mode.from_tensor(inputs[0])
            assert infonce._waves(("new key",), fake, lambda: timed.append("ran")) == 2
        assert len(timed) == 6 and len(infonce._waves_cache) == 2
    _assert_close(got, want)
    _assert_close(again, want)


def test_default_tile_drops_stages_that_exceed_shared_memory():
    """With autotuning off, the default tile loses pipeline stages until its estimated shared
    memory fits the device: the fp32 key-side backward at a resident D of 128 needed 258 KiB at
    3 stages on an H100 (227 KiB); bf16 keeps its 3 stages, and nothing goes below 1."""
    import triton

    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    h100 = 232448
    fp32 = infonce.stages_that_fit(cfg, 128, 4, h100)
    assert fp32.num_stages == 2 and fp32.kwargs == cfg.kwargs and fp32.num_warps == 8
    assert infonce._smem_estimate(cfg, 128, 4) > 264192  # above what ptxas reported (an upper estimate)
    assert infonce.stages_that_fit(cfg, 128, 2, h100) is cfg
    assert infonce.stages_that_fit(cfg, 512, 4, 1024).num_stages == 1
