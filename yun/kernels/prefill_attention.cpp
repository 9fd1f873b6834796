// Prefill attention straight from the paged KV cache: every prompt (or chunk of one) of a
// step in one call, causal, with an optional sliding window. Built into both kernel
// modules: the AVX-512 one (16 fp32 lanes) and the AVX2 one (8 lanes); the source is the
// same, only the vector helpers below differ.
//
// A work item is one KV head and a tile of BQ query positions of one sequence: its
// BQ x G query rows (the G query heads sharing the KV head) go through the keys KC at a
// time (64 with AVX-512, 32 with AVX2), flash-attention style: the chunk's keys
// transposed to fp32 [D][KC] once (8 x 8 register transposes) and shared by every row,
// scores from broadcast FMAs (no horizontal sums), an online
// softmax (running max and sum per row, the output rescaled when the max grows), and the
// weighted values accumulated in fp32. Items run longest first, taken off a shared
// counter, so the causal triangle's long tiles do not all land on one thread. fp32 math
// throughout; q, the cache and the output in float32 or bfloat16 (one dtype).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2/avx2.h"  // 8 x 8 transposes (both builds) and the AVX2 build's vectors
#ifdef __AVX512F__
#include "bf16.h"
#endif

namespace {

#ifdef __AVX512F__
constexpr int W = 16;  // fp32 lanes per vector
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float a) { return _mm512_set1_ps(a); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vexp(V x) { return yun::exp512(x); }
inline float vhmax(V v) { return _mm512_reduce_max_ps(v); }
inline float vhsum(V v) { return _mm512_reduce_add_ps(v); }
inline void widen_row(const uint16_t* p, float* out, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, yun::widen16(p + d));
}
#else
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float a) { return _mm256_set1_ps(a); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vexp(V x) { return yun2::exp256(x); }
inline float vhmax(V v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float vhsum(V v) { return yun2::hsum(v); }
inline void widen_row(const uint16_t* p, float* out, int64_t D) {
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, yun2::widen8(p + d));
}
#endif

constexpr int KV = 4;               // vectors per row of chunk scores
constexpr int KC = KV * W;          // keys per chunk: 64 (AVX-512), 32 (AVX2)
constexpr int RB = W == 16 ? 4 : 3; // query rows per score block (16 / 12 accumulators)
constexpr int DB = 4 * W;           // output columns per pass of the value sum
constexpr int RV = 4;               // query rows per value block (16 accumulators)
constexpr int64_t BQ = 32;          // query positions per work item

inline void to_f32(const float* p, float* out, int64_t D) { std::memcpy(out, p, D * 4); }
inline void to_f32(const at::BFloat16* p, float* out, int64_t D) {
  widen_row(reinterpret_cast<const uint16_t*>(p), out, D);
}
// 8 values of a cache row as fp32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return yun2::widen8(reinterpret_cast<const uint16_t*>(p));
}

struct Item {
  int64_t seq, head, i0, i1, cost;
};

struct Geometry {
  int64_t H, KvH, G, D, BS, max_blocks, s_qt, s_qh, s_tok, s_blk, window;
  float scale;
};

