"""GPU suite of the Triton top-k (``make test-gpu``; skipped without CUDA).

Big shapes against exact references: integer-valued features make every score exact in every
dtype (fp16/bf16 products and fp32 sums of small integers), so the expected indices, ties
included, are known exactly; random unit features are compared by value and by the set of
indices above the k-th score. The host-resident bank must give bit-identical results to the
device-resident one."""
import importlib

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

T = importlib.import_module("contrastive_kernels.triton.topk")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _int_features(rows, d, gen, dtype):
    return torch.randint(-2, 3, (rows, d), generator=gen).to(dtype).cuda()


def _reference_keys(q, bank, k, similarity, exclude_index=None, ql=None, bl=None):
    """Exact top-k by the spec, in query blocks (scores in fp32 from the upcast inputs)."""
    vals, idx = [], []
    for i0 in range(0, q.shape[0], 256):
        i1 = min(q.shape[0], i0 + 256)
        v, i = reference.topk_similarity(
            q[i0:i1], bank, k, similarity=similarity,
            exclude_index=None if exclude_index is None else exclude_index[i0:i1],
            query_labels=None if ql is None else ql[i0:i1], bank_labels=bl,
            exclude_same_label=ql is not None)
        vals.append(v.float())
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("k", [1, 16, 128, 1024])
def test_exact_integer_scores_with_ties(dtype, similarity, k):
    """Exact arithmetic, many ties: indices must equal the spec's (ties to the lower index)."""
    gen = torch.Generator().manual_seed(k)
    q = _int_features(300, 128, gen, dtype)
    bank = _int_features(300_000, 128, gen, dtype)
    want_v, want_i = _reference_keys(q, bank, k, similarity)
    got_v, got_i = T.topk(q, bank, k, similarity=similarity)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_v.to(dtype).float(), want_v)  # the reference rounds to the input dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine", "l2"])
def test_random_unit_features_big_bank(dtype, similarity):
    gen = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(512, 128, generator=gen), dim=1).to(dtype).cuda()
    bank = torch.nn.functional.normalize(torch.randn(2**20, 128, generator=gen), dim=1).to(dtype).cuda()
    k = 128
    got_v, got_i = T.topk(q, bank, k, similarity=similarity)
    want_i = _reference_keys(q, bank, k, similarity)[1]
    want_v = torch.cat([torch.topk(reference.similarity_matrix(q[i:i + 128].float(), bank.float(), similarity),
                                   k, dim=1).values for i in range(0, q.shape[0], 128)])
    tol = 2e-6 if dtype == torch.float32 else 1e-5
    assert torch.allclose(got_v, want_v, rtol=tol, atol=tol * 4)
    api_v, api_i = ck.topk_similarity(q, bank, k, similarity=similarity, backend="triton")
    assert api_v.dtype == dtype and torch.equal(api_i, got_i)
    scores = reference.similarity_matrix(q[:64].float(), bank.float(), similarity)
    assert torch.allclose(scores.gather(1, got_i[:64]), got_v[:64], rtol=tol, atol=tol * 4)
    assert (got_v[:, :-1] >= got_v[:, 1:]).all()
    # every bank row clearly above the k-th score is returned
    above = scores > (got_v[:64, -1:] + 1e-4)
    returned = torch.zeros_like(above).scatter_(1, got_i[:64], True)
    assert not (above & ~returned).any()
    assert (got_i == want_i).float().mean() > 0.99


@pytest.mark.parametrize("k", [1, 100, 2048])
def test_host_bank_equals_device_bank(k):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(700, 128, generator=gen).half().cuda()
    bank_host = torch.randn(1_000_000, 128, generator=gen).half()
    ex = torch.randint(-1, 1_000_000, (700, 2), generator=gen).cuda()
    ql, bl = torch.randint(0, 50, (700,), generator=gen).cuda(), torch.randint(0, 50, (1_000_000,), generator=gen)
    for sim in ("dot", "cosine"):
        dev_v, dev_i = T.topk(q, bank_host.cuda(), k, similarity=sim, exclude_index=ex,
                              query_labels=ql, bank_labels=bl.cuda())
        for pinned in (False, True):
            bank = bank_host.pin_memory() if pinned else bank_host
            host_v, host_i = T.topk(q, bank, k, similarity=sim, exclude_index=ex, query_labels=ql,
                                    bank_labels=bl, _chunk_rows=150_000)
            assert torch.equal(host_v, dev_v) and torch.equal(host_i, dev_i), (sim, pinned)
        # and through the public API with the default chunk size
        v, i = ck.topk_similarity(q, bank_host, k, similarity=sim, backend="triton")
        want = T.topk(q, bank_host.cuda(), k, similarity=sim)
        assert torch.equal(i, want[1])


