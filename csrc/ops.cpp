// The one schema set of the contrastive_kernels operator namespace (TORCH_LIBRARY: exactly one
// per namespace in a process; the Triton backend adds its `triton_*` ops from Python with a
// FRAGMENT), and the pybind11 module with build information. Implementations are registered per
// dispatch key next to their kernels: cpu/*.cpp (CPU) and cuda/*.cu (CUDA, when built).
// Autograd formulas and fake (meta) kernels are registered from Python (contrastive_kernels/_ext.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
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

// The fp32 FMA peak of the CPU kernels' instruction set (csrc/cpu/peak_kernel.h): calibrated on one
// thread to about `seconds`, then run on every torch intra-op thread at once (as the kernels run).
py::dict cpu_fma_peak(double seconds) {
  TORCH_CHECK(seconds > 0 && seconds <= 60, "cpu_fma_peak: seconds must be in (0, 60], got ", seconds);
  const ck::cpu::KernelTable* table = ck::cpu::kernel_table();
  using clock = std::chrono::steady_clock;
  auto elapsed = [](clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  py::gil_scoped_release no_gil;
  int64_t steps = 1 << 12;
  double one = 0;
  float check_one = 0;
  for (;;) {  // double the run until it takes a quarter of the time asked for
    const auto t0 = clock::now();
    check_one = table->fma_probe_f32(steps);
    one = elapsed(t0);
    if (one >= seconds / 4 || steps >= (int64_t(1) << 40)) break;
    steps *= 2;
  }
  const double one_rate = static_cast<double>(steps) * table->fma_flops_per_step / std::max(one, 1e-9);
  steps = std::max<int64_t>(steps, static_cast<int64_t>(steps * (seconds / 2) / std::max(one, 1e-9)));
  const int threads = at::get_num_threads();
  std::atomic<double> check_sum{0};
  const auto t0 = clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double r = table->fma_probe_f32(steps);
      double cur = check_sum.load();
      while (!check_sum.compare_exchange_weak(cur, cur + r)) {
      }
    }
  });
  const double wall = elapsed(t0);
  const double flops = static_cast<double>(steps) * static_cast<double>(table->fma_flops_per_step);
  py::gil_scoped_acquire gil;
  py::dict out;
  out["isa"] = std::string(table->name);
  out["threads"] = threads;
  out["gflops"] = threads * flops / wall / 1e9;
  out["gflops_one_thread"] = one_rate / 1e9;
  out["check"] = check_sum.load() / threads;
  out["check_one_thread"] = check_one;
  return out;
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
  m.def("cpu_fma_peak", &cpu_fma_peak, py::arg("seconds") = 0.5,
        "fp32 FMA GFLOP/s of the CPU kernels' instruction set on all torch threads at once");
}
