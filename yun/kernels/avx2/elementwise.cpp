// Fused elementwise ops of a decoder layer on x86 CPUs with AVX2 + FMA, in float32 or
// bfloat16 (the AVX-512 kernels' twins, yun/kernels/elementwise.cpp, with 8-lane
// vectors): RMSNorm, SiLU-and-multiply, neox-style rotary embedding (in place). Rounding
// follows torch's op-by-op code: wherever torch rounds an intermediate bfloat16 tensor,
// we round too, so results equal torch's up to the order of a sum and the last bit of
// exp (rotary: bit-identical). exp is the AVX-512 kernels' polynomial, lane for lane.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "avx2.h"
#include <cmath>
#include <cstdint>

namespace {

using yun2::load;
using yun2::R;
using yun2::store;

template <bool BF16>
void rms_norm_rows(const void* x, const void* w, void* y, int64_t rows, int64_t D, float eps) {
  const int64_t esz = BF16 ? 2 : 4;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* xr = static_cast<const char*>(x) + r * D * esz;
      char* yr = static_cast<char*>(y) + r * D * esz;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 v = load<BF16>(xr, i, D - i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      const float var = yun2::hsum(acc) / static_cast<float>(D);
      const __m256 s = _mm256_set1_ps(1.f / std::sqrt(var + eps));
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 h = R<BF16>(_mm256_mul_ps(load<BF16>(xr, i, D - i), s));  // h.to(dtype)
        store<BF16>(yr, i, _mm256_mul_ps(load<BF16>(w, i, D - i), h), D - i);  // weight * h
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
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 gv = load<BF16>(g, i, I - i);
        const __m256 e = yun2::exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        store<BF16>(yr, i, _mm256_mul_ps(R<BF16>(silu), load<BF16>(u, i, I - i)), I - i);
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
      for (int64_t i = 0; i < half; i += 8) {
        const int64_t n = half - i;
        const __m256 x1 = load<BF16>(xr, i, n), x2 = load<BF16>(xr, half + i, n);
        const __m256 o1 = _mm256_sub_ps(R<BF16>(_mm256_mul_ps(x1, load<BF16>(c, i, n))),
                                        R<BF16>(_mm256_mul_ps(x2, load<BF16>(s, i, n))));
        const __m256 o2 = _mm256_add_ps(R<BF16>(_mm256_mul_ps(x2, load<BF16>(c, half + i, n))),
                                        R<BF16>(_mm256_mul_ps(x1, load<BF16>(s, half + i, n))));
        store<BF16>(xr, i, o1, n);
        store<BF16>(xr, half + i, o2, n);
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
