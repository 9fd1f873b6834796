// Skinny matrix products for decode on x86 CPUs with AVX2 + FMA (the AVX-512 kernel's
// twin, yun/kernels/gemv_bf16.cpp, with 8-lane vectors):
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  w in bfloat16 or float32, M small (1..4
// per pass). Bandwidth bound: stream the weights once (bf16 widened in registers), reuse each
// loaded weight for every row of x; fp32 accumulation. Threads split the output rows.
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

using yun2::bf16_to_float;
using yun2::widen8;

// 8 weights as fp32 lanes, and one weight as a float, for each weight type.
inline __m256 load8(const uint16_t* p) { return widen8(p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float scalar(uint16_t v) { return bf16_to_float(v); }
inline float scalar(float v) { return v; }
// Prefetches go to L2, the same bytes ahead for both weight types: the block after next
// for bf16, the next one for fp32 (AMD Zen 4, 2 threads, cold weights, SmolLM2-135M's
// decode shapes, standalone copy of this loop: bf16 29.8-31.4 GB/s against 21-23 with
// the next block into L1; fp32 30-31.7 either way, 22-23 into L1).
constexpr auto kPrefetchHint = _MM_HINT_T1;
template <typename W> constexpr int kBlocksAhead = 4 / int(sizeof(W));

// Rows [n0, n1) of the output for M rows of x (fp32, row stride K), R weight rows per pass:
// M x R accumulators + R widened weights fit the 16 ymm registers (R = 4 for M <= 2, 3
// beyond). A later block of weight rows (kBlocksAhead) is prefetched evenly over this
// block's loop.
template <typename W, int M, int R>
void kernel(const float* x, const W* w, const float* bias, float* y, int64_t K,
            int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t(7);
  const int64_t lines = R * K * int64_t(sizeof(W)) / 64, iters = std::max<int64_t>(1, K8 / 8);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    const W* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * K;
    const char* next = reinterpret_cast<const char*>(w + (n + R * kBlocksAhead<W>) * K);  // never faults
    int64_t done = 0;
    for (int64_t k = 0; k < K8; k += 8) {
      for (const int64_t want = (k / 8 + 1) * lines / iters; done < want; ++done)
        _mm_prefetch(next + done * 64, kPrefetchHint);
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(wr[r] + k);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = yun2::hsum(acc[m][r]);
        for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * scalar(wr[r][k]);
        y[m * N + n + r] = s + (bias ? bias[n + r] : 0.f);
      }
  }
  for (; n < n1; ++n) {
    const W* wr = w + n * K;
    for (int m = 0; m < M; ++m) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), load8(wr + k), acc);
      float s = yun2::hsum(acc);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * scalar(wr[k]);
      y[m * N + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

template <typename W, int M>
void run(const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  constexpr int R = M <= 2 ? 4 : 3;
  const int64_t chunk = 64;  // output rows per task: long streams, even shares
  at::parallel_for(0, (N + chunk - 1) / chunk, 1, [&](int64_t b0, int64_t b1) {
    kernel<W, M, R>(x, w, bias, y, K, N, b0 * chunk, std::min(N, b1 * chunk));
  });
}

// x: [M, K] (any float dtype), w: [N, K] of W (bf16 as uint16) contiguous, bias: [N] or
// empty. Returns [M, N] in x's dtype (bf16: the fp32 result rounded once, ties to even).
template <typename W>
torch::Tensor gemv(torch::Tensor x, const W* wp, int64_t N, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1);
  // Converting x and y here costs less than torch's dispatch of a cast (decode: ~100
  // calls per token on a few thousand values).
  std::vector<float> xbuf;
  const float* xp;
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xp = x.data_ptr<float>();
  } else {
    auto xc = x.scalar_type() == at::kBFloat16 ? x.contiguous() : x.to(at::kFloat).contiguous();
    xbuf.resize(M * K);
    if (xc.scalar_type() == at::kBFloat16) {
      const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
      for (int64_t i = 0; i < M * K; ++i) xbuf[i] = bf16_to_float(src[i]);
    } else {
      std::memcpy(xbuf.data(), xc.data_ptr<float>(), M * K * sizeof(float));
    }
    xp = xbuf.data();
  }
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const bool out_f32 = x.scalar_type() == at::kFloat;
  auto y = torch::empty({M, N}, x.options().dtype(out_f32 ? at::kFloat : at::kBFloat16));
  std::vector<float> ybuf(out_f32 ? 0 : M * N);
  float* yp = out_f32 ? y.data_ptr<float>() : ybuf.data();
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xs = xp + m0 * K;
    float* ys = yp + m0 * N;  // each block of rows writes its own slice of y
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: run<W, 1>(xs, wp, bp, ys, K, N); break;
      case 2: run<W, 2>(xs, wp, bp, ys, K, N); break;
      case 3: run<W, 3>(xs, wp, bp, ys, K, N); break;
      default: run<W, 4>(xs, wp, bp, ys, K, N); break;
    }
  }
  if (out_f32) return y;
  auto* dst = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * N; ++i) dst[i] = yun2::float_to_bf16(ybuf[i]);
  if (x.scalar_type() != at::kBFloat16) return y.to(x.scalar_type());
  return y;
}

}  // namespace

// x: [M, K] (any float dtype), w: [N, K] bfloat16 contiguous, bias: [N] or empty.
// Returns [M, N] in x's dtype (bf16: the fp32 result rounded once, ties to even).
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2,
              "w must be a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] with K = w.size(1)");
  return gemv(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.size(0), bias);
}

// The same for float32 w.
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2,
              "w must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] with K = w.size(1)");
  return gemv(x, w.data_ptr<float>(), w.size(0), bias);
}
