"""The modules: options forwarded to the functional API, CLIP's learnable logit scale, and the
MoCo queue's ring buffer, state_dict round trip and device moves."""
import math

import pytest
import torch

import contrastive_kernels as ck


def test_modules_equal_functional():
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.randn(20, 8)
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert torch.equal(ck.nn.InfoNCELoss(0.2, similarity="cosine", tau_plus=0.1)(q, k, queue),
                       ck.info_nce(q, k, queue, temperature=0.2, similarity="cosine", tau_plus=0.1))
    assert torch.equal(ck.nn.NTXentLoss(0.3)(q, k), ck.nt_xent(q, k, temperature=0.3))
    assert torch.equal(ck.nn.SupConLoss(0.1)(q, labels), ck.sup_con(q, labels, temperature=0.1))
    clip = ck.nn.ClipLoss()
    assert torch.equal(clip(q, k), ck.clip_loss(q, k, 1 / 0.07))


def test_learnable_temperature_gets_a_gradient():
    loss_fn = ck.nn.InfoNCELoss(0.5, learnable_temperature=True)
    assert isinstance(loss_fn.log_temperature, torch.nn.Parameter)
    assert math.isclose(float(loss_fn.temperature.detach()), 0.5, rel_tol=1e-6)
    loss = loss_fn(torch.randn(4, 6), torch.randn(4, 6), torch.randn(9, 6))
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad != 0
    # a big step cannot make it negative
    with torch.no_grad():
        loss_fn.log_temperature -= 100.0
    assert float(loss_fn.temperature.detach()) > 0
    # a given parameter is registered and used as is
    t = torch.nn.Parameter(torch.tensor(0.3))
    fixed = ck.nn.NTXentLoss(t)
    assert any(p is t for p in fixed.parameters()) and fixed.temperature is t


