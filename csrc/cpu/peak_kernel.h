// The arithmetic peak of one core for the kernels of this instruction set: a loop of fp32 fused
// multiply-adds on C independent accumulator chains, so that the FMA units never wait on a
// result (C >= latency x FMA pipes: 4 x 2 on current x86 cores). Each step is C x W FMAs, i.e.
// 2 C W FLOPs. The bench records it next to torch.mm's rate: torch's BLAS may not use the widest
// units (MKL runs its AVX2 code on AMD CPUs), so "% of torch.mm" alone can exceed 100 %.
// Included inside the per-ISA namespace (see vec.h), after vec.h.

constexpr int kFmaChains = 12;

template <typename V>
float fma_probe(int64_t steps) {
  using R = typename V::R;
  R acc[kFmaChains];
  const R b = V::set1(0.999f), c = V::set1(1e-3f);
  for (int i = 0; i < kFmaChains; ++i) acc[i] = V::set1(static_cast<float>(i));
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 12
    for (int i = 0; i < kFmaChains; ++i) acc[i] = V::fmadd(acc[i], b, c);
  }
  // returned so that the loop cannot be dropped: each chain tends to 1e-3 / (1 - 0.999) = 1, so
  // after a few thousand steps the result is kFmaChains (a check that the loop ran)
  R sum = acc[0];
  for (int i = 1; i < kFmaChains; ++i) sum = V::add(sum, acc[i]);
  return V::hsum(sum) / static_cast<float>(V::W);
}
