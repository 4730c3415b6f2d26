"""The top-k benchmark candidates (bench/baselines_topk.py) and the host-bank case, on the CPU."""
import torch

from contrastive_kernels import reference
from contrastive_kernels.bench import cases
from contrastive_kernels.bench.baselines_topk import faiss_gpu_available, torch_topk


def test_torch_topk_baseline_is_a_correct_topk():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(9, 16, generator=g), torch.randn(3000, 16, generator=g)
    old = cases.BASELINES.copy()
    v, i = torch_topk(q, bank, 20)
    wv, _ = reference.topk_similarity(q, bank, 20)
    assert torch.allclose(v, wv, atol=1e-5)
    assert torch.allclose((q @ bank.T).gather(1, i), v, atol=1e-5)
    assert cases.BASELINES == old


def test_registered_and_host_case():
    cases._load_baselines()
    assert {"torch-topk", "gemm-only", "faiss-gpu"} <= set(cases.BASELINES)
    c = cases.case("topk_host", "fp16", M=4, N=100, D=8, k=3)
    assert c.flops == 2.0 * 4 * 100 * 8 and c.bank_bytes() == 100 * 8 * 2
    # on a CPU machine: gemm-only and faiss-gpu decline, torch-topk runs
    assert cases.BASELINES["gemm-only"](c, "cpu") is None
    assert cases.BASELINES["faiss-gpu"](c, "cpu") is None
    cases.BASELINES["torch-topk"](c, "cpu")()
    assert isinstance(faiss_gpu_available(), (str, type(None)))
    step, _ = cases.build_step(c, "chunked", "cpu")
    step()
