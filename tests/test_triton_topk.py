"""The Triton top-k under the interpreter: what the shared suites (test_ops, test_mining_mixing,
test_properties) do not reach. Every path of the module on small shapes, with the module's
size constants lowered so that small banks still take the filter passes, several tiles,
several splits, the redo pass, the overflow fallback and the streamed (chunked) bank."""
import importlib
import re

import pytest
import torch

from conftest import FUSED_BACKENDS
from contrastive_kernels import _bank_chunks, reference

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="the Triton backend is unavailable")

T = importlib.import_module("contrastive_kernels.triton.topk")


@pytest.fixture
def small(monkeypatch):
    """Views above 64 rows take the FILTER path; 16 x 64 tiles, 3 splits."""
    monkeypatch.setattr(T, "DENSE_MIN", 64)
    monkeypatch.setattr(T, "dense_max", lambda k: max(64, 4 * k))
    monkeypatch.setitem(T.CPU_BLOCKS, "BM", 16)
    monkeypatch.setitem(T.CPU_BLOCKS, "BN", 64)
    monkeypatch.setitem(T.CPU_BLOCKS, "splits", 3)
    stats = []
    monkeypatch.setattr(T, "STATS", stats)
    return stats


def _spec(q, bank, k, similarity="dot", exclude_index=None, ql=None, bl=None):
    """The spec with 2-D exclusions: (values fp32, indices), sorted, ties to the lower index."""
    scores = reference.similarity_matrix(q.float(), bank.float(), similarity) + 0.0
    if exclude_index is not None:
        ex = exclude_index if exclude_index.dim() == 2 else exclude_index[:, None]
        for e in ex.unbind(1):
            hit = e >= 0
            scores[torch.arange(q.shape[0])[hit], e[hit]] = -float("inf")
    if ql is not None:
        scores = scores.masked_fill(ql[:, None] == bl[None, :], -float("inf"))
    v, i = torch.sort(scores, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def _check(got, want, q, bank, similarity, exact=True):
    gv, gi = got
    wv, wi = want
    assert gv.dtype == torch.float32 and gi.dtype == torch.int64 and gi.shape == wi.shape
    assert torch.allclose(gv, wv, rtol=1e-5, atol=1e-5)
    scores = reference.similarity_matrix(q.float(), bank.float(), similarity)
    assert torch.allclose(scores.gather(1, gi), gv, rtol=1e-5, atol=1e-5)  # each index has its score
    if exact:
        assert torch.equal(gi, wi)
    else:
        assert (gi == wi).float().mean() > 0.98


def test_keys_round_trip_and_order():
    v = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    idx = torch.tensor([7, 0, 5, 3, 2, 1, 4, 6])
    keys = T.encode_keys(v, idx)
    dv, di = T.decode_keys(keys)
    assert torch.equal(di, idx) and torch.equal(dv, v + 0.0)
    # integer order = (score, then lower index) order; -0.0 ties +0.0
    order = sorted(range(8), key=lambda j: (-float(v[j]), int(idx[j])))
    assert torch.argsort(keys, descending=True).tolist() == order
    assert keys[4] > keys[3]  # equal scores (+0.0 at index 2, -0.0 at index 3): index 2 first
    assert torch.equal(T.decode_keys(torch.tensor([T.INT64_MIN]))[1], torch.tensor([-1]))


@pytest.mark.parametrize("similarity,dtype", [("dot", torch.float16), ("cosine", torch.float32),
                                              ("l2", torch.float16)], ids=str)
def test_filter_cascade_matches_spec(small, similarity, dtype):
    """Big enough for the tile-maximum threshold pass and a FILTER pass with several splits."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(20, 8, generator=g).to(dtype)
    bank = torch.randn(4000, 8, generator=g).to(dtype)
    got = T.topk(q, bank, 6, similarity=similarity)
    _check(got, _spec(q, bank, 6, similarity), q, bank, similarity, exact=False)
    assert small and small[-1]["splits"] == 3 and small[-1]["overflow_rows"] == 0


def test_exact_sample_cascade_when_tiles_are_few(small, monkeypatch):
    """k large against the tile count: the threshold comes from the exact top-k of the 1/8
    sample, recursively (FILTER over FILTER over DENSE)."""
    monkeypatch.setattr(T, "sample_factor", lambda k, n, bn: 0)
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randint(-2, 3, (9, 6), generator=g).float(), torch.randint(-2, 3, (3000, 6), generator=g).float()
    got = T.topk(q, bank, 12, similarity="l2")
    _check(got, _spec(q, bank, 12, "l2"), q, bank, "l2")
    assert [s["n_view"] for s in small] == [375, 3000]


@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_tile_maximum_threshold_is_a_lower_bound_with_exclusions(small, similarity):
    """The threshold of the tile-maximum pass is at most each row's true k-th allowed key, also
    when the excluded bank rows are the row's best (the largest tile maxima): it takes the
    (k+E)-th largest tile maximum. Lower bound, not equal: it is the smallest key of its score.
    Tightness: fewer than 4x the rows of the k-th score pass it."""
    g = torch.Generator().manual_seed(7)
    q, bank = torch.randn(16, 8, generator=g), torch.randn(4096, 8, generator=g)
    k, n_ex = 5, 3
    best = _spec(q, bank, n_ex, similarity)[1]  # exclude each row's n_ex best rows
    qs, _ = T._prepare_queries(q, similarity, best, None)
    view, _ = T._prepare_view(bank, similarity, None, 0)
    cfg = T._config(q.device, qs.q.dtype, 8, 16)
    assert T.cdiv(view.n_view, cfg.BN) >= 4 * k + n_ex  # the 64 tiles of this view
    thr = T._tilemax_threshold(qs, view, k, similarity, cfg)
    wv, wi = T.topk(q, bank, k, similarity=similarity, exclude_index=best)  # the kernel's rounding
    _check((wv, wi), _spec(q, bank, k, similarity, exclude_index=best), q, bank, similarity)
    kth = T.encode_keys(wv[:, -1], wi[:, -1])
    assert (thr <= kth).all()
    tv, ti = T.decode_keys(thr)
    assert (ti == T._LOW).all()  # every score equal to the threshold's passes
    # without the exclusions' ranks the bound fails for some row: the test can see it
    plain = T._tilemax_threshold(qs._replace(n_ex=0), view, k, similarity, cfg)
    assert (plain > kth).any()
    scores = reference.similarity_matrix(q, bank, similarity)
    assert ((scores >= tv[:, None]).sum(1) < 4 * (k + n_ex) * 8).all()


def test_ties_integer_scores_all_paths(small):
    """Integer features: exact scores and massive ties; indices must equal the spec's."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (9, 4), generator=g).float()
    bank = torch.randint(-1, 2, (700, 4), generator=g).float()
    for similarity, k in [("dot", 1), ("dot", 40), ("l2", 5)]:
        got = T.topk(q, bank, k, similarity=similarity)
        _check(got, _spec(q, bank, k, similarity), q, bank, similarity)


def test_redo_pass_many_survivors_per_tile(small, monkeypatch):
    """One straight-line extraction per tile (X=1) while most tiles hold several survivors per
    row: the redo pass must recover all of them."""
    monkeypatch.setattr(T, "_extract_steps", lambda expected, n, bn: 1)
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-3, 4, (5, 8), generator=g).float()
    bank = torch.randint(-3, 4, (1200, 8), generator=g).float()
    bank[::7] = q[0] * 3  # clusters of exact ties near query 0 (integers: exact in any order)
    got = T.topk(q, bank, 30, similarity="dot")
    _check(got, _spec(q, bank, 30, "dot"), q, bank, "dot")