// One work item: query positions [i0, i1) of sequence `seq` (rows of the chunk; the
// chunk's first query sits at position ctx - qlen), KV head `head`.
template <typename T>
void run_item(const Item& it, const T* q, const T* kc, const T* vc, const int64_t* tables,
              const int64_t* q_starts, const int64_t* q_lens, const int64_t* ctx_lens, T* out,
              const Geometry& g, std::vector<float>& buf) {
  const int64_t G = g.G, D = g.D, nq = it.i1 - it.i0, R = nq * G;
  // Rows padded to whole score blocks: the padding's q is zero, its scores unused.
  const int64_t Rp = (R + RB - 1) / RB * RB;
  const int64_t first_pos = ctx_lens[it.seq] - q_lens[it.seq];
  const int64_t* table = tables + it.seq * g.max_blocks;
  // Per-row buffers: q (scaled), output accumulators, scores / probabilities; the chunk's
  // transposed keys and its values.
  buf.resize(Rp * D + R * D + Rp * KC + D * KC * 2 + 3 * R);
  float* qb = buf.data();
  float* ob = qb + Rp * D;
  float* pb = ob + R * D;
  float* kt = pb + Rp * KC;
  float* vb = kt + D * KC;
  float* mrow = vb + D * KC;
  float* lrow = mrow + R;
  std::fill(ob, ob + R * D, 0.f);
  std::fill(qb + R * D, qb + Rp * D, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.f;
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const T* src = q + (q_starts[it.seq] + it.i0 + i) * g.s_qt + (it.head * G + h) * g.s_qh;
      float* dst = qb + (i * G + h) * D;
      to_f32(src, dst, D);
      for (int64_t d = 0; d < D; ++d) dst[d] *= g.scale;
    }
  // Keys [lo, hi) cover every row of the tile; row i's own are [lo_i, pos_i].
  const int64_t pos0 = first_pos + it.i0, pos_last = first_pos + it.i1 - 1;
  const int64_t lo = g.window > 0 ? std::max<int64_t>(0, pos0 - g.window + 1) : 0;
  const int64_t hi = pos_last + 1;
  const T* krow[KC];
  for (int64_t t0 = lo; t0 < hi; t0 += KC) {
    const int64_t nk = std::min<int64_t>(KC, hi - t0);
    for (int64_t j = 0; j < KC; ++j) {
      if (j < nk) {
        const int64_t t = t0 + j;
        const int64_t off = table[t / g.BS] * g.s_blk + (t % g.BS) * g.s_tok + it.head * D;
        krow[j] = kc + off;
        to_f32(vc + off, vb + j * D, D);
      } else {
        krow[j] = nullptr;
        std::fill(vb + j * D, vb + (j + 1) * D, 0.f);
      }
    }
    // kt[d][j] = k_j[d]: 8 x 8 blocks transposed in registers (absent keys: zeros).
    for (int64_t j0 = 0; j0 < KC; j0 += 8)
      for (int64_t d0 = 0; d0 < D; d0 += 8) {
        __m256 r8[8];
        for (int i = 0; i < 8; ++i)
          r8[i] = krow[j0 + i] ? load8(krow[j0 + i] + d0) : _mm256_setzero_ps();
        yun2::transpose8(r8);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * KC + j0, r8[i]);
      }
    // Rows whose position is before this chunk see none of it: start past them.
    const int64_t i_first = std::max<int64_t>(0, t0 - pos0);
    const int64_t r_first = i_first * G;
    if (r_first >= R) continue;
    // Scores: s[r][j] = q_r . k_j for whole blocks of RB rows (the first may start before
    // r_first, the last run into the padding rows; neither's extra scores are read).
    for (int64_t r0 = r_first / RB * RB; r0 < R; r0 += RB) {
      V acc[RB][KV];
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < KV; ++v) acc[r][v] = vzero();
      for (int64_t d = 0; d < D; ++d) {
        V kv[KV];
        for (int v = 0; v < KV; ++v) kv[v] = vload(kt + d * KC + v * W);
        for (int r = 0; r < RB; ++r) {
          const V a = vset1(qb[(r0 + r) * D + d]);
          for (int v = 0; v < KV; ++v) acc[r][v] = vfma(a, kv[v], acc[r][v]);
        }
      }
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < KV; ++v) vstore(pb + (r0 + r) * KC + v * W, acc[r][v]);
    }
    // Online softmax per row: mask, new max, rescale, probabilities.
    for (int64_t r = r_first; r < R; ++r) {
      const int64_t pos = pos0 + r / G;
      const int64_t row_lo = g.window > 0 ? std::max<int64_t>(0, pos - g.window + 1) : 0;
      // Keys j of this chunk the row sees: [jlo, jhi).
      const int64_t jlo = std::max<int64_t>(0, row_lo - t0);
      const int64_t jhi = std::min<int64_t>(nk, pos - t0 + 1);
      float* s = pb + r * KC;
      if (jlo >= jhi) {  // none (the window has moved past this chunk)
        std::fill(s, s + KC, 0.f);
        continue;
      }
      for (int64_t j = 0; j < jlo; ++j) s[j] = -INFINITY;
      for (int64_t j = jhi; j < KC; ++j) s[j] = -INFINITY;
      V mx = vload(s);
      for (int v = 1; v < KV; ++v) mx = vmax(mx, vload(s + v * W));
      const float m_new = std::max(mrow[r], vhmax(mx));
      if (m_new > mrow[r]) {
        const float alpha = std::exp(mrow[r] - m_new);  // 0 on the row's first chunk
        lrow[r] *= alpha;
        const V av = vset1(alpha);
        float* o = ob + r * D;
        for (int64_t d = 0; d < D; d += W) vstore(o + d, vmul(av, vload(o + d)));
        mrow[r] = m_new;
      }
      const V mv = vset1(m_new);
      V sum = vzero();
      for (int v = 0; v < KV; ++v) {
        const V e = vexp(vsub(vload(s + v * W), mv));
        vstore(s + v * W, e);
        sum = vadd(sum, e);
      }
      for (int64_t j = 0; j < jlo; ++j) s[j] = 0.f;  // exp(-inf) is 0 already; be exact
      for (int64_t j = jhi; j < KC; ++j) s[j] = 0.f;
      lrow[r] += vhsum(sum);
    }
    // Weighted values: o[r] += sum_j p[r][j] v_j, RV rows x DB columns at a time.
    for (int64_t r0 = r_first; r0 < R; r0 += RV) {
      const int64_t rn = std::min<int64_t>(RV, R - r0);
      for (int64_t d0 = 0; d0 < D; d0 += DB) {
        V acc[RV][DB / W];
        for (int r = 0; r < rn; ++r)
          for (int c = 0; c < DB / W; ++c) acc[r][c] = vload(ob + (r0 + r) * D + d0 + c * W);
        for (int64_t j = 0; j < nk; ++j) {
          V vv[DB / W];
          for (int c = 0; c < DB / W; ++c) vv[c] = vload(vb + j * D + d0 + c * W);
          for (int r = 0; r < rn; ++r) {
            const V a = vset1(pb[(r0 + r) * KC + j]);
            for (int c = 0; c < DB / W; ++c) acc[r][c] = vfma(a, vv[c], acc[r][c]);
          }
        }
        for (int r = 0; r < rn; ++r)
          for (int c = 0; c < DB / W; ++c) vstore(ob + (r0 + r) * D + d0 + c * W, acc[r][c]);
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const int64_t r = i * G + h;
      const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
      T* dst = out + ((q_starts[it.seq] + it.i0 + i) * g.H + it.head * G + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(ob[r * D + d] * inv);
    }
}

template <typename T>
void run_all(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
             const torch::Tensor& tables, const torch::Tensor& q_starts,
             const torch::Tensor& q_lens, const torch::Tensor& ctx_lens, torch::Tensor& out,
             const Geometry& g) {
  const int64_t P = q_starts.size(0);
  const int64_t* qs = q_starts.data_ptr<int64_t>();
  const int64_t* ql = q_lens.data_ptr<int64_t>();
  const int64_t* cl = ctx_lens.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i0 = 0; i0 < ql[p]; i0 += BQ) {
      const int64_t i1 = std::min(ql[p], i0 + BQ);
      const int64_t keys_end = cl[p] - ql[p] + i1;  // the tile's last row sees this many
      const int64_t keys = g.window > 0 ? std::min(keys_end, g.window + (i1 - i0)) : keys_end;
      for (int64_t h = 0; h < g.KvH; ++h) items.push_back({p, h, i0, i1, keys * (i1 - i0)});
    }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> buf;
    for (int64_t i = next++; i < n; i = next++)
      run_item<T>(items[i], qp, kp, vp, tp, qs, ql, cl, op, g, buf);
  });
}

}  // namespace

