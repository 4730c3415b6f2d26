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

TORCH_LIBRARY(contrastive_kernels, m) {
  // lse_stats forward (reference.lse_stats): -> (row_lse (G,B), pos_sum (B,), pos_count (B,),
  // col_lse (N,) or (0,), e_key (G,B,D) or (0,), p_key (B,D) or (0,)). With row_only, e_key[g,i] =
  // sum_j softmax_j(gamma_g l_ij) b_j k_j and p_key[i] = sum_{j pos} b_j k_j (backward is then O(BD)).
  m.def(
      "lse_fwd(Tensor q, Tensor k, Tensor row_scale, Tensor? col_scale, Tensor? row_bias, Tensor? col_bias, "
      "float[] gammas, Tensor? exclude, Tensor? q_labels, Tensor? k_labels, bool want_col_lse, bool row_only) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // lse_stats backward by recomputation: -> (g_key (B,D) = sum_j G_ij b_j k_j, h (N,D) =
  // sum_i G_ij a_i q_i, dc (B,) = sum_j G_ij, dd (N,) = sum_i G_ij), each (0,) unless asked for.
  m.def(
      "lse_bwd(Tensor q, Tensor k, Tensor row_scale, Tensor? col_scale, Tensor? row_bias, Tensor? col_bias, "
      "float[] gammas, Tensor? exclude, Tensor? q_labels, Tensor? k_labels, Tensor row_lse, Tensor col_lse, "
      "Tensor d_row, Tensor? d_pos, Tensor? d_col, bool need_g_key, bool need_h, bool need_dc, bool need_dd) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // exact top-k: -> (values fp32 (M,k), indices int64 (M,k)); ties to the lower index.
  m.def(
      "topk(Tensor query, Tensor bank, int k, str similarity, Tensor? exclude_index, Tensor? query_labels, "
      "Tensor? bank_labels) -> (Tensor, Tensor)");
  // hard-negative mixing with given draws (reference.mix_points): -> (B, s+s', D)
  m.def(
      "mix(Tensor query, Tensor negatives, Tensor hard_index, Tensor pair_index, Tensor alpha, "
      "Tensor query_index, Tensor query_weight) -> Tensor");
  // u_it = <q_i, h_it> for the mixed points h = mix(mix_query, ...), never stored: -> (B, s+s')
  m.def(
      "mixed_dots(Tensor q, Tensor mix_query, Tensor negatives, Tensor hard_index, Tensor pair_index, "
      "Tensor alpha, Tensor query_index, Tensor query_weight) -> Tensor");
  // its backward: dq_i = sum_t grad_it h_it -> (B, D) in the accumulation dtype
  m.def(
      "mixed_dots_bwd(Tensor grad, Tensor mix_query, Tensor negatives, Tensor hard_index, Tensor pair_index, "
      "Tensor alpha, Tensor query_index, Tensor query_weight) -> Tensor");
}

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
