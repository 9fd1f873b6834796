// Matmuls against GGUF-quantized weights, read as stored: y = x @ W.T (+ bias) for
// W [N, K] in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K.
//
// The activation is quantized once per call to int8 blocks of 32 (one float scale each,
// plus block sums), and every weight chunk is dotted against it with integer products
// (see quant.h). Decode reads each weight once per token, so it is bound by bandwidth; the
// integer form reads 4-8x fewer bytes than fp32 and does the arithmetic in int8.
//
// One module, several code paths chosen at run time: each path is compiled under its own
// target pragma (no global -m flags, so the module loads on any x86-64 and builds on
// aarch64), and `isas()` lists those this CPU can run, best first:
//   avx512-vnni  AVX-512 F/BW/VL + VNNI (vpdpbusd)      e.g. Zen 4, Ice Lake and later
//   avx512       AVX-512 F/BW/VL, vpmaddubsw            e.g. Skylake-X
//   avx2-vnni    AVX2 + AVX-VNNI (256-bit vpdpbusd)    e.g. Alder Lake, Zen 5
//   avx2         AVX2 + FMA + F16C                      e.g. Zen 2/3, Haswell
//   scalar       portable C++                           anything, aarch64 included
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "quant.h"

using namespace yunq;

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")
#define YQ_NS avx512vnni
#define YQ_VNNI 1
#include "quant_avx512.h"
#undef YQ_NS
#undef YQ_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi2")
#define YQ_NS avx512
#define YQ_VNNI 0
#include "quant_avx512.h"
#undef YQ_NS
#undef YQ_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,avxvnni,fma,f16c")
#define YQ_NS avx2vnni
#define YQ_VNNI 1
#include "quant_avx2.h"
#undef YQ_NS
#undef YQ_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define YQ_NS avx2
#define YQ_VNNI 0
#include "quant_avx2.h"
#undef YQ_NS
#undef YQ_VNNI
#pragma GCC pop_options
#endif

namespace scalar {

// A chunk as integers v (unsigned, or signed for Q8_0) and per-group W = a * v + c.
template <int QT> void decode(const uint8_t* p, int16_t* v, float* a, float* c);

template <> void decode<Q4_0>(const uint8_t* p, int16_t* v, float* a, float* c) {
  for (int b = 0; b < 8; ++b, p += 18) {
    a[b] = half_to_float(ld16(p));
    c[b] = -8.f * a[b];
    for (int i = 0; i < 16; ++i) v[32 * b + i] = p[2 + i] & 15, v[32 * b + 16 + i] = p[2 + i] >> 4;
  }
}

template <> void decode<Q4_1>(const uint8_t* p, int16_t* v, float* a, float* c) {
  for (int b = 0; b < 8; ++b, p += 20) {
    a[b] = half_to_float(ld16(p));
    c[b] = half_to_float(ld16(p + 2));
    for (int i = 0; i < 16; ++i) v[32 * b + i] = p[4 + i] & 15, v[32 * b + 16 + i] = p[4 + i] >> 4;
  }
}

template <> void decode<Q5_0>(const uint8_t* p, int16_t* v, float* a, float* c) {
  for (int b = 0; b < 8; ++b, p += 22) {
    a[b] = half_to_float(ld16(p));
    c[b] = -16.f * a[b];
    const uint32_t qh = ld32(p + 2);
    for (int i = 0; i < 16; ++i) {
      v[32 * b + i] = (p[6 + i] & 15) | (((qh >> i) & 1) << 4);
      v[32 * b + 16 + i] = (p[6 + i] >> 4) | (((qh >> (16 + i)) & 1) << 4);
    }
  }
}

template <> void decode<Q5_1>(const uint8_t* p, int16_t* v, float* a, float* c) {
  for (int b = 0; b < 8; ++b, p += 24) {
    a[b] = half_to_float(ld16(p));
    c[b] = half_to_float(ld16(p + 2));
    const uint32_t qh = ld32(p + 4);
    for (int i = 0; i < 16; ++i) {
      v[32 * b + i] = (p[8 + i] & 15) | (((qh >> i) & 1) << 4);
      v[32 * b + 16 + i] = (p[8 + i] >> 4) | (((qh >> (16 + i)) & 1) << 4);
    }
  }
}

template <> void decode<Q8_0>(const uint8_t* p, int16_t* v, float* a, float* c) {
  for (int b = 0; b < 8; ++b, p += 34) {
    a[b] = half_to_float(ld16(p));
    c[b] = 0.f;
    for (int i = 0; i < 32; ++i) v[32 * b + i] = static_cast<int8_t>(p[2 + i]);
  }
}

void k4_affine(const uint8_t* p, float* a, float* c) {
  const Bytes16 sm = unpack_k4_scales(p + 4);
  const float d = half_to_float(ld16(p)), dmin = half_to_float(ld16(p + 2));
  for (int g = 0; g < 8; ++g) a[g] = d * byte_of(sm, g), c[g] = -dmin * byte_of(sm, 8 + g);
}

template <> void decode<Q4_K>(const uint8_t* p, int16_t* v, float* a, float* c) {
  k4_affine(p, a, c);
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 32; ++l) {
      const uint8_t q = p[16 + 32 * j + l];
      v[64 * j + l] = q & 15, v[64 * j + 32 + l] = q >> 4;
    }
}

