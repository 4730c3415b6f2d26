// SIMD traits for the CPU kernels. Pure C++ (no torch): this file is included INSIDE the
// per-ISA namespace of an instantiation translation unit (isa_avx512.cpp, isa_avx2.cpp,
// isa_generic.cpp), after that unit has switched the code generation target with
// CK_TARGET_BEGIN (see isa.h). Exactly one of CK_VEC_AVX512 / CK_VEC_AVX2 / CK_VEC_GENERIC is
// defined by the including unit; the system headers (<immintrin.h>, <cmath>, <cstdint>) are
// included there, before the target switch, so no library code is compiled for a wider ISA.
//
// Each traits class V exposes the vector register type R (W lanes of T), its mask type, the
// handful of operations the kernels use, and the register-blocking constants of the
// microkernels (MV vectors x NR broadcasts for the row-vectorized GEMM, MJ broadcasts x NDV
// vectors for the column-vectorized GEMM), chosen so that accumulators + operands fit the
// register file (32 zmm with AVX-512, 16 ymm with AVX2).
//
// exp(x), fp32: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, with ln2 split in a
// short high part (exact products n*ln2_hi) and a low correction; e^r by the degree-7 Taylor
// polynomial in Horner form (coefficients 1/i!, truncation error r^8/8! < 3e-8 relative on
// |r| <= 0.347, i.e. <= 1 ulp after rounding); 2^n assembled in the exponent field. Inputs
// below ln(FLT_MIN) give exactly 0 (so exp(-inf) = 0, which masked logits rely on), inputs
// above 127.5 ln2 give +inf, NaN stays NaN. The kernels only evaluate exp at arguments <= 0
// (logits minus their running maximum or their log-sum-exp) up to rounding.



constexpr float kExpLo = -87.33654475f;    // ln(FLT_MIN): below, e^x is subnormal -> 0
constexpr float kExpHi = 88.37626266f;     // 127.5 ln2: above, 2^n would overflow -> +inf
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;     // 8 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi

#if defined(CK_VEC_AVX512)

struct VecF {
  using T = float;
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr int MV = 2, NR = 12;   // row-vectorized microkernel: 24 accumulators
  static constexpr int MJ = 6, NDV = 4;   // column-vectorized microkernel: 24 accumulators
  static constexpr const char* name = "avx512";

  static CK_INLINE R load(const T* p) { return _mm512_loadu_ps(p); }
  static CK_INLINE void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static CK_INLINE R set1(T x) { return _mm512_set1_ps(x); }
  static CK_INLINE R zero() { return _mm512_setzero_ps(); }
  static CK_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  static CK_INLINE R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static CK_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static CK_INLINE R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  // max(a, b) returns b when either is NaN (x86 semantics); callers order operands for that
  static CK_INLINE R max(R a, R b) { return _mm512_max_ps(a, b); }
  static CK_INLINE R min(R a, R b) { return _mm512_min_ps(a, b); }
  static CK_INLINE M gt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static CK_INLINE M lt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static CK_INLINE M eq(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static CK_INLINE M ne(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static CK_INLINE M not_le(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ); }  // !(a <= b): NaN passes
  static CK_INLINE R select(M m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
  static CK_INLINE bool any(M m) { return m != 0; }
  static CK_INLINE unsigned bits(M m) { return static_cast<unsigned>(m); }
  static CK_INLINE T hmax(R v) { return _mm512_reduce_max_ps(v); }
  static CK_INLINE T hsum(R v) { return _mm512_reduce_add_ps(v); }

  static CK_INLINE R exp(R x) {
    const R lo = set1(kExpLo), hi = set1(kExpHi);
    R xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // NaN in x survives (second operand)
    R n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    R p = set1(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, set1(0.5f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    R y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, zero());
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), y, set1(__builtin_inff()));
    return y;
  }

  // n elements of fp16 / bf16 (as raw 16-bit words) -> fp32
  static CK_INLINE void from_half(const uint16_t* src, T* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
  }
  static CK_INLINE void from_bf16(const uint16_t* src, T* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
  }
};

#elif defined(CK_VEC_AVX2)

struct VecF {
  using T = float;
  using R = __m256;
  using M = __m256;  // all-ones / all-zeros lanes
  static constexpr int W = 8;
  static constexpr int MV = 2, NR = 6;    // 12 accumulators + 2 operands + 1 broadcast <= 16 ymm
  static constexpr int MJ = 6, NDV = 2;   // 12 accumulators
  static constexpr const char* name = "avx2";