def test_host_bank_in_query_blocks_under_a_bar(capsys, monkeypatch):
    """A long search over a host bank goes in query blocks (each streams the bank once more)
    under a progress bar, with the result of one call."""
    from contrastive_kernels import functional
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(700, 128, generator=gen).half().cuda()
    bank = torch.randn(300_000, 128, generator=gen).half()
    ex = torch.randint(-1, 300_000, (700,), generator=gen).cuda()
    want = ck.topk_similarity(q, bank, 64, exclude_index=ex, backend="triton", progress=False)
    # blocks of 300 rows: a block's 0.2 s of scoring made 300 rows long, the bank pass short
    monkeypatch.setattr(functional, "_SCORE_RATE", {"cuda": 300 * 2 * 300_000 * 128 / 0.2})
    monkeypatch.setattr(functional, "_HOST_BANK_BANDWIDTH", 1e15)
    got = ck.topk_similarity(q, bank, 64, exclude_index=ex, backend="triton", progress=True)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    assert "topk_similarity: 100%" in capsys.readouterr().err


def test_limits_after_exclusions_and_labels():
    gen = torch.Generator().manual_seed(3)
    n = 40_000
    q = torch.randn(64, 64, generator=gen).cuda()
    bank = torch.randn(n, 64, generator=gen).cuda()
    rows = torch.arange(64).cuda()
    for k in (1, n):
        v, i = ck.topk_similarity(q, bank, k, backend="triton")
        wv, wi = _reference_keys(q, bank, k, "dot")
        assert torch.allclose(v, wv, rtol=1e-5, atol=1e-5) and (i == wi).float().mean() > 0.999
    v, i = ck.topk_similarity(q, bank, n - 1, exclude_index=rows, backend="triton")
    assert not (i == rows[:, None]).any()
    ql, bl = torch.arange(64).cuda() % 4, torch.arange(n).cuda() % 4
    v, i = ck.topk_similarity(q, bank, n // 4 * 3 - 1, exclude_index=rows, query_labels=ql,
                              bank_labels=bl, exclude_same_label=True, backend="triton")
    assert not (bl[i] == ql[:, None]).any() and not (i == rows[:, None]).any()
    # 2-D exclusions (MoCHi's self and partner) at a big bank
    ex = torch.stack([rows * 7, rows * 7 + 1], 1)
    got = T.topk(q, bank, 50, similarity="dot", exclude_index=ex)
    want = _reference_keys(q, bank, 60, "dot")
    for r in range(64):
        keep = [j for j in want[1][r].tolist() if j not in ex[r].tolist()][:50]
        assert got[1][r].tolist() == keep


def test_overflow_rows_are_recomputed(monkeypatch):
    """A bank ordered so that the strided sample sees only poor rows overflows the candidate
    slots; those rows must come back exact through the fallback."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(256, 64, generator=gen).half().cuda()
    bank = torch.randn(200_000, 64, generator=gen).half().cuda()
    monkeypatch.setattr(T, "_capacity", lambda expected, splits: 8)
    v, i = T.topk(q, bank, 64, similarity="dot")
    wi = _reference_keys(q, bank, 64, "dot")[1]
    scores = q.float() @ bank.float().T
    assert torch.allclose(v, scores.topk(64, dim=1).values, rtol=1e-5, atol=1e-4)
    assert torch.allclose(scores.gather(1, i), v, rtol=1e-5, atol=1e-4)
    assert (i == wi).float().mean() > 0.999


def test_large_k_routes_to_documented_path():
    gen = torch.Generator().manual_seed(5)
    q, bank = torch.randn(32, 32, generator=gen).cuda(), torch.randn(50_000, 32, generator=gen).cuda()
    v, i = ck.topk_similarity(q, bank, T.MAX_K + 1, backend="triton")
    wv, wi = _reference_keys(q, bank, T.MAX_K + 1, "dot")
    assert torch.allclose(v, wv, rtol=1e-5, atol=1e-5) and (i == wi).float().mean() > 0.999


def test_mining_scales_in_blocks():
    gen = torch.Generator().manual_seed(6)
    centers = torch.nn.functional.normalize(torch.randn(2000, 128, generator=gen), dim=1)
    emb = (centers.repeat_interleave(100, 0) + 0.05 * torch.randn(200_000, 128, generator=gen)).half().cuda()
    pairs, scores = ck.mine_semantic_positives(emb, 10, 0.8, backend="triton")
    assert (pairs[:, 0] != pairs[:, 1]).all() and (scores >= 0.8).all()
    assert (pairs[:, 0] // 100 == pairs[:, 1] // 100).float().mean() > 0.99


def test_gemm_only_floor_runs():
    q = torch.randn(1024, 128, device="cuda", dtype=torch.float16)
    bank = torch.randn(100_000, 128, device="cuda", dtype=torch.float16)
    got = T.gemm_only(q, bank)
    want = (q.float() @ bank.float().T).amax(1)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-2)