template <> void decode<Q5_K>(const uint8_t* p, int16_t* v, float* a, float* c) {
  k4_affine(p, a, c);
  const uint8_t* qh = p + 16;
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 32; ++l) {
      const uint8_t q = p[48 + 32 * j + l];
      v[64 * j + l] = (q & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
      v[64 * j + 32 + l] = (q >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
    }
}

template <> void decode<Q6_K>(const uint8_t* p, int16_t* v, float* a, float* c) {
  const float d = half_to_float(ld16(p + 208));
  for (int g = 0; g < 16; ++g) a[g] = d * static_cast<int8_t>(p[192 + g]), c[g] = -32.f * a[g];
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = p + 64 * h;
    const uint8_t* qh = p + 128 + 32 * h;
    int16_t* o = v + 128 * h;
    for (int l = 0; l < 32; ++l) {
      o[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
      o[32 + l] = (ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4);
      o[64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      o[96 + l] = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

template <> void decode<Q3_K>(const uint8_t* p, int16_t* v, float* a, float* c) {
  const Bytes16 sc = unpack_q3k_scales(p + 96);
  const float d = half_to_float(ld16(p + 108));
  for (int g = 0; g < 16; ++g) a[g] = d * (byte_of(sc, g) - 32), c[g] = -4.f * a[g];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l)
        v[128 * i + 32 * j + l] = ((p[32 + 32 * i + l] >> (2 * j)) & 3) | (((p[l] >> (4 * i + j)) & 1) << 2);
}

template <> void decode<Q2_K>(const uint8_t* p, int16_t* v, float* a, float* c) {
  const float d = half_to_float(ld16(p + 80)), dmin = half_to_float(ld16(p + 82));
  for (int g = 0; g < 16; ++g) a[g] = d * (p[g] & 15), c[g] = -dmin * (p[g] >> 4);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) v[128 * i + 32 * j + l] = (p[16 + 32 * i + l] >> (2 * j)) & 3;
}

template <int QT, bool W16>
struct Kern {
  static constexpr int kMaxRows = 4;
  static constexpr int NG = Format<QT>::groups, GS = kChunk / NG;

  template <int MB>
  static void rows(const Job& j, int64_t n, int64_t m0) {
    constexpr int CB = chunk_bytes<QT>();
    const int64_t kp = j.x.kp, gpr = kp / GS;
    const float* dg = (NG == 8 ? j.x.d32 : j.x.d16) + m0 * gpr;
    const float* sg = (NG == 8 ? j.x.s32 : j.x.s16) + m0 * gpr;
    const uint8_t* w = j.w + n * j.row_bytes;
    float acc[MB] = {};
    uint8_t tail[CB];
    int16_t v[kChunk];
    float a[NG], c[NG];
    for (int64_t ch = 0; ch < j.chunks; ++ch) {
      const uint8_t* p = w + ch * CB;
      if (j.tail_bytes && ch == j.chunks - 1) {  // partial: zero blocks add nothing
        std::memset(tail, 0, CB);
        std::memcpy(tail, p, j.tail_bytes);
        p = tail;
      }
      decode<QT>(p, v, a, c);
      for (int m = 0; m < MB; ++m) {
        const int64_t x0 = (m0 + m) * kp + ch * kChunk;  // kp, kChunk: multiples of 64
        for (int g = 0; g < NG; ++g) {
          int32_t dot = 0;  // int16: |v| <= 255, |x| <= 32767, 32 products < 2^29
          for (int i = 0; i < GS; ++i)
            dot += v[GS * g + i] * (W16 ? j.x.q16[x0 + pos16(GS * g + i)] : j.x.q[x0 + GS * g + i]);
          const int64_t gi = m * gpr + ch * NG + g;
          acc[m] += a[g] * dg[gi] * static_cast<float>(dot) + c[g] * sg[gi];
        }
      }
    }
    const float b = j.bias ? j.bias[n] : 0.f;
    for (int m = 0; m < MB; ++m) j.y[(m0 + m) * j.ldy + n] = acc[m] + b;
  }

  static int row(int mb, const Job& j, int64_t n, int64_t, int64_t m0) {
    switch (mb) {
      case 1: rows<1>(j, n, m0); break;
      case 2: rows<2>(j, n, m0); break;
      default: rows<4>(j, n, m0); break;
    }
    return 1;
  }
};

template <bool W16>
void run_mode(const Job& j, int qtype, int64_t n0, int64_t n1) {
  with_type(qtype, [&](auto t) { drive<Kern<decltype(t)::value, W16>>(j, n0, n1); });
}

void run(const Job& j, int qtype, int64_t n0, int64_t n1) {
  if (j.x.q16) run_mode<true>(j, qtype, n0, n1);
  else run_mode<false>(j, qtype, n0, n1);
}

inline float round_half_even(float v) {  // exact for |v| < 2^22; |v| <= 127 here
  return (v + 12582912.f) - 12582912.f;
}

// One row of x: K floats -> q, d and sums per block (see Act), zeros from K to kp. Returns
// false if x has an inf or nan (the caller then makes the row's outputs nan).
bool quantize_row(const float* x, int64_t K, int64_t kp, int8_t* q, float* d32, float* d16,
                  float* s32, float* s16) {
  float probe = 0.f;  // nan if any x is inf or nan
  for (int64_t b = 0; b < kp / 32; ++b) {
    int8_t* qb = q + 32 * b;
    if (32 * b >= K) {
      std::memset(qb, 0, 32);
      d32[b] = s32[b] = d16[2 * b] = d16[2 * b + 1] = s16[2 * b] = s16[2 * b + 1] = 0.f;
      continue;
    }
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i])), probe += xb[i] * 0.f;
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int s0 = 0, s1 = 0;
    for (int i = 0; i < 32; ++i) {
      const float r = std::min(127.f, std::max(-127.f, round_half_even(xb[i] * id)));
      const int v = static_cast<int>(r);
      qb[i] = static_cast<int8_t>(v);
      (i < 16 ? s0 : s1) += v;
    }
    d32[b] = d16[2 * b] = d16[2 * b + 1] = d;
    s16[2 * b] = d * s0;
    s16[2 * b + 1] = d * s1;
    s32[b] = d * (s0 + s1);
  }
  return probe == 0.f;
}

