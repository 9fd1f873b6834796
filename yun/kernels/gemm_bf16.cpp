// Batched products with bfloat16 weights on AVX-512 CPUs that lack native bf16 math:
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  M > 4 (prefill, batched decode).
// torch's bf16 GEMM on such CPUs runs at a fraction of its fp32 speed. This is the
// classic outer-product GEMM (as in BLIS/GotoBLAS): a panel of NR = 64 weight rows and
// KC values of k is widened to fp32 and transposed once into a small buffer
// bp[k][0..63] (16x16 register transposes), then reused by every block of MR = 6 rows of
// x. The micro-kernel keeps a 6 x 64 tile of y in 24 registers: per k it loads 4 vectors
// of the panel, broadcasts 6 values of x and issues 24 FMAs, and never reduces across
// lanes. Threads split the weight panels (torch's pool), so weights are read once.
//
// On CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and later) and bf16 x, a second
// micro-kernel does twice the work per instruction: vdpbf16ps multiplies 16 pairs of
// bf16 values and adds both products into 16 fp32 lanes. Its panel keeps the weights in
// bf16, as pairs along k: bq[k/2][j] = (w[j, k], w[j, k+1]), which is a transpose of
// 32-bit words (a pair is one word of a weight row), so the same 16x16 register
// transpose packs it. The products are exact (8-bit mantissas) and the sums fp32, as in
// the widening kernel; only the order of the roundings differs. Chosen at run time
// (`__builtin_cpu_supports`), compiled with a target attribute: the module itself is
// built for plain AVX-512 and loads on every AVX-512 CPU.
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

// ---- the AVX512-BF16 kernel ----------------------------------------------------------
constexpr int64_t KC2 = 512;  // k per bf16 panel: 256 pairs x 64 rows x 4 bytes = 64 KiB

// bq[p][j] = the 32-bit word (w[n0 + j, k0 + 2p], w[n0 + j, k0 + 2p + 1]) for p < ceil(kc/2),
// j < NR; zero words for j >= nr, a zero high half where k0 + 2p + 1 is past kc.
void pack_pairs(const uint16_t* w, int64_t K, int64_t n0, int nr, int64_t k0, int64_t kc,
                uint32_t* bq) {
  const int64_t pairs = (kc + 1) / 2, full = kc / 2, full16 = full & ~int64_t(15);
  for (int g = 0; g < NR / 16; ++g) {
    const int rows = std::max(0, std::min(16, nr - g * 16));
    for (int64_t p = 0; p < full16; p += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_loadu_ps(w + (n0 + g * 16 + i) * K + k0 + 2 * p)
                        : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_ps(reinterpret_cast<float*>(bq + (p + i) * NR + g * 16), r[i]);
    }
    for (int64_t p = full16; p < pairs; ++p)
      for (int i = 0; i < 16; ++i) {
        uint32_t word = 0;
        if (i < rows) {
          const uint16_t* src = w + (n0 + g * 16 + i) * K + k0 + 2 * p;
          word = src[0] | (2 * p + 1 < kc ? static_cast<uint32_t>(src[1]) << 16 : 0u);
        }
        bq[p * NR + g * 16 + i] = word;
      }
  }
}

// As micro, over bf16 pairs: x32 rows are x's bf16 values as words (stride ldx words).
template <int M_>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) inline void micro_dot(
    const uint32_t* x32, int64_t ldx, const uint32_t* bq, int64_t pairs, float* y,
    int64_t ldy, int nr, bool accumulate) {
  __m512 acc[M_][4];
  __mmask16 mask[4];
  for (int j = 0; j < 4; ++j) {
    const int left = nr - j * 16;
    mask[j] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
  for (int m = 0; m < M_; ++m)
    for (int j = 0; j < 4; ++j)
      acc[m][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], y + m * ldy + j * 16)
                             : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint32_t* b = bq + p * NR;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 32), b3 = (__m512bh)_mm512_loadu_si512(b + 48);
    for (int m = 0; m < M_; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x32[m * ldx + p]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], a, b2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], a, b3);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int j = 0; j < 4; ++j)
      if (mask[j]) _mm512_mask_storeu_ps(y + m * ldy + j * 16, mask[j], acc[m][j]);
}

