// Decode attention straight from the paged KV cache on x86 CPUs with AVX2 + FMA (the
// AVX-512 kernel's twin, yun/kernels/paged_attention.cpp, with 8-lane vectors).
// For each (sequence, KV head): scores of the G query heads sharing the KV head against
// every cached key (read block by block through the block table, no gather copy),
// softmax, then the weighted sum of values. fp32 math; fp32, bf16 or int8 cache (an int8
// row: D values then their float32 scale, as in the AVX-512 kernel).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "avx2.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return yun2::widen8(reinterpret_cast<const uint16_t*>(p));
}
inline __m256 load8(const int8_t* p) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }

// The scale of one cache row of D values: 1 for float rows, the trailing float32 of an
// int8 row.
inline float row_scale(const float*, int64_t) { return 1.f; }
inline float row_scale(const at::BFloat16*, int64_t) { return 1.f; }
inline float row_scale(const int8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, sizeof s);
  return s;
}
template <typename C> constexpr int64_t row_extra() { return 0; }
template <> constexpr int64_t row_extra<int8_t>() { return 4; }

// The cache row of position t for the head at offset h_off, through the block table (the
// cache is [NB, BS, KvH, row] with strides s_blk, s_tok).
template <typename C>
inline const C* cache_row(const C* cache, const int64_t* table, int64_t t, int64_t BS,
                          int64_t s_tok, int64_t s_blk, int64_t h_off) {
  return cache + table[t / BS] * s_blk + (t % BS) * s_tok + h_off;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(load8(q + d), load8(k + d), acc);
  float s = yun2::hsum(acc);
  for (; d < D; ++d) s += q[d] * load1(k + d);
  return s;
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t D) {
  int64_t d = 0;
  const __m256 av = _mm256_set1_ps(a);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(av, load8(v + d), load8(out + d)));
  for (; d < D; ++d) out[d] += a * load1(v + d);
}

template <typename T, typename C>
void decode(const T* q, const C* kc, const C* vc, const int64_t* tables, const int64_t* lens,
            T* out, int64_t B, int64_t H, int64_t KvH, int64_t D, int64_t BS, int64_t max_blocks,
            float scale, int64_t window) {
  const int64_t G = H / KvH;
  // Strides of the cache [NB, BS, KvH, D (+ 4 scale bytes for int8)].
  const int64_t s_head = D + row_extra<C>(), s_tok = KvH * s_head, s_blk = BS * s_tok;
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
        const C* k = cache_row(kc, table, t, BS, s_tok, s_blk, h * s_head);
        const float ks = row_scale(k, D);
        for (int64_t g = 0; g < G; ++g) {
          const float s = dot(qf.data() + g * D, k, D) * ks;
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
        const C* v = cache_row(vc, table, t, BS, s_tok, s_blk, h * s_head);
        const float vs = row_scale(v, D);
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + j] * vs, v, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = out + (b * H + h * G + g) * D;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

// The same attention for head_dim D = 8 * ND (32, 64, 128), as the AVX-512 build's fast path:
// each query head's value sum in ND registers (8 of 16 at D = 64), the softmax's exp
// 8 lanes at a time, sums in the generic loop's order (only exp's last bit can differ).
template <int ND, typename C>
inline float head_scores(const float* qf, const C* kc, const int64_t* table, int64_t t0,
                         int64_t L, int64_t BS, int64_t s_tok, int64_t s_blk, int64_t h_off,
                         float* scores) {
  float m = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    const int64_t t = t0 + j;
    const C* k = cache_row(kc, table, t, BS, s_tok, s_blk, h_off);
    __m256 acc = _mm256_setzero_ps();
    for (int n = 0; n < ND; ++n) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qf + n * 8), load8(k + n * 8), acc);
    const float sc = yun2::hsum(acc) * row_scale(k, ND * 8);
    scores[j] = sc;
    m = std::max(m, sc);
  }
  return m;
}

inline float softmax_numerators(float* s, int64_t L, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 e = yun2::exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = yun2::hsum(sum);
  for (; t < L; ++t) {  // the tail, lane by lane through the same polynomial
    const float e = _mm256_cvtss_f32(yun2::exp256(_mm256_set1_ps(s[t] - mx)));
    s[t] = e;
    total += e;
  }
  return total;
}