// The int16 mode (quant.h): d = max|x| / 32767, q at pos16 (|v| < 2^22: round_half_even holds).
bool quantize_row16(const float* x, int64_t K, int64_t kp, int16_t* q, float* d32, float* d16,
                    float* s32, float* s16) {
  float probe = 0.f;
  for (int64_t b = 0; b < kp / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    if (32 * b < K)
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i])), probe += xb[i] * 0.f;
    const float d = amax / 32767.f, id = amax > 0.f ? 32767.f / amax : 0.f;
    int s0 = 0, s1 = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = 32 * b < K ? static_cast<int>(std::min(32767.f, std::max(-32767.f, round_half_even(xb[i] * id)))) : 0;
      q[pos16(32 * b + i)] = static_cast<int16_t>(v);
      (i < 16 ? s0 : s1) += v;
    }
    d32[b] = d16[2 * b] = d16[2 * b + 1] = d;
    s16[2 * b] = d * s0;
    s16[2 * b + 1] = d * s1;
    s32[b] = d * (s0 + s1);
  }
  return probe == 0.f;
}

// Rows [n0, n1) of W as Out [N, K] (float32, or bfloat16 rounded to nearest even): the
// weights a * v + c of each group, as the kernels' `decode` gives them. For the many-row
// matmuls (yun/layers/quantized.py): one dequantization per call, reused by every row of x.
template <int QT, typename Out>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1,
                  Out* out) {
  constexpr int CB = chunk_bytes<QT>();
  constexpr int NG = Format<QT>::groups, GS = kChunk / NG;
  const int64_t nblocks = K / Format<QT>::block, per_chunk = kChunk / Format<QT>::block;
  const int64_t chunks = (nblocks + per_chunk - 1) / per_chunk;
  const int64_t tail_bytes = nblocks % per_chunk * Format<QT>::bytes;
  int16_t v[kChunk];
  float a[NG], c[NG];
  uint8_t tail[CB];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* dst = out + n * K;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint8_t* p = row + ch * CB;
      if (tail_bytes && ch == chunks - 1) {
        std::memset(tail, 0, CB);
        std::memcpy(tail, p, tail_bytes);
        p = tail;
      }
      scalar::decode<QT>(p, v, a, c);
      const int64_t k0 = ch * kChunk, groups = std::min<int64_t>(kChunk, K - k0) / GS;
      for (int64_t g = 0; g < groups; ++g) {  // K is a multiple of the block, so of GS
        const float ag = a[g], cg = c[g];
        Out* d = dst + k0 + g * GS;
        for (int i = 0; i < GS; ++i) store_value(ag * static_cast<float>(v[g * GS + i]) + cg, d + i);
      }
    }
  }
}

