// The interface between the torch glue (infonce.cpp, topk.cpp) and the kernels compiled once per
// instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp). Pure C++, no torch: the
// kernels see raw pointers and sizes, the glue checks tensors, allocates, threads and merges.
//
// Runtime dispatch: the package is compiled with portable flags (-O3, no -march); only the
// kernels of isa_avx2.cpp / isa_avx512.cpp are generated for AVX2+FMA+F16C / AVX-512 (via
// CK_TARGET_BEGIN below, as Highway does), and kernel_table() picks the widest set the running
// CPU supports (__builtin_cpu_supports, which also checks that the OS saves the wide registers).
// CK_CPU_ISA=generic|avx2|avx512 (environment) or set_isa() narrows the choice, e.g. to test the
// AVX2 path on an AVX-512 machine. A CPU without AVX2 (or a non-x86 one) runs the portable kernels.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#if defined(__GNUC__) || defined(__clang__)
#define CK_X86_DISPATCH 1
#endif
#endif

#if defined(__clang__)
#define CK_PRAGMA(x) _Pragma(#x)
#define CK_TARGET_BEGIN(t) CK_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define CK_TARGET_END CK_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define CK_PRAGMA(x) _Pragma(#x)
#define CK_TARGET_BEGIN(t) CK_PRAGMA(GCC push_options) CK_PRAGMA(GCC target(t))
#define CK_TARGET_END CK_PRAGMA(GCC pop_options)
#endif

namespace ck {
namespace cpu {

constexpr int kMaxGammas = 4;

// storage dtype of a key / bank matrix: kSame = the accumulation type itself
enum InDtype : int { kSame = 0, kHalf = 1, kBFloat16 = 2, kFloat = 3, kDouble = 4 };
enum Similarity : int { kDot = 0, kCosine = 1, kL2 = 2 };

// lse_stats (see contrastive_kernels/reference.py): l_ij = a_i b_j <q_i, k_j> + c_i + d_j.
// Arrays of length Bp (rows padded to the table's row group) are zero beyond B.
template <typename T>
struct LseArgs {
  int64_t B = 0, Bp = 0, N = 0, D = 0, Dp = 0;
  int G = 1;
  T gamma[kMaxGammas] = {};
  const T* qt = nullptr;      // Bp/RG x D x RG: Q in row groups, each transposed (pack_row_groups)
  const T* qrow = nullptr;    // Bp x Dp: Q row-major (backward, key-side gradients only)
  const void* k = nullptr;    // N x D, row-major, in k_dtype
  int k_dtype = kSame;
  const T* a = nullptr;       // Bp
  const T* c = nullptr;       // Bp or null
  const T* b = nullptr;       // N or null (= 1)
  const T* d = nullptr;       // N or null (= 0)
  const int64_t* exclude = nullptr;  // B x E, -1 = none
  int64_t E = 0;
  const int32_t* q_lab = nullptr;    // B, dense label ids (equality labels)
  const int32_t* k_lab = nullptr;    // N
  const int64_t* q_bits = nullptr;   // B x Wb bitsets (multi-hot labels)
  const int64_t* k_bits = nullptr;   // N x Wb
  int64_t Wb = 0;
  bool want_col = false;
  bool row_only = false;
  T* col_lse = nullptr;       // N (forward, want_col): written by the part that owns the column
  // forward, fp32 only (lse_topk_fwd): candidates of the row's hard negatives, every column with
  // !(<q_i, k_j> <= cand_thr[i]) on the raw dot, as packed top-k keys (pack_key)
  const T* cand_thr = nullptr;  // Bp (+inf on padding rows) or null
  int64_t cand_cap = 0;         // keys kept per row and part
  // backward
  const T* row_lse = nullptr;   // G x Bp
  const T* col_lse_in = nullptr;  // N or null
  const T* d_row = nullptr;     // G x Bp (already multiplied by gamma)
  const T* d_pos = nullptr;     // Bp or null
  const T* d_col = nullptr;     // N or null
  bool need_gkey = false, need_h = false, need_dc = false, need_dd = false;
  T* h = nullptr;   // N x D: sum_i G_ij a_i q_i (written by the owning part)
  T* dd = nullptr;  // N: sum_i G_ij

