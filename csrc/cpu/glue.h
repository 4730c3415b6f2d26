// Shared by the CPU glue files (topk.cpp, infonce.cpp): the packing of the queries in row groups
// and the merge of packed top-k keys.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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

// Sorts n int64 keys in decreasing order: an LSD radix sort over the 8 bytes of the key made
// unsigned and reversed (u = ~(key ^ sign bit): increasing u = decreasing key), all 8 byte
// histograms from one pass, bytes that every key shares skipped (the column's high bytes; most
// exponent bits of scores close together). Exact: keys are compared whole, as std::sort would.
// 3.4x faster than nth_element + sort for 1024 of 1481 keys (256 rows, Zen 4). `scratch`: 2n.
inline void sort_keys_descending(int64_t* keys, int64_t n, uint64_t* scratch) {
  constexpr uint64_t kSign = 0x8000000000000000ull;
  if (n < 64) {
    std::sort(keys, keys + n, std::greater<int64_t>());
    return;
  }
  uint64_t* src = scratch;
  uint64_t* dst = scratch + n;
  uint32_t count[8][256] = {};
  uint64_t all_and = ~0ull, all_or = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t u = ~(static_cast<uint64_t>(keys[i]) ^ kSign);
    src[i] = u;
    all_and &= u;
    all_or |= u;
    for (int b = 0; b < 8; ++b) ++count[b][(u >> (8 * b)) & 0xFF];
  }
  const uint64_t varying = all_and ^ all_or;
  for (int b = 0; b < 8; ++b) {
    const int shift = 8 * b;
    if (((varying >> shift) & 0xFF) == 0) continue;
    uint32_t start[256];
    uint32_t run = 0;
    for (int v = 0; v < 256; ++v) {
      start[v] = run;
      run += count[b][v];
    }
    for (int64_t i = 0; i < n; ++i) dst[start[(src[i] >> shift) & 0xFF]++] = src[i];
    std::swap(src, dst);
  }
  for (int64_t i = 0; i < n; ++i) keys[i] = static_cast<int64_t>(~src[i] ^ kSign);
}

// The n largest keys of each row over H candidate lists, sorted, as (values fp32, indices int64);
// -inf / -1 where a row holds fewer than n. `keys` (H, rows, width) int64 top-k keys (see
// pack_key in kernel_common.h: order = score, then the lower column); list h of row r holds its
// first min(counts[h][r], width) entries. Per row a radix sort (after a selection where more
// than 2n keys are listed), rows in parallel (a torch.topk over the padded rows sorted all
// H * width keys: 6 of the 39 ms of top-k at k = 1024, 256 x 65536).
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
    std::vector<uint64_t> scratch(4 * n);  // sort_keys_descending's 2m, m <= 2n (below)
    for (int64_t r = r0; r < r1; ++r) {
      row.clear();
      for (int64_t h = 0; h < H; ++h) {
        const int64_t* list = src + (h * rows + r) * width;
        row.insert(row.end(), list, list + std::min<int64_t>(std::max<int64_t>(cnt[h * rows + r], 0), width));
      }
      if (static_cast<int64_t>(row.size()) < n) row.resize(n, kEmptyKey);
      // a selection first where it discards most keys (H large: many threads' lists)
      int64_t m = static_cast<int64_t>(row.size());
      if (m > 2 * n) {
        std::nth_element(row.begin(), row.begin() + (n - 1), row.end(), std::greater<int64_t>());
        m = n;
      }
      sort_keys_descending(row.data(), m, scratch.data());
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