// The value sums of lanes [8 * N0, 8 * (N0 + NP)) of a D = 8 * ND head: NP registers. At
// D = 128 the 16 sums would take every AVX2 register, so they run as two halves of 8
// (each half re-reads its values; the order of each lane's sum is unchanged).
template <int ND, int NP, int N0, typename C>
inline void head_values(const float* p, const C* vc, const int64_t* table, int64_t t0,
                        int64_t L, int64_t BS, int64_t s_tok, int64_t s_blk, int64_t h_off,
                        float* acc_out) {
  __m256 acc[NP];
  for (int n = 0; n < NP; ++n) acc[n] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    const int64_t t = t0 + j;
    const C* v = cache_row(vc, table, t, BS, s_tok, s_blk, h_off);
    const __m256 a = _mm256_set1_ps(p[j] * row_scale(v, ND * 8));
    for (int n = 0; n < NP; ++n) acc[n] = _mm256_fmadd_ps(a, load8(v + (N0 + n) * 8), acc[n]);
  }
  for (int n = 0; n < NP; ++n) _mm256_storeu_ps(acc_out + (N0 + n) * 8, acc[n]);
}

template <int ND, typename T, typename C>
void decode_fast(const T* q, const C* kc, const C* vc, const int64_t* tables,
                 const int64_t* lens, T* out, int64_t B, int64_t H, int64_t KvH, int64_t BS,
                 int64_t max_blocks, float scale, int64_t window) {
  constexpr int64_t D = ND * 8;
  const int64_t G = H / KvH;
  const int64_t s_head = D + row_extra<C>(), s_tok = KvH * s_head, s_blk = BS * s_tok;
  at::parallel_for(0, B * KvH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(D), acc(D), scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KvH, h = i % KvH, len = lens[b];
      const int64_t t0 = window > 0 && len > window ? len - window : 0, L = len - t0;
      const int64_t* table = tables + b * max_blocks;
      scores.resize(L);
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = q + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[d] = load1(qg + d) * scale;
        const float mx = head_scores<ND>(qf.data(), kc, table, t0, L, BS, s_tok, s_blk,
                                         h * s_head, scores.data());
        const float inv = 1.f / softmax_numerators(scores.data(), L, mx);
        if constexpr (ND <= 8) {
          head_values<ND, ND, 0>(scores.data(), vc, table, t0, L, BS, s_tok, s_blk,
                                 h * s_head, acc.data());
        } else {
          static_assert(ND % 2 == 0, "split value sums need an even register count");
          head_values<ND, ND / 2, 0>(scores.data(), vc, table, t0, L, BS, s_tok, s_blk,
                                     h * s_head, acc.data());
          head_values<ND, ND / 2, ND / 2>(scores.data(), vc, table, t0, L, BS, s_tok, s_blk,
                                          h * s_head, acc.data());
        }
        T* o = out + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

template <typename T, typename C>
void decode_any(const T* q, const C* kc, const C* vc, const int64_t* tables, const int64_t* lens,
                T* out, int64_t B, int64_t H, int64_t KvH, int64_t D, int64_t BS,
                int64_t max_blocks, float scale, int64_t window) {
  switch (D) {
    case 32: return decode_fast<4>(q, kc, vc, tables, lens, out, B, H, KvH, BS, max_blocks, scale, window);
    case 64: return decode_fast<8>(q, kc, vc, tables, lens, out, B, H, KvH, BS, max_blocks, scale, window);
    case 128: return decode_fast<16>(q, kc, vc, tables, lens, out, B, H, KvH, BS, max_blocks, scale, window);
    default: return decode(q, kc, vc, tables, lens, out, B, H, KvH, D, BS, max_blocks, scale, window);
  }
}

template <typename T>
void dispatch_cache(const torch::Tensor& q, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const torch::Tensor& bt,
                    const torch::Tensor& lens, torch::Tensor& out, int64_t D, double scale,
                    int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), BS = k_cache.size(1), KvH = k_cache.size(2);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  if (k_cache.scalar_type() == at::kChar) {
    decode_any<T, int8_t>(qp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                      bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), op, B, H, KvH, D, BS,
                      bt.size(1), static_cast<float>(scale), window);
  } else {
    TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
    decode_any<T, T>(qp, k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), bt.data_ptr<int64_t>(),
                 lens.data_ptr<int64_t>(), op, B, H, KvH, D, BS, bt.size(1),
                 static_cast<float>(scale), window);
  }
}

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [NB, BS, KvH, D] (contiguous, q's dtype) or int8
// [NB, BS, KvH, D + 4] (D int8 values and their float32 scale per row);
// block_tables: [B, max_blocks] int64; context_lens: [B] int64; window: attend to the
// last `window` positions only (sliding-window layers), 0 = all. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, H, D] and caches [NB, BS, KvH, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and lengths must be int64");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t H = q.size(1), D = q.size(2), KvH = k_cache.size(2);
  const int64_t extra = k_cache.scalar_type() == at::kChar ? 4 : 0;
  TORCH_CHECK(H % KvH == 0 && k_cache.size(3) == D + extra, "head counts or head_dim mismatch");
  auto out = torch::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    dispatch_cache<float>(qc, k_cache, v_cache, bt, lens, out, D, scale, window);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_cache<at::BFloat16>(qc, k_cache, v_cache, bt, lens, out, D, scale, window);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}