// q: [T, H, D] (rows of the step's flat batch; a strided view is fine, D contiguous);
// k_cache, v_cache: [NB, BS, KvH, D] contiguous, q's dtype (float32 or bfloat16), the
// step's keys and values already written; block_tables: [P, max_blocks] int64; q_starts,
// q_lens, ctx_lens: [P] int64 per prefill sequence (its first row in q, rows this step,
// cached tokens after this step); out: [T, H, D] contiguous, q's dtype: the prefill rows
// are written, the others left as they are. window: attend to the last `window`
// positions only, 0 = all. D must be a multiple of 64 (the callers fall back to torch).
void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_tables, torch::Tensor q_starts, torch::Tensor q_lens,
                       torch::Tensor ctx_lens, torch::Tensor out, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, H, D] with D contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [NB, BS, KvH, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "q, the caches and out must share one dtype");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes(), "out must be contiguous, q's shape");
  for (const auto* t : {&block_tables, &q_starts, &q_lens, &ctx_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "block tables and lengths must be contiguous int64");
  const int64_t H = q.size(1), D = q.size(2), KvH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KvH == 0, "head counts or head_dim mismatch");
  TORCH_CHECK(D % 64 == 0, "prefill_attention needs head_dim a multiple of 64, got ", D);
  const int64_t P = q_starts.size(0);
  TORCH_CHECK(q_lens.size(0) == P && ctx_lens.size(0) == P && block_tables.dim() == 2 &&
                  block_tables.size(0) == P,
              "one block table row and one length each per sequence");
  const int64_t BS = k_cache.size(1);
  const int64_t* qs = q_starts.data_ptr<int64_t>();
  const int64_t* ql = q_lens.data_ptr<int64_t>();
  const int64_t* cl = ctx_lens.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(qs[p] >= 0 && ql[p] >= 0 && qs[p] + ql[p] <= q.size(0) && cl[p] >= ql[p] &&
                    (cl[p] + BS - 1) / BS <= block_tables.size(1),
                "prefill ", p, ": rows or context out of range");
  const Geometry g{H, KvH, H / KvH, D, BS, block_tables.size(1), q.stride(0), q.stride(1),
                   KvH * D, BS * KvH * D, window, static_cast<float>(scale)};
  if (q.scalar_type() == at::kFloat) {
    run_all<float>(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, out, g);
  } else if (q.scalar_type() == at::kBFloat16) {
    run_all<at::BFloat16>(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, out, g);
  } else {
    TORCH_CHECK(false, "prefill_attention supports float32 and bfloat16");
  }
}
