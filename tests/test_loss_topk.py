"""The hard negatives of info_nce(mixing=) from the loss's own pass over the queue
(``lse_stats_topk``; _loss_topk.py), on every backend that has it (Triton under the interpreter,
the C++ CPU kernels): the hard set AND its order equal the backend's separate top-k (random and
tied scores, every similarity's affine form, both estimators, half precisions), the log-sum-exp
equals lse_stats', gradients, forced sample misses and overflows, non-finite rows, the first-call
check, when the fused path is not taken, and that info_nce(mixing=) takes it."""
import importlib
import types
import warnings

import pytest
import torch

import contrastive_kernels as ck
from conftest import FUSED_BACKENDS
from contrastive_kernels import _loss_topk as LT
from contrastive_kernels._common import Mixing
from _helpers import queue_case as _case

NAMES = [b for b in ("triton", "cpu") if b in FUSED_BACKENDS]
pytestmark = pytest.mark.skipif(not NAMES, reason="no backend with lse_stats_topk")


def _backend(name):
    if name == "triton":
        mixing = importlib.import_module("contrastive_kernels.triton.mixing")
        infonce = importlib.import_module("contrastive_kernels.triton.infonce")
        return types.SimpleNamespace(
            name=name, run=mixing.lse_stats_topk, lse=infonce.lse_stats,
            topk=lambda q, k, n: mixing._topk.topk(q, k, n)[1], topk_home=(mixing._topk, "topk"),
            reason=lambda q, k, n, g: mixing.fused_topk_reason(q, k, n, g),
            dtypes=(torch.float32, torch.float16))
    cb = importlib.import_module("contrastive_kernels._csrc_backend")
    return types.SimpleNamespace(
        name=name, run=cb.lse_stats_topk, lse=cb.lse_stats, topk=lambda q, k, n: cb.topk(q, k, n)[1],
        topk_home=(cb, "topk"), reason=lambda q, k, n, g: cb.cpu_fused_topk_reason(q, k, n),
        dtypes=(torch.float32, torch.float16, torch.bfloat16))


@pytest.fixture(params=NAMES)
def be(request):
    return _backend(request.param)


@pytest.fixture
def stats(monkeypatch):
    s = {"fused_calls": 0, "separate_calls": 0, "fallback_rows": 0}
    monkeypatch.setattr(LT, "STATS", s)
    monkeypatch.setattr(LT, "_checked_keys", {})
    monkeypatch.setattr(LT, "MIN_SAMPLE_STRIDE", 1)  # the small queues here cover the f = 1 plan too
    return s


def _separate(be, q, k, a, col, rb, cb, gammas, n_hard):
    return be.lse(q, k, a, col, rb, cb, gammas=gammas)[0], be.topk(q.detach(), k.detach(), n_hard)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine,gammas", [("dot", (1.0,)), ("cosine", (1.0,)), ("l2", (1.5, 0.5))])
@pytest.mark.parametrize("n,n_hard", [(50, 12), (700, 12), (700, 45), (40, 40)])
def test_fused_topk_equals_separate_topk(be, stats, dtype, affine, gammas, n, n_hard):
    """The hard set AND its order equal topk's; the LSE equals lse_stats'. Queues of 50 and 40
    rows, and 700 rows for n_hard = 45, take the whole queue as the threshold sample (f = 1), 700
    rows for n_hard = 12 a 1/7 sample; n_hard = K keeps every row."""
    if dtype not in be.dtypes:
        pytest.skip(f"{be.name}: {be.reason(*_case(2, 8, 4, dtype)[:2], 1, 1)}")
    case = _case(19, n, 24, dtype, affine, gammas, seed=n + n_hard)
    row, hard = be.run(*case[:6], gammas=case[6], n_hard=n_hard)
    want_row, want_hard = _separate(be, *case, n_hard)
    assert torch.equal(hard, want_hard)
    assert torch.allclose(row, want_row, rtol=1e-6, atol=1e-5)
    assert stats == {"fused_calls": 1, "separate_calls": 0, "fallback_rows": 0}


def test_fused_topk_ties(be, stats):
    """Integer features: many equal scores; ties go to the lower index, as in topk."""
    case = _case(21, 600, 6, torch.float32, integer=True, seed=3)
    for n_hard in (1, 30, 200):
        _, hard = be.run(*case[:6], gammas=case[6], n_hard=n_hard)
        assert torch.equal(hard, _separate(be, *case, n_hard)[1])
    # a threshold on a heavily tied value may overflow a row's list (then topk redoes the row):
    # nearly all rows must still come from the fused path
    assert stats["fused_calls"] == 3 and stats["fallback_rows"] <= 2