def test_clip_loss_scale_init_clamp_and_gradient():
    clip = ck.nn.ClipLoss()
    assert math.isclose(float(clip.log_logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    clip(img, txt).backward()
    assert clip.log_logit_scale.grad is not None and clip.log_logit_scale.grad != 0
    with torch.no_grad():
        clip.log_logit_scale.fill_(math.log(500.0))
    assert float(clip.logit_scale.detach()) == 100.0
    assert float(clip.log_logit_scale.detach()) == pytest.approx(math.log(100.0))  # as CLIP clamps it
    frozen = ck.nn.ClipLoss(10.0, learnable=False)
    assert not any(True for _ in frozen.parameters())


def test_clip_loss_scale_past_the_cap_comes_back():
    """An optimizer step past the cap used to leave the log scale above log(100) with a zero
    gradient for good (the clamp was on the value): stuck at 100 whatever the loss asked for. As
    in CLIP, the parameter itself is clamped, so the gradient at the cap brings it back down."""
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16), torch.randn(8, 16)  # unrelated pairs: the loss wants a small scale
    clip = ck.nn.ClipLoss()
    opt = torch.optim.SGD(clip.parameters(), lr=1e-3)
    with torch.no_grad():
        clip.log_logit_scale.fill_(math.log(100.0) + 0.5)  # where an overshooting step leaves it
    for _ in range(3):
        opt.zero_grad()
        clip(img, txt).backward()
        assert clip.log_logit_scale.grad > 0
        opt.step()
    assert float(clip.logit_scale.detach()) < 100.0
    # at the cap the value is exactly the cap and the gradient is exp's
    with torch.no_grad():
        clip.log_logit_scale.fill_(math.log(500.0))
    scale = clip.logit_scale
    assert float(scale.detach()) == 100.0
    assert torch.autograd.grad(scale, clip.log_logit_scale)[0] == pytest.approx(100.0)
    # several forwards before one backward (the in-place clamp must not break the first graph)
    clip.log_logit_scale.grad = None
    (clip(img, txt) + clip(txt, img)).backward()
    assert torch.isfinite(clip.log_logit_scale.grad)
    # under torch.compile too
    torch._dynamo.reset()
    compiled = torch.compile(clip, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        clip.log_logit_scale.fill_(math.log(500.0))
    want = ck.clip_loss(img, txt, 100.0)
    got = compiled(img, txt)
    assert torch.allclose(got, want) and float(clip.log_logit_scale.detach()) == pytest.approx(math.log(100.0))


def test_clip_loss_rejects_bad_scales():
    q = torch.randn(4, 6)
    for bad, exc in ((None, TypeError), ("14", TypeError), (torch.tensor([1.0, 2.0]), TypeError),
                     (True, TypeError), (0.0, ValueError), (-1.0, ValueError),
                     (math.inf, ValueError), (math.nan, ValueError)):
        with pytest.raises(exc, match="init_logit_scale"):
            ck.nn.ClipLoss(bad)
    for bad, exc in ((None, TypeError), ("100", TypeError), (0.0, ValueError), (math.nan, ValueError)):
        with pytest.raises(exc, match="max_logit_scale"):
            ck.nn.ClipLoss(max_logit_scale=bad)
    assert torch.isfinite(ck.nn.ClipLoss(torch.tensor(20.0), max_logit_scale=math.inf)(q, q))
    assert float(ck.nn.ClipLoss(500.0, learnable=False).logit_scale) == 100.0


def test_learnable_temperature_start_values():
    np = pytest.importorskip("numpy")
    for start in (np.float32(0.1), np.float64(0.1), torch.tensor(0.1), 1):
        loss_fn = ck.nn.InfoNCELoss(start, learnable_temperature=True)
        assert float(loss_fn.temperature.detach()) == pytest.approx(float(start), rel=1e-6)
    for bad, exc in ((True, TypeError), ("0.1", TypeError), (None, TypeError), (0.0, ValueError),
                     (math.inf, ValueError), (math.nan, ValueError),
                     (torch.nn.Parameter(torch.tensor(0.1)), ValueError)):
        with pytest.raises(exc):
            ck.nn.NTXentLoss(bad, learnable_temperature=True)


def test_temperature_can_be_assigned():
    """A temperature schedule: ``loss.temperature = t`` (it raised AttributeError)."""
    q, k, queue = torch.randn(4, 6), torch.randn(4, 6), torch.randn(9, 6)
    loss_fn = ck.nn.InfoNCELoss(0.2)
    loss_fn.temperature = 0.1
    assert torch.equal(loss_fn(q, k, queue), ck.info_nce(q, k, queue, temperature=0.1))
    t = torch.nn.Parameter(torch.tensor(0.3))
    loss_fn.temperature = t  # a parameter is registered, as when given to the constructor
    assert loss_fn.temperature is t and any(p is t for p in loss_fn.parameters())
    loss_fn.temperature = 0.4  # and a float replaces it
    assert loss_fn.temperature == 0.4 and not list(loss_fn.parameters())
    learnable = ck.nn.NTXentLoss(0.5, learnable_temperature=True)
    param = learnable.log_temperature
    opt = torch.optim.SGD(learnable.parameters(), lr=0.1)
    learnable.temperature = 0.25  # in place: the optimizer keeps training the same parameter
    assert learnable.log_temperature is param and opt.param_groups[0]["params"][0] is param
    assert float(learnable.temperature.detach()) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError):
        learnable.temperature = -1.0
    for bad in (None, "0.1", True):  # None would pass for "learnable" and break the getter
        with pytest.raises(TypeError, match="temperature must be a float"):
            loss_fn.temperature = bad
    assert loss_fn.temperature == 0.4


def test_clip_loss_clamp_keeps_graphs_that_saved_the_scale():
    """The in-place clamp does not bump the parameter's version: a regularizer on the log scale
    computed before the forward still backpropagates (and reading logit_scale for a log is fine)."""
    m = ck.nn.ClipLoss()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    reg = m.log_logit_scale ** 2
    _ = m.logit_scale
    (m(a, b) + reg).backward()
    want = ck.nn.ClipLoss()
    ck.clip_loss(a, b, want.log_logit_scale.exp()).backward()
    torch.testing.assert_close(m.log_logit_scale.grad,
                               want.log_logit_scale.grad + 2 * want.log_logit_scale.detach())


def test_moco_queue_ring_buffer():
    torch.manual_seed(0)
    queue = ck.nn.MoCoQueue(5, 3)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    a = torch.arange(9.0).view(3, 3)
    queue.enqueue(a)
    assert torch.equal(queue.keys[:3], a) and int(queue.ptr) == 3
    b = 100 + torch.arange(12.0).view(4, 3)
    queue.enqueue(b)  # wraps: 2 rows at the end, 2 at the start
    assert torch.equal(queue.keys[3:], b[:2]) and torch.equal(queue.keys[:2], b[2:])
    assert int(queue.ptr) == 2 and int(queue.filled) == 5
    big = -torch.arange(21.0).view(7, 3)
    queue.enqueue(big)  # more than the queue holds: only the newest 5 survive
    assert sorted(queue.keys[:, 0].tolist()) == sorted(big[-5:, 0].tolist())
    assert int(queue.ptr) == 2


def test_moco_queue_enqueue_of_its_own_rows():
    """Rows of the queue itself (a view of its buffer) were overwritten while being copied:
    wrong rows (wrapping) or a RuntimeError (overlapping memory)."""
    for ptr, rows in ((4, slice(3, 5)), (1, slice(0, 3)), (2, slice(0, 5))):
        queue, expected = ck.nn.MoCoQueue(5, 2), ck.nn.MoCoQueue(5, 2)
        for q in (queue, expected):
            q.keys.copy_(torch.arange(10.0).view(5, 2))
            q.ptr.fill_(ptr)
        expected.enqueue(queue.keys[rows].clone())
        queue.enqueue(queue.keys[rows])
        assert torch.equal(queue.keys, expected.keys) and int(queue.ptr) == int(expected.ptr)


def test_moco_queue_state_dict_round_trip_and_to():
    queue = ck.nn.MoCoQueue(6, 4, dtype=torch.float64)
    queue.enqueue(torch.randn(4, 4))
    state = queue.state_dict()
    fresh = ck.nn.MoCoQueue(6, 4, dtype=torch.float64)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.keys, queue.keys) and int(fresh.ptr) == int(queue.ptr)
    moved = fresh.to(torch.float32).to("meta")
    assert moved.keys.device.type == "meta" and moved.keys.dtype == torch.float32
    assert moved.ptr.dtype == torch.long  # integer buffers keep their dtype


