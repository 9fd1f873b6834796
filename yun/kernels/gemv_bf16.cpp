// Skinny matrix products for decode on x86 CPUs with AVX-512:
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],  w in bfloat16 or float32, M small (1..4
// per pass). Decode reads every weight once per token, so it is bound by memory
// bandwidth: stream the weights once (bf16: half the bytes of fp32, widened to fp32 in
// registers: a bf16 is the top half of an fp32), and reuse each loaded weight for every
// row of x. Accumulation is in fp32. Threads split the output features (torch's pool).
// torch's own fp32 matrix-vector product streams at ~40% of the machine's read bandwidth
// on these CPUs (AMD Zen 5, 2 threads: 14.5 of 39 GB/s), hence the fp32 twin.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "bf16.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using yun::bf16_to_float;
using yun::widen16;

// 16 weights as fp32 lanes, and one weight as a float, for each weight type.
inline __m512 load16(const uint16_t* p) { return widen16(p); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline float scalar(uint16_t v) { return bf16_to_float(v); }
inline float scalar(float v) { return v; }
// Prefetches go to L2, the same bytes ahead for both weight types: the block after next
// for bf16, the next one for fp32 (AMD Zen 4, 2 threads, cold weights, SmolLM2-135M's
// decode shapes, standalone copy of this loop: bf16 29.8-31.4 GB/s against 21-23 with
// the next block into L1; fp32 30-31.7 either way, 22-23 into L1).
constexpr auto kPrefetchHint = _MM_HINT_T1;
template <typename W> constexpr int kBlocksAhead = 4 / int(sizeof(W));

// Rows [n0, n1) of the output for M rows of x (fp32, row stride K).
// Weight rows n..n+R-1 are one contiguous block of R*K bf16; while a block is consumed,
// a later one (kBlocksAhead) is prefetched line by line, evenly over the block's
// iterations. With short rows (K = 896: 28 cache lines) the hardware prefetchers alone
// leave bandwidth unused (measured: ~16 vs ~18-21 GB/s on the demo model's decode step,
// 2 threads).
template <typename W, int M>
void kernel(const float* x, const W* w, const float* bias, float* y, int64_t K,
            int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = 4;  // weight rows per pass: 4 independent accumulators per row of x
  const int64_t K16 = K & ~int64_t(15);
  const int64_t lines = R * K * int64_t(sizeof(W)) / 64, iters = std::max<int64_t>(1, K16 / 16);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const W* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * K;
    // Prefetching past the end of w is harmless (a prefetch never faults).
    const char* next = reinterpret_cast<const char*>(w + (n + R * kBlocksAhead<W>) * K);
    int64_t done = 0;
    for (int64_t k = 0; k < K16; k += 16) {
      for (const int64_t want = (k / 16 + 1) * lines / iters; done < want; ++done)
        _mm_prefetch(next + done * 64, kPrefetchHint);
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16(wr[r] + k);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[m][r]);
        for (int64_t k = K16; k < K; ++k) s += x[m * K + k] * scalar(wr[r][k]);
        y[m * N + n + r] = s + (bias ? bias[n + r] : 0.f);
      }
  }
  for (; n < n1; ++n) {
    const W* wr = w + n * K;
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K16; k += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), load16(wr + k), acc);
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t k = K16; k < K; ++k) s += x[m * K + k] * scalar(wr[k]);
      y[m * N + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

template <typename W, int M>
void run(const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  // Chunks of 64 output rows keep each thread's streams long and its share even.
  const int64_t chunk = 64;
  at::parallel_for(0, (N + chunk - 1) / chunk, 1, [&](int64_t b0, int64_t b1) {
    kernel<W, M>(x, w, bias, y, K, N, b0 * chunk, std::min(N, b1 * chunk));
  });
}

// x: [M, K] (any float dtype), w: [N, K] of W (bf16 as uint16) contiguous, bias: [N] or
// empty. Returns [M, N] in x's dtype (bf16: the fp32 result rounded once, ties to even).
template <typename W>
torch::Tensor gemv(torch::Tensor x, const W* wp, int64_t N, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1);
  // Decode calls this ~100 times per token on a few thousand values: convert x and y
  // here rather than with torch ops, whose dispatch would cost more than the copies.
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
    const int64_t mb = std::min<int64_t>(4, M - m0);
    const float* xs = xp + m0 * K;
    // Each block of rows writes its own slice of y (row stride N).
    float* ys = yp + m0 * N;
    switch (mb) {
      case 1: run<W, 1>(xs, wp, bp, ys, K, N); break;
      case 2: run<W, 2>(xs, wp, bp, ys, K, N); break;
      case 3: run<W, 3>(xs, wp, bp, ys, K, N); break;
      default: run<W, 4>(xs, wp, bp, ys, K, N); break;
    }
  }
  if (out_f32) return y;
  // Round to bfloat16 (ties to even), as y.to(bfloat16) would.
  auto* dst = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * N; ++i) {
    uint32_t u;
    std::memcpy(&u, &ybuf[i], 4);
    dst[i] = std::isnan(ybuf[i]) ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) return y.to(x.scalar_type());
  return y;
}

}  // namespace