  bool has_labels() const { return q_lab != nullptr || q_bits != nullptr; }
};

// Private state of one column part (one thread's contiguous range of columns).
template <typename T>
struct LseWork {
  T* run_max = nullptr;   // G x Bp (forward)
  T* run_sum = nullptr;   // G x Bp (forward)
  T* pos_sum = nullptr;   // Bp (forward, labels)
  T* pos_cnt = nullptr;   // Bp (forward, labels)
  T* acc = nullptr;       // forward row-only: S x (Bp/RG x D x RG) with S = G (+1 with labels): E
                          // (and the positives' key sum); backward: Bp/RG x D x RG, g_key; each
                          // row group's D x RG block contiguous, as the queries (pack_row_groups)
  T* dc = nullptr;        // Bp (backward)
  T* scratch = nullptr;   // lse_scratch(D, Dp) elements
  int64_t* cand_keys = nullptr;   // B x cand_cap (forward, cand_thr): the part's candidates
  int64_t* cand_count = nullptr;  // B: candidates seen by the part (those past cand_cap dropped)
};

// top-k: packed int64 keys ((order-preserving fp32 bits) << 32 | (0xFFFFFFFF - column)), so that
// ties resolve to the lower column; one buffer of topk_capacity(k) keys per query row and part.
struct TopkArgs {
  int64_t M = 0, Mp = 0, N = 0, D = 0, k = 0;
  const float* qt = nullptr;      // Mp/RG x D x RG, fp32 (pack_row_groups)
  const float* qscale = nullptr;  // Mp: 1/|q_i| (cosine) or |q_i|^2 (l2), else null
  const void* bank = nullptr;     // N x D in bank_dtype
  int bank_dtype = kFloat;        // kFloat, kHalf, kBFloat16 or kDouble (scored in fp32)
  int sim = kDot;
  const int64_t* exclude = nullptr;  // M x E, -1 = none
  int64_t E = 0;
  const int64_t* q_lab = nullptr;    // M (exclude bank rows of the same label)
  const int64_t* b_lab = nullptr;    // N
};

// Candidate buffer length per query row: the k best so far plus room for k more, so that a
// selection of the k best runs once per k insertions (linear time) instead of a heap update each.
inline int64_t topk_capacity(int64_t k) { return 2 * k; }

struct TopkWork {
  int64_t* keys = nullptr;   // M x topk_capacity(k): the row's candidates, the k best among them
  int64_t* count = nullptr;  // M: keys held
  float* thr = nullptr;      // Mp: the part's current k-th score (NaN while not full)
  int64_t row0 = 0, row1 = 0;  // the part's padded query rows [row0, row1) (row-group multiples)
  float* scratch = nullptr;  // topk_scratch(D) elements
};

// mixed_lse, fp32 (mixing_kernel.h): MoCHi's synthetic logits reduced per query row, the points
// never stored. Points t < S mix two hard rows, t >= S the row of mq with one (see mixing.cpp).
struct MixLseArgs {
  int64_t B = 0, D = 0, H = 0, S = 0, SQ = 0;
  int G = 1;
  float gamma[kMaxGammas] = {};
  const float* q = nullptr;        // B x D: the rows the points are dotted with
  const float* mq = nullptr;       // B x D: mix_query, the rows query-mix points take
  const float* neg = nullptr;      // rows x D: the negatives (queue)
  const int64_t* hard = nullptr;   // B x H: the row's hard negatives (rows of neg)
  const int64_t* pair = nullptr;   // B x S x 2: positions into the row's hard list
  const float* alpha = nullptr;    // B x S
  const int64_t* qidx = nullptr;   // B x SQ: positions into the row's hard list
  const float* qw = nullptr;       // B x SQ
  const float* a = nullptr;        // B: row_scale
  const float* c = nullptr;        // B: row_bias
  float* lse = nullptr;            // G x B
  float* e_sum = nullptr;          // G x B x D, zero on entry
  float* u_sum = nullptr;          // G x B
};

// points per block of mixed_lse; its scratch is kMixBlock x D floats per thread
constexpr int kMixBlock = 16;

struct KernelTable {
  const char* name;
  int row_group_f32;  // rows per microkernel panel (the padding unit of Bp / Mp)
  int row_group_f64;
  int vec_f32;        // lanes (the padding unit of Dp)
  int vec_f64;
  int64_t (*lse_scratch_f32)(int64_t D, int64_t Dp);
  int64_t (*lse_scratch_f64)(int64_t D, int64_t Dp);
  int64_t (*topk_scratch)(int64_t D);
  void (*lse_fwd_f32)(const LseArgs<float>&, const LseWork<float>&, int64_t c0, int64_t c1);
  void (*lse_bwd_f32)(const LseArgs<float>&, const LseWork<float>&, int64_t c0, int64_t c1);
  void (*lse_fwd_f64)(const LseArgs<double>&, const LseWork<double>&, int64_t c0, int64_t c1);
  void (*lse_bwd_f64)(const LseArgs<double>&, const LseWork<double>&, int64_t c0, int64_t c1);
  void (*topk)(const TopkArgs&, const TopkWork&, int64_t c0, int64_t c1);
  int64_t col_align;  // column parts start at multiples of this (the f32 column tile)
  void (*mixed_lse_f32)(const MixLseArgs&, float* scratch, int64_t i0, int64_t i1);
  // the FMA peak probe (peak_kernel.h): `steps` steps of fma_flops_per_step fp32 FLOPs each
  float (*fma_probe_f32)(int64_t steps);
  int64_t fma_flops_per_step;
};

namespace generic { const KernelTable* kernel_table(); }
#if defined(CK_X86_DISPATCH)
namespace avx2 { const KernelTable* kernel_table(); }
namespace avx512 { const KernelTable* kernel_table(); }
#endif

// The table for this CPU (and CK_CPU_ISA / set_isa); never null.
const KernelTable* kernel_table();
// Narrow (or widen back, up to what the CPU supports) the instruction set: "generic", "avx2",
// "avx512" or "auto". Returns false if the name is unknown or the CPU lacks it.
bool set_isa(const char* name);
// What the CPU supports, e.g. "avx512,avx2,generic".
const char* supported_isas();

}  // namespace cpu
}  // namespace ck