def test_moco_queue_used_as_negatives_then_enqueued():
    torch.manual_seed(0)
    queue = ck.nn.MoCoQueue(32, 8)
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    loss = ck.info_nce(q, k, queue.keys, temperature=0.2)
    loss.backward()
    queue.enqueue(k)
    assert torch.equal(queue.keys[:4], k)


def test_moco_queue_takes_numpy_sizes():
    np = pytest.importorskip("numpy")
    queue = ck.nn.MoCoQueue(np.int64(6), np.int32(4))
    assert queue.keys.shape == (6, 4) and queue.size == 6


def test_empty_queue_and_extra_negatives_get_empty_gradients(backend):
    """A K = 0 queue or (B, 0, D) extra negatives that require grad: every backend leaves their
    kernels out, and the loss still reaches them (empty gradients, as the reference's), not
    autograd's "not used in the graph"."""
    q, k = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    queue, extra = torch.randn(0, 6, requires_grad=True), torch.randn(4, 0, 6, requires_grad=True)
    loss = ck.info_nce(q, k, queue, temperature=0.5, extra_negatives=extra, backend=backend)
    g_q, g_queue, g_extra = torch.autograd.grad(loss, [q, queue, extra])
    assert g_queue.shape == (0, 6) and g_extra.shape == (4, 0, 6)
    want = torch.autograd.grad(ck.info_nce(q, k, queue, temperature=0.5, extra_negatives=extra,
                                           backend="reference"), q)[0]
    assert torch.allclose(g_q, want, atol=1e-6)
    loss = ck.multi_positive_info_nce(q, k, torch.arange(4)[:, None], queue, temperature=0.5,
                                      backend=backend)
    assert torch.autograd.grad(loss, queue)[0].shape == (0, 6)


def test_compile_fullgraph_on_first_call_in_a_fresh_process():
    """torch.compile cannot trace an import: the first call of a loss under
    torch.compile(fullgraph=True) must find its backend module already loaded (a prebuilt or
    cached JIT extension is loaded at import); ``auto`` passes over a backend that is not loaded
    yet (a first JIT build) instead of failing the trace."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, contrastive_kernels as ck
        q = torch.randn(8, 16, requires_grad=True)
        k, queue = torch.randn(8, 16), torch.randn(64, 16)
        want = ck.info_nce(q, k, queue, backend="reference")
        for backend in ("chunked", "auto"):
            f = torch.compile(lambda q, k, queue: ck.info_nce(q, k, queue, backend=backend),
                              fullgraph=True, backend="aot_eager")
            got = f(q, k, queue)
            assert torch.allclose(got, want, rtol=1e-5), (backend, got, want)
            got.backward()
        from contrastive_kernels import functional
        for name in ("cpu", "cuda"):  # as if their JIT build had not run yet
            functional._loaded.pop(name, None)
        torch._dynamo.reset()
        f = torch.compile(lambda q, k, queue: ck.info_nce(q, k, queue), fullgraph=True,
                          backend="aot_eager")
        assert torch.allclose(f(q, k, queue), want, rtol=1e-5)
        assert "cpu" not in functional._loaded
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
