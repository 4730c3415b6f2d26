// Scalar helpers shared by the kernels of every instruction set. Included inside the per-ISA
// namespace (see vec.h); pure C++.

CK_SCALAR_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

CK_SCALAR_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

CK_SCALAR_INLINE float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN).
CK_SCALAR_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: renormalize
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    man &= 0x3FFu;
    return bits_to_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (man << 13));
  }
  return bits_to_float(sign | ((exp + (127 - 15)) << 23) | (man << 13));
}

// Top-k keys: signed int64 whose order is (score, then the lower column). The fp32 bits are
// mapped to an int32 whose signed order equals the float order (negative floats have their
// magnitude bits flipped), placed in the high word; the low word is 0xFFFFFFFF - column. Every
// NaN (either sign: inf - inf is -nan on x86) becomes +nan, above +inf, as torch.sort ranks it.
CK_SCALAR_INLINE int64_t pack_key(float score, int64_t column) {
  int32_t bits = score != score ? 0x7FC00000 : static_cast<int32_t>(float_to_bits(score + 0.0f));  // -0.0 -> +0.0
  int32_t ordered = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<uint32_t>(ordered)) << 32 |
                              (0xFFFFFFFFull - static_cast<uint64_t>(column)));
}

CK_SCALAR_INLINE float key_score(int64_t key) {
  int32_t ordered = static_cast<int32_t>(key >> 32);
  int32_t bits = ordered >= 0 ? ordered : (ordered ^ 0x7FFFFFFF);
  return bits_to_float(static_cast<uint32_t>(bits));
}

template <typename T>
CK_SCALAR_INLINE T ck_min(T a, T b) { return b < a ? b : a; }
template <typename T>
CK_SCALAR_INLINE T ck_max(T a, T b) { return a < b ? b : a; }

CK_SCALAR_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
