// Batched products with bfloat16 weights on AVX-512 CPUs that lack native bf16 math:
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  M > 4 (prefill, batched decode).
// torch's bf16 GEMM on such CPUs runs at a fraction of its fp32 speed. This is the
// classic outer-product GEMM (as in BLIS/GotoBLAS): a panel of NR = 64 weight rows and
// KC values of k is widened to fp32 and transposed once into a small buffer
// bp[k][0..63] (16x16 register transposes), then reused by every block of MR = 6 rows of
// x. The micro-kernel keeps a 6 x 64 tile of y in 24 registers: per k it loads 4 vectors
// of the panel, broadcasts 6 values of x and issues 24 FMAs, and never reduces across
// lanes. Threads split the weight panels (torch's pool), so weights are read once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "bf16.h"
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MR = 6;         // rows of x per micro-kernel
constexpr int NR = 64;        // weight rows per panel (4 vectors of 16 floats)
constexpr int64_t KC = 256;   // k per packed panel: 256 x 64 fp32 = 64 KiB (L2)

using yun::bf16_to_float;
using yun::widen16;

// In-register transpose of a 16 x 16 fp32 block: r[i] holds row i before, column i after.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// bp[k][j] = w[n0 + j, k0 + k] as fp32 for k < kc, j < NR; zero for j >= nr.
void pack_panel(const uint16_t* w, int64_t K, int64_t n0, int nr, int64_t k0, int64_t kc,
                float* bp) {
  const int64_t kc16 = kc & ~int64_t(15);
  for (int g = 0; g < NR / 16; ++g) {
    const int rows = std::max(0, std::min(16, nr - g * 16));
    for (int64_t k = 0; k < kc16; k += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? widen16(w + (n0 + g * 16 + i) * K + k0 + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(bp + (k + i) * NR + g * 16, r[i]);
    }
    for (int64_t k = kc16; k < kc; ++k)
      for (int i = 0; i < 16; ++i)
        bp[k * NR + g * 16 + i] =
            i < rows ? bf16_to_float(w[(n0 + g * 16 + i) * K + k0 + k]) : 0.f;
  }
}

// y[m, 0..nr) (+)= sum_k x[m, k] * bp[k][0..nr) for m < M_; x rows stride ldx, y rows ldy.
template <int M_>
inline void micro(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y,
                  int64_t ldy, int nr, bool accumulate) {
  __m512 acc[M_][4];
  const __mmask16 full = 0xFFFF;
  __mmask16 mask[4];
  for (int j = 0; j < 4; ++j) {
    const int left = nr - j * 16;
    mask[j] = left >= 16 ? full : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
  for (int m = 0; m < M_; ++m)
    for (int j = 0; j < 4; ++j)
      acc[m][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], y + m * ldy + j * 16)
                             : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = bp + k * NR;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    for (int m = 0; m < M_; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(a, b2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(a, b3, acc[m][3]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int j = 0; j < 4; ++j)
      if (mask[j]) _mm512_mask_storeu_ps(y + m * ldy + j * 16, mask[j], acc[m][j]);
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

// Ask for the weight block that will be packed next, so that it streams in from memory
// while this block's micro-kernels run (the transposed reads of the pack would otherwise
// wait on DRAM with the hardware prefetchers confused by 64 short rows).
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
    // 64-byte aligned panel (vector loads never split a cache line).
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
