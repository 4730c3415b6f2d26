"""The Triton InfoNCE-family kernels on a CUDA device (``make test-gpu``).

bf16 / fp16 / fp32 against the fp64 reference under the twice-the-eager-error rule (the rule of
flash-attention's tests), big shapes (a 2^20-key bank, symmetric CLIP at N = 65536, int64 offsets
past 2^31 elements), torch.library.opcheck, torch.compile(fullgraph=True) through the Triton
kernels, reproducibility, and extra memory linear in B + K.
"""
import math

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import chunked, functional
from _helpers import check_backend, check_low_precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
QUANTUM = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    why = functional.backend_unavailable_reason("triton", torch.device(DEV))
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    from contrastive_kernels.triton import infonce

    infonce.set_autotune(False)  # correctness here; the benchmarks autotune
    yield
    infonce.set_autotune(True)


def _unit(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return (x * (1 + 0.3 * torch.rand(n, 1, dtype=torch.float64, generator=g)) * scale).to(DEV)


def _check(fn, tensors, grads, dtype):
    if dtype == torch.float32:
        check_backend(fn, tensors, grads, "triton", dtype)
    else:
        check_low_precision(fn, tensors, grads, "triton", dtype, QUANTUM[dtype])


# ------------------------------------------------------------------------------------------------
# every mode, every dtype, tile-edge shapes
# ------------------------------------------------------------------------------------------------

B, K, D = 300, 5000, 96


def _mode_case(mode):
    q, p, queue = _unit(B, D, 1), _unit(B, D, 2), _unit(K, D, 3)
    t = torch.tensor(0.1, dtype=torch.float64, device=DEV)
    if mode == "bank":  # MoCo / QK: no gradient to the queue (row-only forward accumulation)
        return (lambda backend, q, p, queue, t: ck.info_nce(
            q, p, queue, temperature=t, reduction="none", backend=backend),
            {"q": q, "p": p, "queue": queue, "t": t}, ["q", "t"])
    if mode == "bank-cosine-D256":
        q2, p2, queue2 = _unit(B, 256, 1), _unit(B, 256, 2), _unit(K, 256, 3)
        return (lambda backend, q, p, queue: ck.info_nce(
            q, p, queue, temperature=0.05, similarity="cosine", reduction="none", backend=backend),
            {"q": q2, "p": p2, "queue": queue2}, ["q"])
    if mode == "queue-grad":
        return (lambda backend, q, p, queue, t: ck.info_nce(
            q, p, queue, temperature=t, similarity="cosine", reduction="none", backend=backend),
            {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    if mode == "in-batch":
        return (lambda backend, q, p, t: ck.info_nce(q, p, temperature=t, reduction="none",
                                                     backend=backend),
                {"q": q, "p": p, "t": t}, ["q", "p", "t"])
    if mode == "queue+in-batch-dcl-hcl-l2":
        return (lambda backend, q, p, queue, t: ck.info_nce(
            q, p, queue, temperature=t, in_batch_negatives=True, tau_plus=0.1, beta=0.5,
            similarity="l2", reduction="none", backend=backend),
            {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    if mode == "clip-D768":
        img, txt = _unit(1000, 768, 4), _unit(1000, 768, 5)
        return (lambda backend, img, txt, s: ck.clip_loss(img, txt, s, reduction="none",
                                                          backend=backend),
                {"img": img, "txt": txt, "s": torch.tensor(30.0, dtype=torch.float64, device=DEV)},
                ["img", "txt", "s"])
    if mode == "clip-cosine":
        return (lambda backend, q, p, s: ck.clip_loss(q, p, s, similarity="cosine",
                                                      reduction="none", backend=backend),
                {"q": q, "p": p, "s": torch.tensor(50.0, dtype=torch.float64, device=DEV)},
                ["q", "p", "s"])
    if mode == "nt_xent":
        return (lambda backend, q, p, t: ck.nt_xent(q, p, temperature=t, reduction="none",
                                                    backend=backend),
                {"q": q, "p": p, "t": t}, ["q", "p", "t"])
    if mode == "sup_con-int":
        labels = (torch.arange(B) % 7).to(DEV)
        return (lambda backend, q, t: ck.sup_con(q, labels, temperature=t, reduction="none",
                                                 backend=backend),
                {"q": q, "t": t}, ["q", "t"])
    if mode == "sup_con-multi-hot":
        g = torch.Generator().manual_seed(6)
        labels = (torch.rand(B, 150, generator=g) < 0.02).long().to(DEV)
        return (lambda backend, q, t: ck.sup_con(q, labels, temperature=t, reduction="none",
                                                 backend=backend),
                {"q": q, "t": t}, ["q", "t"])
    if mode == "multi_positive":
        g = torch.Generator().manual_seed(7)
        index = torch.randint(0, B + K, (B, 4), generator=g)
        index[::3, 2:] = -1
        index = index.to(DEV)
        return (lambda backend, q, p, queue, t: ck.multi_positive_info_nce(
            q, p, index, queue, temperature=t, reduction="none", backend=backend),
            {"q": q, "p": p, "queue": queue, "t": t}, ["q", "p", "queue", "t"])
    raise ValueError(mode)


MODES = ["bank", "bank-cosine-D256", "queue-grad", "in-batch", "queue+in-batch-dcl-hcl-l2",
         "clip-D768", "clip-cosine", "nt_xent", "sup_con-int", "sup_con-multi-hot", "multi_positive"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_modes_twice_eager(mode, dtype):
    fn, tensors, grads = _mode_case(mode)
    _check(fn, tensors, grads, dtype)


def test_low_temperature_bf16_is_finite():
    q, p, queue = (_unit(n, 128, s).to(torch.bfloat16) for n, s in ((256, 1), (256, 2), (8192, 3)))
    q.requires_grad_()
    for kw in ({}, {"in_batch_negatives": True}, {"tau_plus": 0.1, "beta": 1.0}):
        loss = ck.info_nce(q, p, queue, temperature=0.01, backend="triton", **kw)
        grad, = torch.autograd.grad(loss, q)
        assert torch.isfinite(loss) and torch.isfinite(grad.float()).all(), kw
    loss = ck.clip_loss(q, p, 100.0, backend="triton")
    assert torch.isfinite(loss)


def test_nonfinite_input_gives_nonfinite_loss():
    q, p, queue = _unit(64, 32, 1).float(), _unit(64, 32, 2).float(), _unit(512, 32, 3).float()
    queue[100, 3] = math.nan
    assert not torch.isfinite(ck.info_nce(q, p, queue, backend="triton"))
    p[5, 1] = math.inf
    assert not torch.isfinite(ck.clip_loss(q, p, 10.0, backend="triton"))


# ------------------------------------------------------------------------------------------------
# big shapes
# ------------------------------------------------------------------------------------------------


def _bank_fp64(q, k, queue, t, chunk=1 << 16):
    """MoCo loss (mean) and its query gradient in fp64, streaming over the queue."""
    qd, kd = q.double(), k.double()
    l_pos = (qd * kd).sum(1) / t
    m = l_pos.clone()
    s = torch.ones_like(l_pos)
    e = kd.clone()  # sum_j exp(l_j - m) x_j, the positive first
    for j0 in range(0, queue.shape[0], chunk):
        x = queue[j0:j0 + chunk].double()
        logits = qd @ x.T / t
        new = torch.maximum(m, logits.amax(1))
        scale = torch.exp(m - new)
        p = torch.exp(logits - new[:, None])
        s = s * scale + p.sum(1)
        e = e * scale[:, None] + p @ x
        m = new
    lse = m + torch.log(s)
    loss = (lse - l_pos).mean()
    dq = (e / s[:, None] - kd) / t / q.shape[0]
    return loss, dq


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bank_of_a_million_keys(dtype):
    """QK Iteration's frozen bank: B = 256, K = 2^20, D = 128, gradient to the queries only."""
    b, k_, d, t = 256, 1 << 20, 128, 0.07
    q, k = _unit(b, d, 1).to(dtype).requires_grad_(), _unit(b, d, 2).to(dtype)
    queue = _unit(k_, d, 3).to(dtype)
    want_loss, want_dq = _bank_fp64(q.detach(), k, queue, t)
    loss = ck.info_nce(q, k, queue, temperature=t, backend="triton")
    dq, = torch.autograd.grad(loss, q)
    eager = ck.info_nce(q, k, queue, temperature=t, backend="reference")
    dq_eager, = torch.autograd.grad(eager, q)
    floor = 1e-5 if dtype == torch.float32 else QUANTUM[dtype]
    err, err_eager = abs(loss.item() - want_loss.item()), abs(eager.item() - want_loss.item())
    assert err <= 2 * err_eager + floor * (1 + abs(want_loss.item())), (err, err_eager)
    assert _rel_err(dq, want_dq) <= 2 * _rel_err(dq_eager, want_dq) + floor


def test_int64_offsets_past_2_31_elements():
    """N * D > 2^31: key offsets must be 64-bit (B = 64, N = 2^22 + 3, D = 520, bf16)."""
    b, n, d, t = 64, (1 << 22) + 3, 520, 0.1
    assert n * d > 2 ** 31
    g = torch.Generator(device=DEV).manual_seed(0)
    queue = torch.randn(n, d, device=DEV, dtype=torch.bfloat16, generator=g)
    queue = torch.nn.functional.normalize(queue.float(), dim=1).to(torch.bfloat16)
    q = _unit(b, d, 1).to(torch.bfloat16).requires_grad_()
    k = queue[-b:].clone()  # positives from the far end of the bank
    want_loss, want_dq = _bank_fp64(q.detach(), k, queue, t)
    loss = ck.info_nce(q, k, queue, temperature=t, backend="triton")
    dq, = torch.autograd.grad(loss, q)
    assert abs(loss.item() - want_loss.item()) < 2e-2 * abs(want_loss.item())
    assert _rel_err(dq, want_dq) < 3e-2


def test_clip_65536():
    """Symmetric CLIP at N = 65536, D = 512, bf16: row and column statistics from one forward
    pass, against the chunked backend on the same inputs (fp32 arithmetic); memory linear in N."""
    n, d = 65536, 512
    img = _unit(n, d, 1).to(torch.bfloat16).requires_grad_()
    txt = _unit(n, d, 2).to(torch.bfloat16).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = ck.clip_loss(img, txt, scale, backend="triton")
    grads = torch.autograd.grad(loss, [img, txt, scale])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    old = chunked.set_memory_budget(1 << 30)
    try:
        want = ck.clip_loss(img, txt, scale, backend="chunked")
        want_grads = torch.autograd.grad(want, [img, txt, scale])
    finally:
        chunked.set_memory_budget(old)
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 1e-3 * abs(want.item())
    for g, w in zip(grads, want_grads):
        assert _rel_err(g, w.double()) < 2e-2
    assert peak < 8 * n * d * 4 + (64 << 20), f"peak extra {peak / 2**20:.0f} MiB"
    # eager holds at least the fp32 logits and their gradient (2 N^2 x 4 bytes = 32 GiB): at most 5 %
    # of that (measured on an H100: 899 MiB, 2.7 %)
    eager_floor = 2 * n * n * 4
    assert peak < 0.05 * eager_floor, f"peak extra {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("k_", [1 << 18, 1 << 20])
def test_bank_memory_does_not_grow_with_the_bank(k_):
    """Extra memory of a bank-mode step is O(B D) (partials of the key splits), not O(B K)."""
    b, d = 1024, 128
    q = _unit(b, d, 1).to(torch.bfloat16).requires_grad_()
    k = _unit(b, d, 2).to(torch.bfloat16)
    queue = _unit(k_, d, 3).to(torch.bfloat16)
    ck.info_nce(q, k, queue, backend="triton").backward()  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    q.grad = None
    ck.info_nce(q, k, queue, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 64 << 20, f"peak extra {peak / 2**20:.1f} MiB for B={b}, K={k_}"
    assert peak < b * k_ * 4 / 16


# ------------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------


def _op_args(kind, dtype=torch.float32):
    b, n, d = 70, 300, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, d, generator=g).to(DEV, dtype)
    k = torch.randn(n, d, generator=g).to(DEV, dtype)
    a = (torch.rand(b, generator=g) + 0.5).to(DEV)
    bb = (torch.rand(n, generator=g) + 0.5).to(DEV)
    c, dd = torch.randn(b, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    q.requires_grad_()
    a.requires_grad_()
    if kind == "row_only":
        return (q, k, a, None, None, None, [1.0], None, None, None, False, True)
    if kind == "row_only+extra":  # InfoNCE's positive merged into the queue's log-sum-exp
        extra = torch.randn(b, generator=g).to(DEV).requires_grad_()
        return (q, k, a, None, None, None, [1.0], None, None, None, False, True, extra)
    k.requires_grad_()
    bb.requires_grad_()
    excl = (torch.arange(b) % n)[:, None].to(DEV)
    labels = ((torch.arange(b) % 3).to(DEV), (torch.arange(n) % 3).to(DEV))
    if kind == "clip":
        return (q, k, a, bb, None, None, [1.0], None, None, None, True, False)
    return (q, k, a, bb, c, dd, [1.2, 0.3], excl, *labels, False, False)


@pytest.mark.parametrize("kind", ["row_only", "row_only+extra", "clip", "labels+gammas"])
def test_opcheck(kind):
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_fwd.default, _op_args(kind))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck_paired_dot(dtype):
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(300, 96, generator=g).to(DEV, dtype).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_paired_dot.default, (a, b))


def test_opcheck_backward_op():
    q, k, a, bb, c, dd, gammas, excl, ql, kl, _, _ = _op_args("labels+gammas")
    with torch.no_grad():
        row, ps, pc, col, _ = torch.ops.contrastive_kernels.triton_lse_fwd(
            q, k, a, bb, c, dd, gammas, excl, ql, kl, True, False)
    args = (torch.rand_like(row), torch.rand_like(ps), torch.rand_like(col), q.detach(), k.detach(),
            a.detach(), bb.detach(), c, dd, gammas, excl, ql, kl, row, col,
            [True, True, True, True, True, True], False)
    torch.library.opcheck(torch.ops.contrastive_kernels.triton_lse_bwd.default, args)


def _compile_cases():
    def bank(q, k, queue, t):
        return ck.info_nce(q, k, queue, temperature=t, backend="triton")

    def clip(q, k, queue, t):
        return ck.clip_loss(q, k, 1.0 / t, similarity="cosine", backend="triton")

    def supcon(q, k, queue, t):
        return ck.sup_con(q, (torch.arange(q.shape[0], device=q.device) % 5),
                          temperature=t, backend="triton")

    return {"bank": (bank, [0, 3]), "clip": (clip, [0, 1, 3]), "sup_con": (supcon, [0, 3])}


@pytest.mark.parametrize("case", ["bank", "clip", "sup_con"])
def test_torch_compile_fullgraph(case):
    """torch.compile(fullgraph=True) traces into the triton_ops: the generated code launches the
    package's Triton kernels, and values and gradients match eager."""
    from torch._inductor.utils import run_and_get_code

    fn, leaves = _compile_cases()[case]
    ck.available_backends(DEV)  # functional._module imports backends lazily; not traceable
    q, k, queue = (_unit(n, 64, s).to(torch.bfloat16) for n, s in ((256, 1), (256, 2), (4096, 3)))
    t = torch.tensor(0.1, device=DEV)
    args = [q, k, queue, t]
    for i in leaves:
        args[i] = args[i].detach().clone().requires_grad_()
    eager = fn(*args)
    g_eager = torch.autograd.grad(eager, [args[i] for i in leaves])
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)

    def step():
        out = compiled(*args)
        return out, torch.autograd.grad(out, [args[i] for i in leaves])

    (out, g_comp), code = run_and_get_code(step)
    assert any("_lse_fwd_kernel" in c for c in code), "the compiled graph does not launch the kernels"
    assert torch.allclose(out, eager, rtol=1e-3, atol=1e-4)
    for x, y in zip(g_comp, g_eager):
        assert torch.allclose(x.float(), y.float(), rtol=2e-2, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# reproducibility
# ------------------------------------------------------------------------------------------------


def _clip_step(img, txt):
    img = img.detach().requires_grad_()
    txt = txt.detach().requires_grad_()
    loss = ck.clip_loss(img, txt, 20.0, backend="triton")
    return [loss.detach(), *torch.autograd.grad(loss, [img, txt])]


def test_repeated_runs_are_reproducible():
    """The forward pass has no atomics: bitwise equal runs. The backward is bitwise reproducible
    under torch.use_deterministic_algorithms(True) (two recompute kernels, fixed summation order)
    and equal up to rounding with the default fused (atomic) backward."""
    img, txt = _unit(3000, 128, 1).to(torch.bfloat16), _unit(3000, 128, 2).to(torch.bfloat16)
    fused = [_clip_step(img, txt) for _ in range(2)]
    assert torch.equal(fused[0][0], fused[1][0])
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det = [_clip_step(img, txt) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(old)
    for run in det[1:]:
        for x, y in zip(run, det[0]):
            assert torch.equal(x, y)
    for x, y in zip(fused[0], det[0]):
        assert torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-5)