void dequant(const uint8_t* w, int64_t rb, int64_t K, int qtype, int64_t n0, int64_t n1,
             void* out, bool f32) {
  with_type_and_out(qtype, out, f32, [&](auto t, auto* dst) {
    dequant_rows<decltype(t)::value>(w, rb, K, n0, n1, dst);
  });
}

}  // namespace scalar

namespace {

using RunFn = void (*)(const Job&, int, int64_t, int64_t);
using QuantizeFn = bool (*)(const float*, int64_t, int64_t, int8_t*, float*, float*, float*, float*);
using Quantize16Fn = bool (*)(const float*, int64_t, int64_t, int16_t*, float*, float*, float*, float*);
// (w, row_bytes, K, qtype, n0, n1, out, f32): rows [n0, n1) of W as float32 (f32) or
// bfloat16 (dequantize_f32, dequantize_bf16)
using DequantFn = void (*)(const uint8_t*, int64_t, int64_t, int, int64_t, int64_t, void*, bool);

struct Path {
  const char* name;
  RunFn run;
  QuantizeFn quantize;  // one row of x (every path gives the same bits; AVX-512 machines
                        // use AVX2's: Zen 4's down-converting stores are slow)
  Quantize16Fn quantize16;  // the same, for the int16 mode
  DequantFn dequant;
  bool (*runnable)();
};

#if defined(__x86_64__)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
bool has_avx512_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
bool has_avx2_vnni() { return has_avx2() && __builtin_cpu_supports("avxvnni"); }
#endif
bool always() { return true; }

// Best first.
const Path kPaths[] = {
#if defined(__x86_64__)
    {"avx512-vnni", avx512vnni::run, avx2::quantize_row, avx2::quantize_row16, avx512vnni::dequant,
     has_avx512_vnni},
    {"avx512", avx512::run, avx2::quantize_row, avx2::quantize_row16, avx512::dequant, has_avx512},
    {"avx2-vnni", avx2vnni::run, avx2vnni::quantize_row, avx2vnni::quantize_row16, avx2vnni::dequant,
     has_avx2_vnni},
    {"avx2", avx2::run, avx2::quantize_row, avx2::quantize_row16, avx2::dequant, has_avx2},
#endif
    {"scalar", scalar::run, scalar::quantize_row, scalar::quantize_row16, scalar::dequant, always},
};

const Path& find_path(const std::string& isa) {
  for (const Path& p : kPaths)
    if (isa == p.name) {
      TORCH_CHECK(p.runnable(), "quantized matmul path '", isa, "' cannot run on this CPU");
      return p;
    }
  TORCH_CHECK(false, "unknown quantized matmul path '", isa, "'");
}

// The path `isa` names, or ("") the first path this CPU runs (the list ends with the
// scalar one, which runs anywhere).
const Path& path_or_best(const std::string& isa) {
  if (!isa.empty()) return find_path(isa);
  for (const Path& p : kPaths)
    if (p.runnable()) return p;
  return kPaths[sizeof(kPaths) / sizeof(kPaths[0]) - 1];
}

struct Format_ { int block, bytes; };

Format_ format_of(int64_t qtype) {
  Format_ out{0, 0};
  with_type(static_cast<int>(qtype), [&](auto t) {
    using F = Format<decltype(t)::value>;
    out = {F::block, F::bytes};
  });
  TORCH_CHECK(out.block > 0, "quantized type ", qtype, " has no native kernel");
  return out;
}

// How decode (M <= 8) prefetches the weights, by CPU vendor.
//   AMD (Zen 4): the next pass into L1, rows of 768 bytes or more only: it doubles the speed
//     of long rows (Q4_K K=6144: 10 -> 20 GB/s), where 4 row streams at once defeat the
//     hardware prefetcher, and slows short ones (Q8_0 K=576: 18 -> 13 GB/s).
//   Intel: every row, 3 passes ahead, into L2. Measured on a Xeon with AMX only (2 threads,
//     `scripts/bench_quant.py --cold`: SmolLM2-135M's 120 decode matrices, avx512-vnni/int16,
//     GB/s in huge pages): Q8_0 21.5-21.9 -> 28-32, Q5_0 19-20 -> 22.6-23.3, Q4_1 21.4-22.2
//     -> 23.2-24.1; 2 or 5+ passes ahead and L1 did no better.
struct Prefetch { int64_t min_row_bytes; int ahead; bool l2; };

const Prefetch& prefetch_policy() {
#if defined(__x86_64__)
  static const Prefetch p = __builtin_cpu_is("intel") ? Prefetch{0, 3, true} : Prefetch{768, 1, false};
#else
  static const Prefetch p{768, 1, false};
#endif
  return p;
}

// Owns the quantized activation (see Act in quant.h): q in the int8 mode, q16 in the int16.
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<int16_t> q16;
  std::vector<float> d32, d16, s32, s16;
  Act view(int64_t kp) const {
    return {q.empty() ? nullptr : q.data(), q16.empty() ? nullptr : q16.data(), d32.data(), d16.data(),
            s32.data(), s16.data(), kp};
  }
};

