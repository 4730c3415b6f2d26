// Shared by the CPU glue files (topk.cpp, infonce.cpp): the packing of the queries in row groups
// and the merge of packed top-k keys.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace ck {
namespace cpu_glue {

// Q (rows x D) packed for the row-vectorized score microkernel: zero-padded to `padded` rows
// (a multiple of rg), then per group of rg rows its transpose, D x rg, contiguous:
// out[g][d][lane] = Q[g*rg + lane][d]. One group's panel is one block (8 KB at D = 128, rg = 16):
// a plain D x padded Q^T puts the panel's D rows `padded` floats apart, a power-of-two stride
// that maps them to a few L1 sets, so they evicted each other (AVX2, B = 256: 1 KB apart, four
// sets for 128 lines).
inline at::Tensor pack_row_groups(const at::Tensor& q, int64_t padded, int64_t rg) {
  const int64_t rows = q.size(0), D = q.size(1);
  at::Tensor qp = at::zeros({padded, D}, q.options());
  qp.narrow(0, 0, rows).copy_(q);
  return qp.view({padded / rg, rg, D}).transpose(1, 2).contiguous();
}

// The inverse layout for per-row outputs the kernels accumulate in row groups (the key sums):
// t (..., padded/rg, D, rg) -> (..., padded, D).
inline at::Tensor unpack_row_groups(const at::Tensor& t) {
  const int64_t n = t.dim();
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 3);
  shape.push_back(t.size(n - 3) * t.size(n - 1));
  shape.push_back(t.size(n - 2));
  return t.transpose(n - 2, n - 1).reshape(shape);
}

constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::min();

// The n largest keys of each row over H candidate lists, sorted, as (values fp32, indices int64);
// -inf / -1 where a row holds fewer than n. `keys` (H, rows, width) int64 top-k keys (see
// pack_key in kernel_common.h: order = score, then the lower column); list h of row r holds its
// first min(counts[h][r], width) entries. Per row one selection and a sort of the n survivors,
// rows in parallel (a torch.topk over the padded rows sorted all H * width keys: 6 of the 39 ms
// of top-k at k = 1024, 256 x 65536).
inline std::tuple<at::Tensor, at::Tensor> best_keys(const at::Tensor& keys, const at::Tensor& counts, int64_t n) {
  TORCH_CHECK(keys.dim() == 3 && keys.scalar_type() == at::kLong && counts.scalar_type() == at::kLong &&
                  counts.dim() == 2 && counts.size(0) == keys.size(0) && counts.size(1) == keys.size(1) && n >= 0,
              "best_keys: bad input");
  const at::Tensor kc = keys.contiguous(), cc = counts.contiguous();
  const int64_t H = kc.size(0), rows = kc.size(1), width = kc.size(2);
  at::Tensor values = at::empty({rows, n}, kc.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({rows, n}, kc.options());
  if (n == 0 || rows == 0) return {values, indices};
  const int64_t* src = kc.data_ptr<int64_t>();
  const int64_t* cnt = cc.data_ptr<int64_t>();
  float* vout = values.data_ptr<float>();
  int64_t* iout = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> row;
    row.reserve(H * width + n);
    for (int64_t r = r0; r < r1; ++r) {
      row.clear();
      for (int64_t h = 0; h < H; ++h) {
        const int64_t* list = src + (h * rows + r) * width;
        row.insert(row.end(), list, list + std::min<int64_t>(std::max<int64_t>(cnt[h * rows + r], 0), width));
      }
      if (static_cast<int64_t>(row.size()) < n) row.resize(n, kEmptyKey);
      std::nth_element(row.begin(), row.begin() + (n - 1), row.end(), std::greater<int64_t>());
      std::sort(row.begin(), row.begin() + n, std::greater<int64_t>());
      for (int64_t e = 0; e < n; ++e) {
        const int64_t key = row[e];
        if (key == kEmptyKey) {
          vout[r * n + e] = -std::numeric_limits<float>::infinity();
          iout[r * n + e] = -1;
          continue;
        }
        // inverse of pack_key: the order-preserving int32 back to fp32 bits, the low word to the column
        const int32_t ordered = static_cast<int32_t>(key >> 32);
        const uint32_t bits = static_cast<uint32_t>(ordered >= 0 ? ordered : (ordered ^ 0x7FFFFFFF));
        std::memcpy(vout + r * n + e, &bits, sizeof bits);
        iout[r * n + e] = static_cast<int64_t>(0xFFFFFFFFull - (static_cast<uint64_t>(key) & 0xFFFFFFFFull));
      }
    }
  });
  return {values, indices};
}

}  // namespace cpu_glue
}  // namespace ck
