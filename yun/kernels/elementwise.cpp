// Fused elementwise ops of a decoder layer for x86 CPUs with AVX-512, in float32 or
// bfloat16: RMSNorm, SiLU-and-multiply, and neox-style rotary embedding (in place).
// A decode step of a small model runs each of these on a few thousand values, where
// torch spends more time dispatching its 5-8 separate ops (and their dtype casts) than
// computing. Each op here is one pass. Rounding follows the reference implementations
// op by op: wherever torch would round an intermediate bfloat16 tensor, we round too, so
// results equal torch's up to the order of a sum and the last bit of exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

#include "bf16.h"

namespace {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

template <bool BF16>
inline __m512 load(const void* p, int64_t i, __mmask16 m) {
  if constexpr (BF16) {
    __m256i v = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  }
}

// Round to the nearest bfloat16 (ties to even), keeping the value as a float; NaN stays NaN.
inline __m512 round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), _mm512_set1_ps(NAN));
}

// What torch stores for a float result in a tensor of this dtype.
template <bool BF16>
inline __m512 R(__m512 v) {
  if constexpr (BF16) return round_bf16(v);
  else return v;
}

template <bool BF16>
inline void store(void* p, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (BF16) {
    const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, _mm512_cvtepi32_epi16(r));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  }
}

template <bool BF16>
void rms_norm_rows(const void* x, const void* w, void* y, int64_t rows, int64_t D, float eps) {
  const int64_t esz = BF16 ? 2 : 4;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* xr = static_cast<const char*>(x) + r * D * esz;
      char* yr = static_cast<char*>(y) + r * D * esz;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 v = load<BF16>(xr, i, tail_mask(D - i));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float var = _mm512_reduce_add_ps(acc) / static_cast<float>(D);
      const __m512 s = _mm512_set1_ps(1.f / std::sqrt(var + eps));
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        const __m512 h = R<BF16>(_mm512_mul_ps(load<BF16>(xr, i, m), s));  // h.to(dtype)
        store<BF16>(yr, i, _mm512_mul_ps(load<BF16>(w, i, m), h), m);      // weight * h
      }
    }
  });
}

template <bool BF16>
void silu_mul_rows(const void* x, void* y, int64_t rows, int64_t I) {
  const int64_t esz = BF16 ? 2 : 4;
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* g = static_cast<const char*>(x) + r * 2 * I * esz;
      const char* u = g + I * esz;
      char* yr = static_cast<char*>(y) + r * I * esz;
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 m = tail_mask(I - i);
        const __m512 gv = load<BF16>(g, i, m);
        const __m512 one = _mm512_set1_ps(1.f);
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, yun::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        store<BF16>(yr, i, _mm512_mul_ps(R<BF16>(silu), load<BF16>(u, i, m)), m);
      }
    }
  });
}

// x[t, h, :] rotated in place: x1' = x1 c1 - x2 s1, x2' = x2 c2 + x1 s2 (halves of D).
template <bool BF16>
void rope_rows(void* x, const void* cos, const void* sin, int64_t T, int64_t H, int64_t D,
               int64_t st, int64_t sh) {
  const int64_t esz = BF16 ? 2 : 4, half = D / 2;
  at::parallel_for(0, T * H, 64, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      const int64_t t = j / H, h = j % H;
      char* xr = static_cast<char*>(x) + (t * st + h * sh) * esz;
      const char* c = static_cast<const char*>(cos) + t * D * esz;
      const char* s = static_cast<const char*>(sin) + t * D * esz;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = tail_mask(half - i);
        const __m512 x1 = load<BF16>(xr, i, m), x2 = load<BF16>(xr, half + i, m);
        const __m512 o1 = _mm512_sub_ps(R<BF16>(_mm512_mul_ps(x1, load<BF16>(c, i, m))),
                                        R<BF16>(_mm512_mul_ps(x2, load<BF16>(s, i, m))));
        const __m512 o2 = _mm512_add_ps(R<BF16>(_mm512_mul_ps(x2, load<BF16>(c, half + i, m))),
                                        R<BF16>(_mm512_mul_ps(x1, load<BF16>(s, half + i, m))));
        store<BF16>(xr, i, o1, m);
        store<BF16>(xr, half + i, o2, m);
      }
    }
  });
}

bool is_bf16(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "expected a float32 or bfloat16 tensor");
  return t.scalar_type() == at::kBFloat16;
}

}  // namespace

// x: [..., D] contiguous, w: [D] of x's dtype -> weight * (x / rms(x)), like torch's RMSNorm.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 &&
              x.size(-1) == w.size(0) && x.scalar_type() == w.scalar_type(),
              "rms_norm: x [..., D] contiguous and w [D] of the same dtype");
  auto y = torch::empty_like(x);
  const int64_t D = w.size(0), rows = D ? x.numel() / D : 0;
  if (is_bf16(x)) rms_norm_rows<true>(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, D, eps);
  else rms_norm_rows<false>(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, D, eps);
  return y;
}

// x: [T, 2I] contiguous (gate then up) -> silu(gate) * up: [T, I].
torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) % 2 == 0,
              "silu_and_mul: x must be a contiguous [T, 2I] tensor");
  const int64_t I = x.size(1) / 2;
  auto y = torch::empty({x.size(0), I}, x.options());
  if (is_bf16(x)) silu_mul_rows<true>(x.data_ptr(), y.data_ptr(), x.size(0), I);
  else silu_mul_rows<false>(x.data_ptr(), y.data_ptr(), x.size(0), I);
  return y;
}

// x: [T, H, D] with a contiguous last dim (any T/H strides), rotated in place;
// cos, sin: [T, D] contiguous, x's dtype. Returns x.
torch::Tensor rope_neox_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope: x must be [T, H, D] with a contiguous last dim and even D");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
              cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
              sin.sizes() == cos.sizes() && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(),
              "rope: cos and sin must be contiguous [T, D] of x's dtype");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  if (is_bf16(x)) rope_rows<true>(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, H, D, x.stride(0), x.stride(1));
  else rope_rows<false>(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, H, D, x.stride(0), x.stride(1));
  return x;
}
