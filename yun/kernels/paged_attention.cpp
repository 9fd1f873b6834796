// Decode attention straight from the paged KV cache (one query token per sequence).
// For each (sequence, KV head): scores of the G query heads that share the KV head
// against every cached key (read block by block through the block table, no gather
// copy), softmax, then the weighted sum of values. fp32 math; fp32 or bf16 cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(load16(q + d), load16(k + d), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < D; ++d) s += q[d] * load1(k + d);
  return s;
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t D) {
  int64_t d = 0;
  const __m512 av = _mm512_set1_ps(a);
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(out + d, _mm512_fmadd_ps(av, load16(v + d), load16(out + d)));
  for (; d < D; ++d) out[d] += a * load1(v + d);
}

template <typename T>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
            T* out, int64_t B, int64_t H, int64_t KvH, int64_t D, int64_t BS, int64_t max_blocks,
            float scale, int64_t window) {
  const int64_t G = H / KvH;
  // Strides of the cache [NB, BS, KvH, D].
  const int64_t s_tok = KvH * D, s_blk = BS * KvH * D;
  at::parallel_for(0, B * KvH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KvH, h = i % KvH, len = lens[b];
      // Sliding window: the query (position len - 1) sees keys t >= len - window.
      const int64_t t0 = window > 0 && len > window ? len - window : 0, L = len - t0;
      const int64_t* table = tables + b * max_blocks;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = load1(q + (b * H + h * G + g) * D + d) * scale;
      scores.assign(G * L, 0.f);
      std::vector<float> mx(G, -INFINITY), sum(G, 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t t = t0 + j;
        const T* k = kc + table[t / BS] * s_blk + (t % BS) * s_tok + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float s = dot(qf.data() + g * D, k, D);
          scores[g * L + j] = s;
          mx[g] = std::max(mx[g], s);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < L; ++t) {
          const float e = std::exp(scores[g * L + t] - mx[g]);
          scores[g * L + t] = e;
          sum[g] += e;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t t = t0 + j;
        const T* v = vc + table[t / BS] * s_blk + (t % BS) * s_tok + h * D;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + j], v, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = out + (b * H + h * G + g) * D;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [NB, BS, KvH, D] (contiguous, q's dtype);
// block_tables: [B, max_blocks] int64; context_lens: [B] int64; window: attend to the
// last `window` positions only (sliding-window layers), 0 = all. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, H, D] and caches [NB, BS, KvH, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and lengths must be int64");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KvH = k_cache.size(2);
  TORCH_CHECK(H % KvH == 0 && k_cache.size(3) == D, "head counts or head_dim mismatch");
  auto out = torch::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    decode<float>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                  bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H,
                  KvH, D, BS, bt.size(1), static_cast<float>(scale), window);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(qc.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
                         v_cache.data_ptr<at::BFloat16>(), bt.data_ptr<int64_t>(),
                         lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(), B, H, KvH, D,
                         BS, bt.size(1), static_cast<float>(scale), window);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}
