"""Checks a CUDA build of the extension on a machine without a GPU (scripts/cuda_build_check.sh).

Run with the CUDA torch's interpreter and PYTHONPATH at the staged package whose _C*.so is the
CUDA build. Fails (exit 1) unless:
  - the package loads that build, and build_info() reports CUDA kernels for the built archs;
  - every contrastive_kernels:: op has a CPU, a CUDA and a Meta kernel registered (the CPU-only
    ops of CPU_ONLY_OPS: CPU and Meta);
  - the CPU kernels of that build match reference.py (info_nce value and gradients, top-k);
  - backend="cuda" says why it is unavailable (no device) instead of failing at a call.
"""
import os
import sys

import torch

# ops with no CUDA kernel: lse_topk_fwd (the CPU loss pass's hard negatives); backend="cuda" takes
# the separate top-k
CPU_ONLY_OPS = {"lse_topk_fwd"}


def check(cond, what):
    print(f"  {'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        check.failed = True


check.failed = False


def main(so_path):
    import contrastive_kernels as ck
    from contrastive_kernels import _ext, reference

    print(f"cuda-build-check: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"GPU visible: {torch.cuda.is_available()}")
    _ext.load()
    loaded = sys.modules.get("contrastive_kernels._C")
    loaded_file = os.path.realpath(getattr(loaded, "__file__", "") or "")
    check(loaded_file == os.path.realpath(so_path), f"the package loads the CUDA build ({loaded_file})")
    info = _ext.build_info()
    print(f"  build_info: {info}")
    check(info.get("available") is True and info.get("cuda") == torch.version.cuda,
          f"build_info reports CUDA {info.get('cuda')}")
    check(_ext.has_cuda_kernels(), "has_cuda_kernels()")

    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("contrastive_kernels::"))
    check(len(ops) >= 6, f"{len(ops)} ops registered: {', '.join(o.split('::')[1] for o in ops)}")
    for op in ops:
        keys = ("CPU", "Meta") if op.split("::")[1] in CPU_ONLY_OPS else ("CPU", "CUDA", "Meta")
        missing = [key for key in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        check(not missing, f"{op}: {', '.join(keys)} kernels" + (f" (missing {missing})" if missing else ""))

    # The CPU half of a CUDA build computes as the CPU-only build does.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(33, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(33, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(517, 64, generator=gen, dtype=torch.float64)
    want = reference.info_nce(q, kp, queue, temperature=0.1, similarity="cosine")
    got = ck.info_nce(q, kp, queue, temperature=0.1, similarity="cosine", backend="cpu")
    want_g = torch.autograd.grad(want, (q, kp))
    got_g = torch.autograd.grad(got, (q, kp))
    err = max([(got - want).abs().item()] + [(a - b).abs().max().item() for a, b in zip(got_g, want_g)])
    check(err < 1e-9, f"info_nce backend='cpu' (fp64, queue) matches reference.py: max error {err:.1e}")
    bank = torch.randn(2000, 64, generator=gen)
    query = torch.randn(40, 64, generator=gen)
    want_t = reference.topk_similarity(query, bank, 50, similarity="l2")
    got_t = ck.topk_similarity(query, bank, 50, similarity="l2", backend="cpu")
    check(torch.equal(got_t.indices, want_t.indices)
          and torch.allclose(got_t.values, want_t.values, rtol=1e-5, atol=1e-5),
          "topk_similarity backend='cpu' (l2, k=50) matches reference.py")

    reason = ck.available_backends("cuda").get("cuda") if not torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        check(bool(reason), f"backend='cuda' without a GPU is unavailable, with a reason: {reason!r}")
    print("cuda-build-check: " + ("FAILED" if check.failed else "passed"))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
