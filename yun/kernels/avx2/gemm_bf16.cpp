// Batched products with bfloat16 weights on x86 CPUs with AVX2 + FMA (the AVX-512
// kernel's twin, yun/kernels/gemm_bf16.cpp, sized for 16 ymm registers):
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  M > 4 (prefill, batched decode).
// Outer-product GEMM (BLIS's Haswell shape): a panel of NR = 16 weight rows and KC values
// of k is widened to fp32 and transposed once (8x8 register transposes) into
// bp[k][0..15], 16 KiB (L1), then reused by every block of MR = 6 rows of x. The
// micro-kernel keeps a 6 x 16 tile of y in 12 registers: per k it loads 2 vectors of the
// panel, broadcasts 6 values of x and issues 12 FMAs (15 registers live). Threads split
// the weight panels (torch's pool), so each weight is read once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "avx2.h"
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MR = 6;        // rows of x per micro-kernel
constexpr int NR = 16;       // weight rows per panel (2 vectors of 8 floats)
constexpr int64_t KC = 256;  // k per packed panel: 256 x 16 fp32 = 16 KiB

using yun2::bf16_to_float;
using yun2::widen8;

// bp[k][j] = w[n0 + j, k0 + k] as fp32 for k < kc, j < NR; zero for j >= nr.
void pack_panel(const uint16_t* w, int64_t K, int64_t n0, int nr, int64_t k0, int64_t kc,
                float* bp) {
  const int64_t kc8 = kc & ~int64_t(7);
  for (int g = 0; g < NR / 8; ++g) {
    const int rows = std::max(0, std::min(8, nr - g * 8));
    for (int64_t k = 0; k < kc8; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i < rows ? widen8(w + (n0 + g * 8 + i) * K + k0 + k) : _mm256_setzero_ps();
      yun2::transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(bp + (k + i) * NR + g * 8, r[i]);
    }
    for (int64_t k = kc8; k < kc; ++k)
      for (int i = 0; i < 8; ++i)
        bp[k * NR + g * 8 + i] = i < rows ? bf16_to_float(w[(n0 + g * 8 + i) * K + k0 + k]) : 0.f;
  }
}

// y[m, 0..nr) (+)= sum_k x[m, k] * bp[k][0..nr) for m < M_; x rows stride ldx, y rows ldy.
template <int M_>
inline void micro(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y,
                  int64_t ldy, int nr, bool accumulate) {
  __m256 acc[M_][2];
  if (nr == NR) {
    for (int m = 0; m < M_; ++m)
      for (int j = 0; j < 2; ++j)
        acc[m][j] = accumulate ? _mm256_loadu_ps(y + m * ldy + j * 8) : _mm256_setzero_ps();
  } else {
    for (int m = 0; m < M_; ++m)
      for (int j = 0; j < 2; ++j)
        acc[m][j] = accumulate ? _mm256_maskload_ps(y + m * ldy + j * 8, yun2::lane_mask(nr - j * 8))
                               : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = bp + k * NR;
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    for (int m = 0; m < M_; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
      acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
    }
  }
  if (nr == NR) {
    for (int m = 0; m < M_; ++m)
      for (int j = 0; j < 2; ++j) _mm256_storeu_ps(y + m * ldy + j * 8, acc[m][j]);
  } else {
    for (int m = 0; m < M_; ++m)
      for (int j = 0; j < 2; ++j)
        if (nr > j * 8)
          _mm256_maskstore_ps(y + m * ldy + j * 8, yun2::lane_mask(nr - j * 8), acc[m][j]);
  }
}

inline void micro_m(int mr, const float* x, int64_t ldx, const float* bp, int64_t kc,
                    float* y, int64_t ldy, int nr, bool accumulate) {
  switch (mr) {
    case 1: micro<1>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
    case 2: micro<2>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
    case 3: micro<3>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
    case 4: micro<4>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
    case 5: micro<5>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
    default: micro<6>(x, ldx, bp, kc, y, ldy, nr, accumulate); break;
  }
}

// Ask for the weight block packed next, so it streams in while this block's
// micro-kernels run.
inline void prefetch_block(const uint16_t* w, int64_t K, int64_t N, int64_t n0, int64_t k0,
                           int64_t kc) {
  const int64_t rows = std::min<int64_t>(NR, N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(w + (n0 + r) * K + k0);
    for (int64_t off = 0; off < kc * 2; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
  }
}

}  // namespace

// x: [M, K] any float dtype; w: [N, K] bfloat16 contiguous; bias: [N] or none.
// Returns [M, N] in x's dtype.
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2,
              "w must be a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] with K = w.size(1)");
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  auto xf = x.to(at::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  if (K == 0) return y.zero_().to(x.scalar_type());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t panels = (N + NR - 1) / NR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(KC * NR + 16);
    // 64-byte aligned panel (aligned loads, never split across cache lines).
    float* bp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR;
      const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        pack_panel(wp, K, n0, nr, k0, kc, bp);
        if (k0 + KC < K)
          prefetch_block(wp, K, N, n0, k0 + KC, std::min(KC, K - k0 - KC));
        else if (p + 1 < p1)
          prefetch_block(wp, K, N, n0 + NR, 0, std::min(KC, K));
        for (int64_t m = 0; m < M; m += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, M - m));
          micro_m(mr, xp + m * K + k0, K, bp, kc, yp + m * N + n0, N, nr, k0 > 0);
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}