@pytest.mark.parametrize("x_steps,survivor_sum", [(1, True), (1, False), (2, True), (4, True)])
def test_filter_pass_lists_exactly_the_keys_at_or_above_each_threshold(small, monkeypatch, x_steps,
                                                                        survivor_sum):
    """One FILTER launch with hand-set threshold keys (the j-th best of each row, j from 1 to 40
    over 10 tiles): each row's slots hold exactly its eligible keys at or above the threshold,
    whether a tile holds one of them (stored from the survivor sum, no column search), up to X
    (the straight extraction) or more (the redo pass), with exclusions and labels; also X=1
    without the sum (CK_TOPK_SURVIVOR_SUM=0, the A/B). Integer features: exact scores, ties."""
    monkeypatch.setattr(T, "SURVIVOR_SUM", survivor_sum)
    g = torch.Generator().manual_seed(11)
    m, n = 20, 640
    q = torch.randint(-20, 21, (m, 8), generator=g).float()
    bank = torch.randint(-20, 21, (n, 8), generator=g).float()
    bank[5::50] = q[3]  # a row with tied scores spread over the tiles
    ex = torch.randint(-1, n, (m, 2), generator=g)
    ql, bl = torch.randint(0, 3, (m,), generator=g), torch.randint(0, 3, (n,), generator=g)
    scores = q @ bank.T
    scores[(ql[:, None] == bl[None, :])] = -float("inf")
    hit = ex >= 0
    scores[torch.arange(m)[:, None].expand_as(ex)[hit], ex[hit]] = -float("inf")
    keys = T.encode_keys(scores, torch.arange(n).expand(m, n))
    depth = torch.tensor([1, 2, 3, 5, 8, 13, 21, 40] * 3)[:m]
    thr_keys = keys.sort(1, descending=True).values.gather(1, depth[:, None] - 1)[:, 0]
    qs, _ = T._prepare_queries(q, "dot", ex, ql)
    view, _ = T._prepare_view(bank, "dot", bl, 0)
    cfg = T._config(q.device, q.dtype, 8, m)
    splits, per = T._splits(cfg, -(-m // cfg.BM), -(-n // cfg.BN))
    cap = 64
    buf = torch.full((m, splits * cap), T.INT64_MIN, dtype=torch.int64)
    cnt = torch.empty((m, splits), dtype=torch.int32)
    redo = torch.empty(-(-m // cfg.BM) * splits * per, dtype=torch.int32)
    T._launch(T.MODE_FILTER, qs, view, "dot", cfg, out=buf, cnt=cnt, redo=redo,
              thr=T._threshold(thr_keys), cap=cap, splits=splits, per_split=per, x_steps=x_steps)
    for i in range(m):
        want = keys[i][(keys[i] >= thr_keys[i]) & (scores[i] > -float("inf"))].sort().values
        got = buf[i][buf[i] != T.INT64_MIN].sort().values
        assert torch.equal(got, want), i
        assert int(cnt[i].sum()) == want.numel()
    assert (depth > 10).any() and (depth == 1).any()


def test_exclusions_1d_2d_and_labels(small):
    g = torch.Generator().manual_seed(4)
    q, bank = torch.randn(10, 8, generator=g), torch.randn(900, 8, generator=g)
    ex1 = torch.randint(-1, 900, (10,), generator=g)
    ex2 = torch.stack([torch.arange(10) * 3, torch.randint(-1, 900, (10,), generator=g), torch.full((10,), -1)], 1)
    ql, bl = torch.randint(0, 4, (10,), generator=g), torch.randint(0, 4, (900,), generator=g)
    for ex in (ex1, ex2):
        want = _spec(q, bank, 9, "cosine", ex, ql, bl)
        got = T.topk(q, bank, 9, similarity="cosine", exclude_index=ex, query_labels=ql, bank_labels=bl)
        _check(got, want, q, bank, "cosine", exact=False)
        i = got[1]
        assert not (bl[i] == ql[:, None]).any()
        exx = ex if ex.dim() == 2 else ex[:, None]
        assert not (i[:, :, None] == exx[:, None, :]).any()


def test_self_exclusion_for_mining(small):
    """The exclusion that mining uses (each row's own index) with the row itself the best match."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(120, 8, generator=g)
    rows = torch.arange(120)
    got = T.topk(emb, emb, 4, similarity="cosine", exclude_index=rows)
    _check(got, _spec(emb, emb, 4, "cosine", rows), emb, emb, "cosine", exact=False)


def test_overflow_falls_back_to_exact_rows(small, monkeypatch):
    monkeypatch.setattr(T, "_capacity", lambda expected, splits: 1)
    g = torch.Generator().manual_seed(6)
    q, bank = torch.randn(7, 8, generator=g), torch.randn(800, 8, generator=g)
    got = T.topk(q, bank, 5, similarity="dot")
    _check(got, _spec(q, bank, 5, "dot"), q, bank, "dot", exact=False)
    assert small[-1]["overflow_rows"] > 0


def test_nonfinite_rows_follow_the_chunked_backend(small):
    g = torch.Generator().manual_seed(7)
    q, bank = torch.randn(4, 8, generator=g), torch.randn(500, 8, generator=g)
    q[1, 3] = float("nan")
    bank[17, 0] = float("inf")
    got = T.topk(q, bank, 3, similarity="dot")
    from contrastive_kernels import chunked

    want = chunked.topk(q, bank, 3, similarity="dot")
    assert torch.equal(got[1], want[1])
    assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0]))


def test_streamed_bank_equals_device_bank(small):
    """The running-threshold merge over chunks (the host-bank path, with the chunks as views):
    identical to the one-shot result, whatever the chunk size. Integer features: the
    interpreter's numpy matmul rounds differently at different tile positions, the GPU's MMA
    does not; exact arithmetic makes the comparison bitwise here too."""
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-3, 4, (9, 8), generator=g).float()
    bank = torch.randint(-3, 4, (1700, 8), generator=g).float()
    ex = torch.randint(-1, 1700, (9, 2), generator=g)
    ql, bl = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (1700,), generator=g)
    once = T.topk(q, bank, 7, similarity="l2", exclude_index=ex, query_labels=ql, bank_labels=bl)
    for rows in (1700, 600, 333):
        streamed = T.topk(q, bank, 7, similarity="l2", exclude_index=ex, query_labels=ql,
                          bank_labels=bl, _chunk_rows=rows)
        assert torch.equal(streamed[0], once[0]) and torch.equal(streamed[1], once[1]), rows
    _check(once, _spec(q, bank, 7, "l2", ex, ql, bl), q, bank, "l2")


def test_k_above_the_kernel_limit_uses_the_chunked_backend(monkeypatch):
    monkeypatch.setattr(T, "MAX_K", 4)
    calls = []
    from contrastive_kernels import chunked

    real = chunked.topk
    monkeypatch.setattr(chunked, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, bank = torch.randn(3, 5), torch.randn(60, 5)
    got = T.topk(q, bank, 5, similarity="dot")
    assert calls and torch.equal(got[1], _spec(q, bank, 5)[1])


def test_query_blocks(small, monkeypatch):
    monkeypatch.setattr(T, "BUFFER_BYTES", 1)  # one block of BM rows at a time
    g = torch.Generator().manual_seed(9)
    q, bank = torch.randn(35, 8, generator=g), torch.randn(500, 8, generator=g)
    _check(T.topk(q, bank, 4), _spec(q, bank, 4), q, bank, "dot", exact=False)


def test_plan_chunks():
    assert _bank_chunks.plan_chunks(10, 4) == [(0, 4, 0), (4, 8, 1), (8, 10, 0)]
    assert _bank_chunks.plan_chunks(3, 10) == [(0, 3, 0)]
    assert _bank_chunks.plan_chunks(0, 5) == []
    with pytest.raises(ValueError):
        _bank_chunks.plan_chunks(10, 0)


class _FakeCuda:
    """Records the order of copies, waits and event records of _HostChunks (no GPU)."""

    def __init__(self):
        self.log = []
        self._stream = "main"

    def is_available(self):
        return False

    def current_stream(self, device=None):
        return _FakeStream(self, "main")

    def Stream(self, device=None):
        return _FakeStream(self, "copy")

    def Event(self):
        return _FakeEvent(self)

    def stream(self, s):
        rt = self

        class _Ctx:
            def __enter__(self):
                rt._stream = s.name

            def __exit__(self, *a):
                rt._stream = "main"
        return _Ctx()


class _FakeStream:
    def __init__(self, rt, name):
        self.rt, self.name = rt, name

    def wait_event(self, ev):
        self.rt.log.append(("wait", self.name, ev.id))


class _FakeEvent:
    count = 0

    def __init__(self, rt):
        self.rt = rt
        _FakeEvent.count += 1
        self.id = _FakeEvent.count

    def record(self, stream):
        self.rt.log.append(("record", stream.name, self.id))

    def synchronize(self):
        self.rt.log.append(("sync", "host", self.id))


@pytest.mark.parametrize("pinned", [False, True])
def test_host_chunks_schedule(pinned):
    """Double buffering: a device slot is refilled only after the kernels that read it were
    released, the main stream waits for each copy, staging buffers are reused only after their
    copy finished, and every chunk arrives with its rows."""
    rt = _FakeCuda()
    bank = torch.arange(23 * 2, dtype=torch.float32).view(23, 2)
    labels = torch.arange(23)
    chunks = _bank_chunks.HostChunks(bank, labels, 5, torch.device("cpu"), runtime=rt)
    chunks.pinned = pinned
    seen = []
    for j0, data, lab in chunks:
        seen.append((j0, data.clone(), lab.clone()))
        rt.log.append(("kernels", "main", j0))
        chunks.consumed()
    assert [s[0] for s in seen] == [0, 5, 10, 15, 20]
    assert torch.equal(torch.cat([s[1] for s in seen]), bank)
    assert torch.equal(torch.cat([s[2] for s in seen]), labels)
    copied = [e.id for e in chunks.copied]
    released = [e.id for e in chunks.released]
    log = rt.log
    for c in range(5):
        slot = c % 2
        # the copy stream waits on the slot's release event before the copy of chunk c ...
        waits = [i for i, e in enumerate(log) if e == ("wait", "copy", released[slot])]
        assert len(waits) >= c // 2 + 1
        # ... and chunk c's kernels come after the main stream waited for its copy
        kern = log.index(("kernels", "main", 5 * c))
        assert ("wait", "main", copied[slot]) in log[:kern]
    if not pinned:  # staging reuse waits for the previous copy from that buffer
        assert sum(1 for e in log if e[0] == "sync") == 3
    else:
        assert not any(e[0] == "sync" for e in log)


def test_threshold_pass_costs_about_the_gemm_alone_sm90():
    """sm_90 SASS, no GPU needed: an iteration of the tile-maximum pass (per bank tile) costs
    at most 10 % more instructions per thread than the GEMM-only floor's, and a FILTER tile's
    extra work is skippable (the survivor extraction behind the branch) and, at X=1, costs at
    most 10 % more than a GEMM tile. The per-tile counts that ``sample_factor`` is chosen with
    (scripts/triton_aot_topk.py --sass)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "scripts/triton_aot_topk.py", "--arch", "90", "--sass",
                           "--filter", "float16_dot_E0_X1"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first_loop = {}  # mode -> (instructions, barriers, skippable) of its walk over full tiles
    pattern = r"sm_90 (topk_\w+): .*\n\s+sass: loop (\d+) instr \((\d+) barriers, (\d+) skippable\)"
    for name, n, bars, skip in re.findall(pattern, proc.stdout):
        first_loop[name.split("_")[1]] = (int(n), int(bars), int(skip))
    gemm, tilemax, filt = first_loop["gemm"], first_loop["tilemax"], first_loop["filter"]
    assert tilemax[0] <= 1.1 * gemm[0], first_loop
    assert filt[2] > 0 and filt[0] - filt[2] <= 1.15 * gemm[0], first_loop
    # the survivor path at X=1 (one sum pass; 295 when written, 433 with a count and a column
    # search): at most about a GEMM tile's worth more
    assert filt[2] <= 1.1 * gemm[0], first_loop
