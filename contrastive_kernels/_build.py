"""Sources and compiler flags of the csrc extension, shared by setup.py (ahead-of-time build)
and _ext.py (JIT build with torch.utils.cpp_extension.load). Imports nothing from the package,
so setup.py can load it before the package is installed."""
from __future__ import annotations

import glob
import os
import platform
import sys


def csrc_dir(root: str) -> str:
    return os.path.join(root, "csrc")


def sources(root: str, with_cuda: bool):
    src = csrc_dir(root)
    files = sorted(glob.glob(os.path.join(src, "*.cpp")) + glob.glob(os.path.join(src, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(src, "cuda", "*.cu")))
        # the device-code-only instantiation units of `make cuda-check` are not part of the build
        files = [f for f in files if not os.path.basename(f).startswith("check_")]
    return files


def cxx_flags():
    flags = ["-O3"]  # the C++ standard is cpp_extension's choice for this torch
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64", "aarch64", "ppc64le"):
        flags.append("-fopenmp")  # at::parallel_for's OpenMP backend is inline in the torch headers
    return flags


def nvcc_flags():
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def cuda_arch_token() -> str:
    """The CUDA architectures of this build as one preprocessor token (e.g. sm80_sm90a)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{a}.{b}" for a, b in caps)
    parts = [p for p in archs.replace(" ", ";").split(";") if p]
    return "_".join("sm" + p.replace(".", "").replace("+PTX", "ptx") for p in parts) or "default"


def cuda_library_include_dirs():
    """Include folders for the CUDA library headers that ATen's CUDA headers include (cusparse.h,
    cublas_v2.h, cusolverDn.h), when the toolkit at CUDA_HOME lacks them (a compiler-only
    install): those of the NVIDIA wheels that a CUDA torch from PyPI depends on
    (site-packages/nvidia/*/include). Empty when the toolkit has them, so its own headers win."""
    import sysconfig

    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "include", "cusparse.h")):
        return []
    site = sysconfig.get_paths()["purelib"]
    return [d for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
            if os.path.exists(os.path.join(d, "cusparse.h"))]


def extension_kwargs(root: str, with_cuda: bool):
    """Keyword arguments of CppExtension / CUDAExtension (and, without `sources`-level changes,
    of torch.utils.cpp_extension.load). Macros carry no strings (quoting differs between ninja's
    shell and setuptools' argv): build_info stringifies tokens."""
    cxx = cxx_flags()
    nvcc = []
    if with_cuda:
        import torch

        version = (torch.version.cuda or "0").replace(".", "_")
        defines = ["-DCK_WITH_CUDA", f"-DCK_CUDA_ARCHS={cuda_arch_token()}", f"-DCK_CUDA_VERSION=cuda{version}"]
        cxx = cxx + defines
        nvcc = nvcc_flags() + defines
    ldflags = ["-fopenmp"] if "-fopenmp" in cxx else []
    include_dirs = [csrc_dir(root)] + (cuda_library_include_dirs() if with_cuda else [])
    return dict(sources=sources(root, with_cuda), include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else cxx,
                extra_link_args=ldflags)


def emulator_kwargs(root: str):
    """Keyword arguments of torch.utils.cpp_extension.load for the CUDA emulator build (tests
    only): csrc/cuda's glue and kernels compiled as C++ against the shims of csrc/emu, whose
    ops are torch.ops.contrastive_kernels_cuda_emu on host tensors. csrc/emu comes first on the
    include path so that its cuda_runtime.h / ATen/cuda/CUDAContext.h shadow the real ones."""
    src = csrc_dir(root)
    return dict(sources=sorted(glob.glob(os.path.join(src, "emu", "*.cpp"))),
                extra_include_paths=[os.path.join(src, "emu"), src],
                extra_cflags=["-O2", "-DCK_CUDA_EMU", "-ffp-contract=off"])
