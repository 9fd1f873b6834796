// Helpers shared by the AVX2 kernels (x86-64 with AVX2 + FMA + F16C, no AVX-512):
// 8-lane fp32 vectors, bf16 widening and rounding, and partial-vector loads/stores
// (AVX2 has no byte/word masks, so a tail goes through a small zero-padded buffer;
// the arithmetic on it is the same as on a full vector).
#pragma once
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace yun2 {

// 8 bf16 values (16 bytes, unaligned) widened to 8 fp32 lanes (a bf16 is the top half).
inline __m256 widen8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to the nearest bfloat16 (ties to even), as torch's float -> bfloat16; NaN -> qNaN.
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i all ones where i < n (n clipped to 0..8): for _mm256_maskload/maskstore_ps.
inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int c = static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), idx);
}

// Round every lane to the nearest bfloat16 (ties to even), keeping it a float; NaN stays NaN.
inline __m256 round_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_set1_ps(NAN), nan);
}

// 8 floats that are already bf16 values (low halves zero) -> 8 packed bf16.
inline __m128i narrow8(__m256 rounded) {
  const __m256i s = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// n (0..8) values from p + i as fp32 lanes, zeros beyond n.
template <bool BF16>
inline __m256 load(const void* p, int64_t i, int64_t n) {
  if constexpr (BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + i;
    if (n >= 8) return widen8(s);
    alignas(16) uint16_t buf[8] = {};
    std::memcpy(buf, s, n * 2);
    return widen8(buf);
  } else {
    const float* s = static_cast<const float*>(p) + i;
    return n >= 8 ? _mm256_loadu_ps(s) : _mm256_maskload_ps(s, lane_mask(n));
  }
}

// What torch stores for a float result in a tensor of this dtype.
template <bool BF16>
inline __m256 R(__m256 v) {
  if constexpr (BF16) return round_bf16(v);
  else return v;
}

// The first n (0..8) lanes of v to p + i, rounded to bf16 for a bf16 tensor.
template <bool BF16>
inline void store(void* p, int64_t i, __m256 v, int64_t n) {
  if constexpr (BF16) {
    uint16_t* d = static_cast<uint16_t*>(p) + i;
    const __m128i h = narrow8(round_bf16(v));
    if (n >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), h);
    } else {
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
      std::memcpy(d, buf, n * 2);
    }
  } else {
    float* d = static_cast<float*>(p) + i;
    if (n >= 8) _mm256_storeu_ps(d, v);
    else _mm256_maskstore_ps(d, lane_mask(n), v);
  }
}

// In-register transpose of an 8 x 8 fp32 block: r[i] holds row i before, column i after.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// e^x for float32 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2; about 1 ulp. The same
// operations as exp512; 2^n is applied as two exact powers of two (n in [-150, 128]
// splits into halves that are normal floats), so p * 2^n rounds once, as scalef does.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-104.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

}  // namespace yun2