  static CK_INLINE R load(const T* p) { return _mm256_loadu_ps(p); }
  static CK_INLINE void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static CK_INLINE R set1(T x) { return _mm256_set1_ps(x); }
  static CK_INLINE R zero() { return _mm256_setzero_ps(); }
  static CK_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static CK_INLINE R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static CK_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static CK_INLINE R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static CK_INLINE R max(R a, R b) { return _mm256_max_ps(a, b); }
  static CK_INLINE R min(R a, R b) { return _mm256_min_ps(a, b); }
  static CK_INLINE M gt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static CK_INLINE M lt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static CK_INLINE M eq(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static CK_INLINE M ne(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  static CK_INLINE M not_le(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_NLE_UQ); }
  static CK_INLINE R select(M m, R a, R b) { return _mm256_blendv_ps(b, a, m); }
  static CK_INLINE bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static CK_INLINE unsigned bits(M m) { return static_cast<unsigned>(_mm256_movemask_ps(m)); }
  static CK_INLINE T hmax(R v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static CK_INLINE T hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }

  static CK_INLINE R exp(R x) {
    const R lo = set1(kExpLo), hi = set1(kExpHi);
    R xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
    R n = _mm256_round_ps(_mm256_mul_ps(xc, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    R p = set1(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, set1(0.5f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    R y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, zero(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, set1(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return y;
  }

  static CK_INLINE void from_half(const uint16_t* src, T* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
  }
  static CK_INLINE void from_bf16(const uint16_t* src, T* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
  }
};

#endif  // ISA-specific float vectors

// One-lane "vector" of float or double: the portable path (any compiler, any CPU) and the fp64
// path of every ISA. exp and the comparisons are the C++ library's, so fp64 results are exact to
// the last bits the tests demand.
template <typename TT>
struct Scalar {
  using T = TT;
  using R = TT;
  using M = bool;
  static constexpr int W = 1;
  static constexpr int MV = 4, NR = 4;
  static constexpr int MJ = 4, NDV = 4;
  static constexpr const char* name = "scalar";

  static CK_INLINE R load(const T* p) { return *p; }
  static CK_INLINE void store(T* p, R v) { *p = v; }
  static CK_INLINE R set1(T x) { return x; }
  static CK_INLINE R zero() { return T(0); }
  static CK_INLINE R add(R a, R b) { return a + b; }
  static CK_INLINE R sub(R a, R b) { return a - b; }
  static CK_INLINE R mul(R a, R b) { return a * b; }
  static CK_INLINE R fmadd(R a, R b, R c) { return a * b + c; }
  static CK_INLINE R max(R a, R b) { return (a > b) ? a : b; }  // NaN in either: b, as on x86
  static CK_INLINE R min(R a, R b) { return (a < b) ? a : b; }
  static CK_INLINE M gt(R a, R b) { return a > b; }
  static CK_INLINE M lt(R a, R b) { return a < b; }
  static CK_INLINE M eq(R a, R b) { return a == b; }
  static CK_INLINE M ne(R a, R b) { return !(a == b); }
  static CK_INLINE M not_le(R a, R b) { return !(a <= b); }
  static CK_INLINE R select(M m, R a, R b) { return m ? a : b; }
  static CK_INLINE bool any(M m) { return m; }
  static CK_INLINE unsigned bits(M m) { return m ? 1u : 0u; }
  static CK_INLINE T hmax(R v) { return v; }
  static CK_INLINE T hsum(R v) { return v; }
  static CK_INLINE R exp(R x) { return std::exp(x); }
  static CK_INLINE void from_half(const uint16_t* src, T* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_bits_to_float(src[i]));
  }
  static CK_INLINE void from_bf16(const uint16_t* src, T* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_bits_to_float(src[i]));
  }
};
