// bfloat16 helpers shared by the native kernels: a bf16 is the top half of an fp32.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace yun {

// 16 bf16 values (32 bytes, unaligned) widened to 16 fp32 lanes.
inline __m512 widen16(const uint16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace yun