@pytest.mark.parametrize("queue_grad", [False, True])
def test_fused_topk_gradients(be, stats, queue_grad):
    """The op's autograd: row-only (MoCo) and recompute (queue with a gradient) backward give
    lse_stats' gradients."""
    q, k, a, col, rb, cb, gammas = _case(13, 300, 16, torch.float32, "l2", (1.3, 0.3), seed=4)
    w = torch.rand(2, 13, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *t: be.run(*t, gammas=gammas, n_hard=20)[0],
               lambda *t: be.lse(*t, gammas=gammas)[0]):
        leaves = [t.detach().clone().requires_grad_(r) for t, r in
                  ((q, True), (k, queue_grad), (a, True), (rb, True))]
        out = fn(leaves[0], leaves[1], leaves[2], None, leaves[3], cb)
        need = [t for t in leaves if t.requires_grad]
        grads.append(torch.autograd.grad((out * w).sum(), need))
    for x, y in zip(*grads):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert stats["fused_calls"] == 1


def test_threshold_misses_fall_back_to_topk(be, stats, monkeypatch):
    """A threshold above every score (no candidate) and a capacity below the count (overflow):
    every row is recomputed by topk, and the result is still exact."""
    case = _case(17, 500, 12, torch.float32, seed=5)
    want = _separate(be, *case, 25)[1]
    monkeypatch.setattr(LT, "sample_kth", lambda q, k, f, ks, kth=None: torch.full((q.shape[0],), 1e30))
    assert torch.equal(be.run(*case[:6], gammas=case[6], n_hard=25)[1], want)
    assert stats["fallback_rows"] == 17
    monkeypatch.undo()
    monkeypatch.setattr(LT, "STATS", stats)
    plan = LT.candidate_plan
    monkeypatch.setattr(LT, "candidate_plan", lambda n, k: plan(n, k)[:2] + (k,))  # capacity n_hard
    monkeypatch.setattr(LT, "sample_kth", lambda q, k, f, ks, kth=None: torch.full((q.shape[0],), -1e30))
    assert torch.equal(be.run(*case[:6], gammas=case[6], n_hard=25)[1], want)
    assert stats["fallback_rows"] == 34


def test_nonfinite_rows_fall_back(be, stats):
    """A NaN query row has a non-finite LSE: that row is recomputed by topk (the others stay
    fused), and the hard negatives equal topk's for every row."""
    q, k, a, col, rb, cb, gammas = _case(11, 400, 8, torch.float32, seed=6)
    q[3, 2] = float("nan")
    row, hard = be.run(q, k, a, col, rb, cb, gammas=gammas, n_hard=10)
    assert torch.isnan(row[0, 3]) and torch.isfinite(row[0, torch.arange(11) != 3]).all()
    assert torch.equal(hard, be.topk(q, k, 10))
    assert stats["fallback_rows"] == 1


def test_first_call_check_disables_a_mismatching_key(be, stats, monkeypatch):
    """Should the loss kernel's scores ever differ from the top-k kernel's (another device, another
    compiler), the first call of a shape key sees it, warns, returns topk's answer and sends that
    key to the separate top-k from then on."""
    case = _case(9, 300, 8, torch.float32, seed=7)
    home, attr = be.topk_home
    real = getattr(home, attr)

    def shuffled(*a, **kw):  # a "top-k kernel" that orders the 15 hardest differently
        v, i = real(*a, **kw)
        return (v.flip(1), i.flip(1)) if a[2] == 15 else (v, i)

    monkeypatch.setattr(home, attr, shuffled)
    with pytest.warns(RuntimeWarning, match="differ from topk_similarity"):
        _, hard = be.run(*case[:6], gammas=case[6], n_hard=15)
    assert torch.equal(hard, shuffled(case[0], case[1], 15)[1])
    assert list(LT._checked_keys.values()) == [False]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again = be.run(*case[:6], gammas=case[6], n_hard=15)
    assert not [w for w in caught if "differ from topk_similarity" in str(w.message)]
    assert torch.equal(again, hard) and stats["separate_calls"] == 1


def test_when_the_fused_path_is_not_taken(be, stats, monkeypatch):
    q, k, a, col, rb, cb, gammas = _case(5, 60, 8, torch.float64)
    assert "float64" in be.reason(q, k, 5, 1)
    assert be.reason(q.float(), k.float(), 5, 1) is None
    assert be.reason(q.float(), k.float(), 61, 1) is not None  # n_hard over the queue
    monkeypatch.setattr(LT, "FUSED_TOPK", False)
    assert be.reason(q.float(), k.float(), 5, 1) == "CK_MIXING_FUSED_TOPK=0"
    row, hard = be.run(q, k, a, col, rb, cb, gammas=gammas, n_hard=5)
    assert torch.equal(hard, be.topk(q, k, 5)) and stats["separate_calls"] == 1


@pytest.mark.skipif("triton" not in NAMES, reason="the Triton backend is unavailable")
def test_triton_reasons():
    be = _backend("triton")
    q, k = _case(5, 200, 8, torch.bfloat16)[:2]
    assert "interpreter" in be.reason(q, k, 5, 1)