// x: [M, K] (any float dtype), w: [N, K] bfloat16 contiguous, bias: [N] or empty.
// Returns [M, N] in x's dtype.
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t window);

torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor gemm_bf16_kernel(torch::Tensor x, torch::Tensor w,
                               c10::optional<torch::Tensor> bias, const std::string& kernel);
bool gemm_bf16_has_dot();
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_and_mul(torch::Tensor x);
torch::Tensor rope_neox_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

torch::Tensor decode_attention_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor cache, torch::Tensor slot_mapping,
                                   torch::Tensor block_tables, torch::Tensor context_lens,
                                   int64_t num_heads, int64_t num_kv_heads, double scale,
                                   int64_t window);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                        torch::Tensor w, double eps);

void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_tables, torch::Tensor q_starts, torch::Tensor q_lens,
                       torch::Tensor ctx_lens, torch::Tensor out, double scale, int64_t window);
void register_decode_plan(pybind11::module_& m);  // decode_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm_bf16", &gemm_bf16, "x @ w.T for bfloat16 weights, many rows (AVX-512; "
        "vdpbf16ps for bf16 x where the CPU has AVX512-BF16)");
  m.def("gemm_bf16_kernel", &gemm_bf16_kernel,
        "gemm_bf16 with its micro-kernel named: auto, widen (fp32 FMAs) or dot (vdpbf16ps)",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("kernel"));
  m.def("gemm_bf16_has_dot", &gemm_bf16_has_dot, "whether this CPU runs the vdpbf16ps kernel");
  m.def("gemv_bf16", &gemv_bf16, "skinny x @ w.T for bfloat16 weights (AVX-512)");
  m.def("gemv_f32", &gemv_f32, "skinny x @ w.T for float32 weights (AVX-512)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read straight from the paged KV cache", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass (float32/bfloat16)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a fused [T, 2I] projection");
  m.def("rope_neox_", &rope_neox_, "neox rotary embedding, in place");
  m.def("decode_attention_qkv", &decode_attention_qkv,
        "rotary, KV-cache write and decode attention over a fused QKV output (decode_step.cpp)",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("cache"),
        py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("add_rms_norm", &add_rms_norm, "(residual + x, RMSNorm of it) in one call");
  m.def("prefill_attention", &prefill_attention,
        "causal prefill attention of every prompt chunk of a step, from the paged KV cache "
        "(prefill_attention.cpp), into out", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("q_starts"), py::arg("q_lens"),
        py::arg("ctx_lens"), py::arg("out"), py::arg("scale"), py::arg("window") = 0);
  register_decode_plan(m);
}
