"""The CUDA emulator build (csrc/emu): csrc/cuda's glue and kernels compiled as C++ and run on the
host, its ops torch.ops.contrastive_kernels_cuda_emu.* on CPU tensors. Built once per checkout
into build/cuda_emu (ninja rebuilds only what changed; about 25 s from scratch on 2 cores).

``activate(monkeypatch)`` points the compiled backends' Python layer (_csrc_backend, shared by
backend="cpu" and "cuda") at the emulated ops, with the CUDA backend's own rules (its feature-dim
and k limits, past which it falls back to chunked), so that backend="cpu" on CPU tensors runs
exactly the code backend="cuda" runs on a GPU: tests/test_gpu_cuda.py's suite, without a GPU."""
from __future__ import annotations

import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMESPACE = "contrastive_kernels_cuda_emu"
_state = {"ops": None, "error": None}


def unavailable_reason():
    """None when the emulator can be built here (a C++ compiler, ninja and the CPU extension, whose
    backend the emulated ops stand in for), else why not."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed"
    from contrastive_kernels import _ext

    why = _ext.unavailable_reason()
    if why is not None:
        return f"the compiled extension is unavailable ({why})"
    return _state["error"]


def ops():
    """torch.ops.contrastive_kernels_cuda_emu, building the emulator on first use."""
    if _state["ops"] is None:
        sys.path.insert(0, os.path.join(ROOT, "contrastive_kernels"))
        try:
            from _build import emulator_kwargs
        finally:
            sys.path.pop(0)
        from torch.utils import cpp_extension

        from contrastive_kernels import _ext

        build = os.path.join(ROOT, "build", "cuda_emu")
        os.makedirs(build, exist_ok=True)
        try:
            cpp_extension.load(name="ck_cuda_emu", build_directory=build, is_python_module=False,
                               verbose=bool(os.environ.get("CK_EMU_VERBOSE")), **emulator_kwargs(ROOT))
        except Exception as exc:  # noqa: BLE001
            _state["error"] = f"the emulator build failed: {exc}"
            raise
        _ext.register_python_parts(NAMESPACE)
        _state["ops"] = getattr(torch.ops, NAMESPACE)
    return _state["ops"]


def activate(monkeypatch):
    """Route backend="cpu" (CPU tensors) through the emulated CUDA ops for one test, with the
    family ops the cuda backend has (not the CPU-only lse_stats_topk)."""
    from contrastive_kernels import _csrc_backend, cpu_backend, cuda_backend

    ops()
    monkeypatch.setattr(_csrc_backend, "OPS_NAMESPACE", NAMESPACE)
    monkeypatch.setattr(_csrc_backend, "_on_cuda_kernels", lambda t: t.device.type == "cpu")
    for name in ("lse_stats_topk",):
        if not hasattr(cuda_backend, name):
            monkeypatch.delattr(cpu_backend, name)