@pytest.mark.skipif("cpu" not in NAMES, reason="the C++ extension is not built")
def test_cpu_candidate_lists_stay_under_the_buffer_budget(stats, monkeypatch):
    """Lists of capacity int64 keys per row and thread: over CK_TOPK_BUFFER_MB, the separate top-k."""
    cb = importlib.import_module("contrastive_kernels._csrc_backend")
    q, k, a, col, rb, cb_, gammas = _case(64, 2000, 8, torch.float32, seed=8)
    cap = LT.candidate_plan(2000, 100)[2]
    assert cb.cpu_fused_topk_reason(q, k, 100) is None
    monkeypatch.setattr(cb, "CPU_TOPK_BUFFER_BYTES", 8 * cap * 64 * torch.get_num_threads() - 1)
    assert "CK_TOPK_BUFFER_MB" in cb.cpu_fused_topk_reason(q, k, 100)
    _, hard = cb.lse_stats_topk(q, k, a, n_hard=100)
    assert torch.equal(hard, cb.topk(q, k, 100)[1]) and stats["separate_calls"] == 1


@pytest.mark.skipif("cpu" not in NAMES, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_column_parts_agree(stats, threads):
    """The CPU loss pass splits the queue's columns among threads, each part with its own lists:
    any split gives topk's hard set (a queue 16 x n_hard, the MoCHi ratio of 65536 / 1024 / 4)."""
    cb = importlib.import_module("contrastive_kernels._csrc_backend")
    q, k = (torch.nn.functional.normalize(t, dim=1) for t in _case(40, 4096, 32, torch.float32, seed=9)[:2])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, hard = cb.lse_stats_topk(q, k, torch.full((40,), 1 / 0.07), n_hard=256)
        want = cb.topk(q, k, 256)[1]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(hard, want) and stats["fallback_rows"] == 0


def test_info_nce_takes_the_fused_path(be, stats):
    """info_nce(mixing=) on a queue gets its hard negatives from lse_stats_topk and equals the
    reference with an equally seeded generator."""
    g = torch.Generator().manual_seed(0)
    q, p = (torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1) for _ in range(2))
    queue = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    losses = []
    for backend in (be.name, "reference"):
        mixing = Mixing(20, 8, 4, torch.Generator().manual_seed(5))
        qq = q.clone().requires_grad_()
        loss = ck.info_nce(qq, p, queue, mixing=mixing, backend=backend)
        loss.backward()
        losses.append((loss.detach(), qq.grad))
    assert stats["fused_calls"] == 1
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-5)
    assert torch.allclose(losses[0][1], losses[1][1], rtol=1e-4, atol=1e-6)


def test_short_queues_take_the_separate_topk(be, monkeypatch):
    """By default a queue too short for a sample of every 2nd row (here, n_hard < SAMPLE_HITS:
    shorter than 2 x SAMPLE_ROWS_PER_HARD x n_hard) takes the separate top-k, with the same result."""
    s = {"fused_calls": 0, "separate_calls": 0, "fallback_rows": 0}
    monkeypatch.setattr(LT, "STATS", s)
    monkeypatch.setattr(LT, "_checked_keys", {})
    q, k, a, col, rb, cb, gammas = _case(9, 300, 16, torch.float32, seed=7)
    assert LT.candidate_plan(319, 20)[0] == 1 and LT.candidate_plan(320, 20)[0] == 2
    assert "queue too short" in be.reason(q, k, 20, 1)
    row, hard = be.run(q, k, a, col, rb, cb, gammas=gammas, n_hard=20)
    want_row, want_hard = _separate(be, q, k, a, col, rb, cb, gammas, 20)
    assert torch.equal(hard, want_hard) and torch.allclose(row, want_row, rtol=1e-6, atol=1e-6)
    assert s == {"fused_calls": 0, "separate_calls": 1, "fallback_rows": 0}
    q2, k2 = _case(9, 320, 16, torch.float32, seed=7)[:2]
    assert be.reason(q2, k2, 20, 1) is None


@pytest.mark.skipif("triton" not in NAMES, reason="Triton backend unavailable")
def test_triton_candidate_lists_too_wide_take_the_separate_topk():
    """A small n_hard over a long queue plans lists wider than the Triton merge sorts (2^20 rows,
    n_hard = 32: capacity 31616): the separate top-k instead of a ValueError from the merge."""
    mixing = importlib.import_module("contrastive_kernels.triton.mixing")
    q, queue = torch.randn(4, 16), torch.empty(2**20, 16)
    assert LT.candidate_plan(2**20, 32)[2] > 16384
    assert "wider than the merge" in mixing.fused_topk_reason(q, queue, 32, 1)
    assert mixing.fused_topk_reason(q, queue, 1024, 1) is None


def test_candidate_plan():
    for n, k in [(65536, 1024), (2**20, 1024), (700, 12), (40, 40), (4096, 1)]:
        f, k_s, cap = LT.candidate_plan(n, k)
        n_sample = -(-n // f)
        assert 1 <= f and 1 <= k_s <= n_sample and k <= cap <= n
        assert k_s >= k * n_sample / n  # the sample's share of the top n_hard, plus margin
    assert LT.candidate_plan(2**20, 1024)[0] == 128  # an 8192-row sample at K=2^20 (8 hits expected)
    # a sparser sample where the default expects more than SAMPLE_HITS of the top n_hard: still 32
    assert LT.candidate_plan(65536, 1024)[0] == 32 and LT.candidate_plan(8192, 1024)[0] == 4
    assert LT.candidate_plan(4096, 256)[0] == 8 and LT.candidate_plan(65536, 256)[0] == 32
