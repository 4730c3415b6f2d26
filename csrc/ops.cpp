// The one schema set of the contrastive_kernels operator namespace (TORCH_LIBRARY: exactly one
// per namespace in a process; the Triton backend adds its `triton_*` ops from Python with a
// FRAGMENT), and the pybind11 module with build information. Implementations are registered per
// dispatch key next to their kernels: cpu/*.cpp (CPU) and cuda/*.cu (CUDA, when built).
// Autograd formulas and fake (meta) kernels are registered from Python (contrastive_kernels/_ext.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cpu/isa.h"
#include "ops_schema.h"

TORCH_LIBRARY(contrastive_kernels, m) { ck::define_ops(m); }

#define CK_STRINGIFY_(x) #x
#define CK_STRINGIFY(x) CK_STRINGIFY_(x)

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
#ifdef _OPENMP
  info["openmp"] = std::to_string(_OPENMP);
#else
  info["openmp"] = "no (at::parallel_for runs serially)";
#endif
  info["cpu_isa"] = std::string(ck::cpu::kernel_table()->name);
  info["cpu_isas_supported"] = std::string(ck::cpu::supported_isas());
#if defined(CK_X86_DISPATCH)
  info["cpu_isas_compiled"] = std::string("avx512,avx2,generic");
#else
  info["cpu_isas_compiled"] = std::string("generic");
#endif
#ifdef CK_WITH_CUDA
  info["cuda"] = std::string(CK_STRINGIFY(CK_CUDA_VERSION));
  info["cuda_archs"] = std::string(CK_STRINGIFY(CK_CUDA_ARCHS));
#else
  info["cuda"] = std::string("not built");
  info["cuda_archs"] = std::string("not built");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "contrastive_kernels compiled kernels: the ops live in torch.ops.contrastive_kernels";
  m.def("build_info", &build_info, "compiler, OpenMP, CPU instruction sets, CUDA build");
  m.def(
      "set_cpu_isa", [](const std::string& name) { return ck::cpu::set_isa(name.c_str()); },
      "Use the CPU kernels of one instruction set ('generic', 'avx2', 'avx512' or 'auto'); False if "
      "this CPU lacks it");
  m.def("cpu_isa", []() { return std::string(ck::cpu::kernel_table()->name); },
        "the instruction set the CPU kernels run with");
}