__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) void micro_dot_m(
    int mr, const uint32_t* x32, int64_t ldx, const uint32_t* bq, int64_t pairs, float* y,
    int64_t ldy, int nr, bool accumulate) {
  switch (mr) {
    case 1: micro_dot<1>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
    case 2: micro_dot<2>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
    case 3: micro_dot<3>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
    case 4: micro_dot<4>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
    case 5: micro_dot<5>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
    default: micro_dot<6>(x32, ldx, bq, pairs, y, ldy, nr, accumulate); break;
  }
}

// y (fp32 [M, N]) = x @ w.T with x bf16 [M, K]: rows of x padded to an even K (a zero
// last value), so that a pair never straddles two rows.
void gemm_dot(const at::BFloat16* x, const uint16_t* wp, float* yp, int64_t M, int64_t K,
              int64_t N) {
  const int64_t K2 = (K + 1) / 2;  // words per padded row of x
  std::vector<uint32_t> xw(M * K2, 0u);
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(reinterpret_cast<uint16_t*>(xw.data() + m * K2), xs + m * K, K * 2);
  const int64_t panels = (N + NR - 1) / NR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint32_t> buf(KC2 / 2 * NR + 16);
    uint32_t* bq = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR;
      const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
      for (int64_t k0 = 0; k0 < K; k0 += KC2) {
        const int64_t kc = std::min(KC2, K - k0);
        pack_pairs(wp, K, n0, nr, k0, kc, bq);
        if (k0 + KC2 < K)
          prefetch_block(wp, K, N, n0, k0 + KC2, std::min(KC2, K - k0 - KC2));
        else if (p + 1 < p1)
          prefetch_block(wp, K, N, n0 + NR, 0, std::min(KC2, K));
        for (int64_t m = 0; m < M; m += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, M - m));
          micro_dot_m(mr, xw.data() + m * K2 + k0 / 2, K2, bq, (kc + 1) / 2,
                      yp + m * N + n0, N, nr, k0 > 0);
        }
      }
    }
  });
}

bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// The widening kernel: y (fp32 [M, N]) = xp @ w.T, x fp32.
void gemm_widen(const float* xp, const uint16_t* wp, float* yp, int64_t M, int64_t K,
                int64_t N) {
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
}

}  // namespace

bool gemm_bf16_has_dot() { return cpu_has_bf16_dot(); }

// x: [M, K] any float dtype; w: [N, K] bfloat16 contiguous; bias: [N] or none.
// Returns [M, N] in x's dtype. kernel: "auto" (vdpbf16ps where the CPU has it and x is
// bf16, else the widening kernel), "widen" or "dot" (the CPU must have AVX512-BF16).
torch::Tensor gemm_bf16_kernel(torch::Tensor x, torch::Tensor w,
                               c10::optional<torch::Tensor> bias, const std::string& kernel) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2,
              "w must be a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] with K = w.size(1)");
  TORCH_CHECK(kernel == "auto" || kernel == "widen" || kernel == "dot",
              "kernel must be auto, widen or dot, got ", kernel);
  TORCH_CHECK(kernel != "dot" || cpu_has_bf16_dot(), "this CPU has no AVX512-BF16");
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  const bool dot = kernel == "dot" || (kernel == "auto" && cpu_has_bf16_dot() &&
                                       x.scalar_type() == at::kBFloat16);
  if (dot) {
    auto xb = x.to(at::kBFloat16).contiguous();
    auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
    if (M == 0 || N == 0) return y.to(x.scalar_type());
    if (K == 0) return y.zero_().to(x.scalar_type());
    gemm_dot(xb.data_ptr<at::BFloat16>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
             y.data_ptr<float>(), M, K, N);
    if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type());
  }
  auto xf = x.to(at::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  if (K == 0) return y.zero_().to(x.scalar_type());
  gemm_widen(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
             y.data_ptr<float>(), M, K, N);
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  return gemm_bf16_kernel(x, w, bias, "auto");
}