// The activation modes: "int8" (llama.cpp's numerics) or "int16" (~300x finer rounding).
bool wide_activations(const std::string& activations) {
  TORCH_CHECK(activations == "int8" || activations == "int16", "unknown activation mode '", activations,
              "' (int8 or int16)");
  return activations == "int16";
}

ActBuf quantize_activation(const torch::Tensor& x, int64_t K, int64_t kp, const Path& path, bool wide) {
  const int64_t M = x.size(0);
  ActBuf a;
  (wide ? a.q16.resize(M * kp) : a.q.resize(M * kp));
  a.d32.resize(M * kp / 32);
  a.s32.resize(M * kp / 32);
  a.d16.resize(M * kp / 16);
  a.s16.resize(M * kp / 16);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  torch::Tensor xc = bf16 || x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  const auto* xb = bf16 ? reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) : nullptr;
  const float* xf = bf16 ? nullptr : xc.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(bf16 ? K : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = xf ? xf + r * K : row.data();
      if (bf16)
        for (int64_t i = 0; i < K; ++i) {
          const uint32_t u = static_cast<uint32_t>(xb[r * K + i]) << 16;
          std::memcpy(&row[i], &u, 4);
        }
      float* d32 = a.d32.data() + r * kp / 32;
      float* d16 = a.d16.data() + r * kp / 16;
      float* s32 = a.s32.data() + r * kp / 32;
      float* s16 = a.s16.data() + r * kp / 16;
      const bool finite = wide ? path.quantize16(src, K, kp, a.q16.data() + r * kp, d32, d16, s32, s16)
                               : path.quantize(src, K, kp, a.q.data() + r * kp, d32, d16, s32, s16);
      if (!finite) {
        // An inf or nan in x: this row's outputs are nan, as a float matmul's would be (or inf).
        std::fill(d32, d32 + kp / 32, std::numeric_limits<float>::quiet_NaN());
        std::fill(d16, d16 + kp / 16, std::numeric_limits<float>::quiet_NaN());
      }
    }
  });
  return a;
}

int64_t padded(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk; }

void check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  const Format_ f = format_of(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "w must be a contiguous 2-D uint8 CPU tensor [N, row_bytes]");
  TORCH_CHECK(K > 0 && K % f.block == 0, "K=", K, " is not a multiple of the block size ", f.block);
  TORCH_CHECK(w.size(1) == K / f.block * f.bytes, "K=", K, " needs ", K / f.block * f.bytes,
              " bytes per row, w has ", w.size(1));
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.device().is_cpu(), "x must be a CPU tensor [M, K]");
}

