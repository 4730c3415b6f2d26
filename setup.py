"""Build script. The pure-Python package needs nothing here; csrc/ (the C++ CPU and CUDA kernels)
is compiled into ``contrastive_kernels._C`` by torch.utils.cpp_extension (ninja when installed)
when torch and a C++ compiler are present at build time (install with --no-build-isolation, so
that the installed torch is the one compiled against).

Environment:
  CK_BUILD_EXT=0      skip the extension (pure-Python install; backend "cpu"/"cuda" then report why)
  CK_BUILD_EXT=1      the extension is required: a failed build fails the install
  (unset)             build it if possible; a failure is reported and the install goes on
  CK_BUILD_CUDA=0     CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default: the visible GPU's, else 8.0 and 9.0a)
  MAX_JOBS            parallel compile jobs (ninja)

CUDA kernels are compiled only when torch was built with CUDA (torch.version.cuda) and CUDA_HOME
(nvcc) is found. The portable CPU build uses no -march flag: AVX2 and AVX-512 kernels are compiled
per function (csrc/cpu/isa_*.cpp) and chosen at run time (csrc/cpu/dispatch.cpp), so a wheel built
on one x86 machine runs on any other.
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("CK_BUILD_EXT", "")


def _say(msg):
    print(f"contrastive_kernels setup: {msg}", file=sys.stderr)


def _extension():
    """(ext_modules, cmdclass) for the csrc extension, or ([], {}) with a message why not."""
    if MODE == "0":
        _say("CK_BUILD_EXT=0: not building the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if MODE == "1":
            raise
        _say(f"torch is not importable at build time ({exc}); not building the C++ extension "
             "(install with --no-build-isolation to build it)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        if MODE == "1":
            raise RuntimeError(f"CK_BUILD_EXT=1 but no C++ compiler ({cxx}) was found")
        _say(f"no C++ compiler ({cxx}) found; not building the C++ extension "
             "(backend='cpu' will be unavailable, 'auto' uses 'chunked')")
        return [], {}

    sys.path.insert(0, os.path.join(ROOT, "contrastive_kernels"))
    try:
        from _build import extension_kwargs  # the same sources and flags as the JIT path
    finally:
        sys.path.pop(0)
    with_cuda = (os.environ.get("CK_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    kwargs = extension_kwargs(ROOT, with_cuda)
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = ext_cls("contrastive_kernels._C", **kwargs)
    _say(f"building contrastive_kernels._C ({'C++ + CUDA' if with_cuda else 'C++ only'}, "
         f"{len(kwargs['sources'])} sources)")

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """Optional unless CK_BUILD_EXT=1: a failed build leaves the pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - reported, then the install continues
                if MODE == "1":
                    raise
                _say(f"building the C++ extension failed ({type(exc).__name__}: {exc}); installing "
                     "without it (backend='cpu'/'cuda' unavailable; set CK_BUILD_EXT=1 to make "
                     "this fatal)")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
