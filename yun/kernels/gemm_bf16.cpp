// Batched products with bfloat16 weights on AVX-512 CPUs that lack native bf16 math:
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  M > 4 (prefill, batched decode).
// torch's bf16 GEMM on such CPUs runs at a fraction of its fp32 speed. Here each block
// of NR weight rows is widened to fp32 once into a small buffer (L1/L2 resident) and
// reused by every block of MR rows of x; the micro-kernel keeps MR x NR accumulators
// in registers (dot-product form: vectors run along k, reduced at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

constexpr int MR = 4;   // rows of x per micro-kernel
constexpr int NR = 6;   // rows of w per micro-kernel
constexpr int64_t MT = 64;  // rows of x per tile (kept in L2)
constexpr int64_t NC = 48;  // rows of w per parallel chunk (multiple of NR)

inline void widen_row(const uint16_t* src, float* dst, int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
  for (; k < K; ++k) {
    uint32_t u = static_cast<uint32_t>(src[k]) << 16;
    std::memcpy(dst + k, &u, 4);
  }
}

// acc[m][n] = x[m, :] . w[n, :] for m < M_, n < N_; x rows stride K, w rows stride Kp.
template <int M_, int N_>
inline void micro(const float* x, const float* w, float* y, int64_t K, int64_t Kp,
                  int64_t ldy) {
  __m512 acc[M_][N_];
  for (int m = 0; m < M_; ++m)
    for (int n = 0; n < N_; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[N_];
    for (int n = 0; n < N_; ++n) wv[n] = _mm512_loadu_ps(w + n * Kp + k);
    for (int m = 0; m < M_; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int n = 0; n < N_; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int n = 0; n < N_; ++n) {
      float s = _mm512_reduce_add_ps(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * w[n * Kp + kk];
      y[m * ldy + n] = s;
    }
}

template <int M_>
inline void micro_n(int nr, const float* x, const float* w, float* y, int64_t K, int64_t Kp,
                    int64_t ldy) {
  switch (nr) {
    case 1: micro<M_, 1>(x, w, y, K, Kp, ldy); break;
    case 2: micro<M_, 2>(x, w, y, K, Kp, ldy); break;
    case 3: micro<M_, 3>(x, w, y, K, Kp, ldy); break;
    case 4: micro<M_, 4>(x, w, y, K, Kp, ldy); break;
    case 5: micro<M_, 5>(x, w, y, K, Kp, ldy); break;
    default: micro<M_, 6>(x, w, y, K, Kp, ldy); break;
  }
}

inline void micro_mn(int mr, int nr, const float* x, const float* w, float* y, int64_t K,
                     int64_t Kp, int64_t ldy) {
  switch (mr) {
    case 1: micro_n<1>(nr, x, w, y, K, Kp, ldy); break;
    case 2: micro_n<2>(nr, x, w, y, K, Kp, ldy); break;
    case 3: micro_n<3>(nr, x, w, y, K, Kp, ldy); break;
    default: micro_n<4>(nr, x, w, y, K, Kp, ldy); break;
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
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t Kp = (K + 15) & ~int64_t(15);  // padded row stride of the widened block
  at::parallel_for(0, (N + NC - 1) / NC, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> wbuf(NR * Kp);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n_end = std::min(N, (c + 1) * NC);
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t m_end = std::min(M, m0 + MT);
        for (int64_t n = c * NC; n < n_end; n += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, n_end - n));
          for (int r = 0; r < nr; ++r) widen_row(wp + (n + r) * K, wbuf.data() + r * Kp, K);
          for (int64_t m = m0; m < m_end; m += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, m_end - m));
            micro_mn(mr, nr, xp + m * K, wbuf.data(), yp + m * N + n, K, Kp, N);
          }
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}