// Out as y's dtype: bf16 rounds to nearest even, as .to(torch.bfloat16) does.
void store_output(const std::vector<float>& buf, torch::Tensor& y) {
  auto* dst = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  for (size_t i = 0; i < buf.size(); ++i) {
    if (std::isnan(buf[i])) dst[i] = 0x7FC0;
    else store_value(buf[i], dst + i);
  }
}

}  // namespace

// x [M, K] (float32 or bfloat16) @ W.T + bias, W [N, row_bytes] quantized -> [M, N] in x's
// dtype (other float dtypes: computed in float32, returned as float32).
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t K,
                     c10::optional<torch::Tensor> bias, const std::string& isa,
                     const std::string& activations) {
  check_inputs(x, w, qtype, K);
  const Path& path = find_path(isa);
  const Format_ f = format_of(qtype);
  const int64_t M = x.size(0), N = w.size(0), kp = padded(K);
  const ActBuf act = quantize_activation(x, K, kp, path, wide_activations(activations));
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N=", N, " values");
    bf = bias->to(at::kFloat).contiguous();
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  std::vector<float> ybuf(bf16 ? M * N : 0);
  const int64_t blocks_per_chunk = kChunk / f.block, nblocks = K / f.block;
  Job j;
  j.w = w.data_ptr<uint8_t>();
  j.row_bytes = w.size(1);
  j.chunks = (nblocks + blocks_per_chunk - 1) / blocks_per_chunk;
  j.tail_bytes = nblocks % blocks_per_chunk * f.bytes;
  j.x = act.view(kp);
  j.rows = M;
  j.y = bf16 ? ybuf.data() : y.data_ptr<float>();
  j.ldy = N;
  j.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
  // Decode: small tiles spread the rows evenly over threads. Many rows: larger tiles, so
  // the activation (re-read once per tile) is read fewer times.
  j.n_tile = M <= 8 ? 16 : 64;
  // Many rows of x: the weights are in cache after the first block of rows, no prefetch.
  const Prefetch& pf = prefetch_policy();
  const bool fetch = M <= 8 && j.row_bytes >= pf.min_row_bytes;
  j.prefetch_ahead = fetch ? pf.ahead : 0;
  j.prefetch_l2 = pf.l2;
  const int64_t tiles = (N + j.n_tile - 1) / j.n_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    path.run(j, static_cast<int>(qtype), t0 * j.n_tile, std::min(N, t1 * j.n_tile));
  });
  if (bf16) store_output(ybuf, y);
  return y;
}

// W [N, row_bytes] quantized -> [N, K] float32 (f32) or bfloat16, for the many-row matmuls
// (yun/layers/quantized.py). `isa` picks the code path as in `matmul` ("" = the best this
// CPU runs): the SIMD paths decode 16 (AVX-512) or 8 (AVX2) values a step, the scalar one
// one; every path gives the same bits.
torch::Tensor dequantize(torch::Tensor w, int64_t qtype, int64_t K, const std::string& isa, bool f32) {
  check_weight(w, qtype, K);
  const int64_t N = w.size(0);
  torch::Tensor out = torch::empty({N, K}, w.options().dtype(f32 ? at::kFloat : at::kBFloat16));
  void* dst = out.data_ptr();
  const uint8_t* src = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  const DequantFn fn = path_or_best(isa).dequant;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    fn(src, rb, K, static_cast<int>(qtype), n0, n1, dst, f32);
  });
  return out;
}

