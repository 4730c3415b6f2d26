"""The mixing benchmark candidates (bench/baselines_mochi.py) and the mixing preset, on the CPU."""
import csv

import torch

import contrastive_kernels as ck
from contrastive_kernels.bench import cases
from contrastive_kernels.bench.__main__ import main
from contrastive_kernels.bench.baselines_mochi import eager_mochi_loss


def test_eager_mochi_is_mochi():
    """The eager baseline computes info_nce(mixing=)'s loss and gradient (same draws; it forms
    1 - a from the fp32 draws in fp32, hence a 1e-6 tolerance: other draws differ by O(1))."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 12, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(6, 12, generator=g, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(50, 12, generator=g, dtype=torch.float64), dim=1)
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    got = eager_mochi_loss(q1, k, queue, 0.2, 10, 6, 3, torch.Generator().manual_seed(5))
    want = ck.info_nce(q2, k, queue, temperature=0.2,
                       mixing=ck.Mixing(10, 6, 3, torch.Generator().manual_seed(5)),
                       backend="reference")
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(torch.autograd.grad(got, q1)[0], torch.autograd.grad(want, q2)[0],
                          rtol=1e-6, atol=1e-7)


def test_mixing_preset_reports_the_ratio_to_plain_infonce(tmp_path, capsys, monkeypatch):
    """The preset pairs each mixing case with plain InfoNCE at the same B, K, D; the report gives
    mixing / plain of the same backend, and eager MoCHi against the eager reference."""
    cases._load_baselines()
    assert {"eager-mochi", "triton-separate-topk", "cpu-separate-topk"} <= set(cases.BASELINES)
    ops = [(c.op, c.dims["K"]) for c in cases.PRESETS["mixing"]]
    assert ops == [("info_nce_bank", 65536), ("mixing", 65536), ("info_nce_bank", 2**20),
                   ("mixing", 2**20)]
    tiny = [cases.case("info_nce_bank", B=8, K=64, D=8, label="m"),
            cases.case("mixing", B=8, K=64, D=8, n_hard=8, s=4, s_q=2, label="m")]
    monkeypatch.setitem(cases.PRESETS, "tiny-mixing", tiny)
    backends = ["chunked", "eager-mochi", "reference"]
    if ck.available_backends("cpu")["cpu"] is None:  # the C++ backend with and without the fusion
        backends += ["cpu", "cpu-separate-topk"]
    assert main(["--preset", "tiny-mixing", "--backends", ",".join(backends),
                 "--repeats", "1", "--no-isolate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    ratios = next(line for line in out.splitlines() if "against plain InfoNCE" in line)
    for backend in backends:
        assert f"B=8 K=64 D=8 n_hard=8 s=4 s_q=2 {backend}: " in ratios, backend
    # the mixing-only candidates get no row (not a failed one) on the plain case
    assert "does not support" not in out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(r["op"], r["backend"]) for r in rows if r["backend"] in ("eager-mochi", "cpu-separate-topk")} == {
        ("mixing", b) for b in backends if b in ("eager-mochi", "cpu-separate-topk")}