// x [M, K] @ W.T + bias -> float32 [M, N], W dequantized to float32 a tile of rows at a
// time into a buffer of the thread's own (cache-sized, reused from call to call), each
// tile then multiplied by torch's float32 GEMM (MKL / oneDNN, single-threaded inside the
// tile loop). The many-row path of CPUs without fast bf16 products: the same products as
// dequantize_f32 then F.linear, without writing the whole float32 weight to memory and
// reading it back (SmolLM2's vocabulary head: 113 MB per call) or faulting in fresh pages
// for it on every call.
torch::Tensor matmul_dequant_f32(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t K,
                                 c10::optional<torch::Tensor> bias, const std::string& isa) {
  check_inputs(x, w, qtype, K);
  const DequantFn fn = path_or_best(isa).dequant;
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = w.size(0), rb = w.size(1);
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N=", N, " values");
    bf = bias->to(at::kFloat).contiguous();
  }
  torch::Tensor y = torch::empty({M, N}, xf.options());
  // Tiles of at most ~1 MB of float32 weight (an L2's share), a whole number of them per
  // thread, rows a multiple of 8.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t max_rows = std::max<int64_t>(8, (int64_t{1} << 18) / K / 8 * 8);
  const int64_t want = threads * ((N + threads * max_rows - 1) / (threads * max_rows));
  const int64_t tile = std::max<int64_t>(8, ((N + want - 1) / want + 7) / 8 * 8);
  const int64_t tiles = (N + tile - 1) / tile;
  const uint8_t* src = w.data_ptr<uint8_t>();
  // InferenceMode is per thread: torch's pool threads take the caller's, or an engine's
  // inference tensors (y) could not be written by the GEMMs there.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode mode(inference);
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(tile * K)) buf.resize(tile * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min(N, n0 + tile) - n0;
      fn(src + n0 * rb, rb, K, static_cast<int>(qtype), 0, rows, buf.data(), true);
      const torch::Tensor wt = torch::from_blob(buf.data(), {rows, K}, xf.options());
      torch::Tensor out = y.narrow(1, n0, rows);  // row stride N: BLAS writes it in place
      if (bf.defined()) at::addmm_out(out, bf.narrow(0, n0, rows), xf, wt.t());
      else at::mm_out(out, xf, wt.t());
    }
  });
  return y;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const Path& p : kPaths)
    if (p.runnable()) out.emplace_back(p.name);
  return out;
}

// For tests: the activation as the kernels see it, q [M, kp] (int8, or int16 in value
// order) and d [M, kp / 32].
std::vector<torch::Tensor> quantize_activation_for_test(torch::Tensor x, int64_t K, const std::string& isa,
                                                        const std::string& activations) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % 32 == 0, "x must be [M, K], K a multiple of 32");
  const int64_t M = x.size(0), kp = padded(K);
  const bool wide = wide_activations(activations);
  const ActBuf a = quantize_activation(x, K, kp, find_path(isa), wide);
  torch::Tensor q = torch::empty({M, kp}, wide ? torch::kInt16 : torch::kInt8);
  torch::Tensor d = torch::empty({M, kp / 32}, torch::kFloat);
  if (wide) {
    int16_t* out = q.data_ptr<int16_t>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t i = 0; i < kp; ++i) out[r * kp + i] = a.q16[r * kp + pos16(i)];
  } else {
    std::memcpy(q.data_ptr<int8_t>(), a.q.data(), a.q.size());
  }
  std::memcpy(d.data_ptr<float>(), a.d32.data(), a.d32.size() * sizeof(float));
  return {q, d};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "x @ W.T (+ bias) for a GGUF-quantized W [N, row_bytes]",
        py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("k"), py::arg("bias"), py::arg("isa"),
        py::arg("activations") = "int8");
  // For yun/kernels/decode_step.cpp's DecodePlan (another extension), which calls it directly.
  m.def("matmul_address", [] { return reinterpret_cast<int64_t>(&matmul); },
        "the address of `matmul`, for native callers in this process");
  m.def("isas", &isas, "the code paths this CPU runs, best first");
  m.def("matmul_dequant_f32", &matmul_dequant_f32,
        "x @ W.T (+ bias) -> float32, W dequantized to float32 a cache-sized tile at a time for "
        "torch's float32 GEMM", py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("k"),
        py::arg("bias"), py::arg("isa") = "");
  m.def("dequantize_bf16",
        [](torch::Tensor w, int64_t qtype, int64_t K, const std::string& isa) {
          return dequantize(w, qtype, K, isa, false);
        },
        "W [N, row_bytes] quantized -> bfloat16 [N, K]", py::arg("w"), py::arg("qtype"), py::arg("k"),
        py::arg("isa") = "");
  m.def("dequantize_f32",
        [](torch::Tensor w, int64_t qtype, int64_t K, const std::string& isa) {
          return dequantize(w, qtype, K, isa, true);
        },
        "W [N, row_bytes] quantized -> float32 [N, K]", py::arg("w"), py::arg("qtype"), py::arg("k"),
        py::arg("isa") = "");
  m.def("quantize_activation", &quantize_activation_for_test,
        "x [M, K] -> (q int8 or int16 [M, Kp], d float32 [M, Kp / 32]) as the kernels quantize it",
        py::arg("x"), py::arg("k"), py::arg("isa"), py::arg("activations") = "int8");
}
