// Portable pieces of the quantized matmul kernels (quant.cpp and its per-ISA bodies
// quant_avx512.h, quant_avx2.h): ggml's block layouts, half floats, the packed 6-bit scales
// of the K-quants, and the job description every code path runs.
//
// Every path computes the same thing:
//   y[m, n] = sum_k W[n, k] * xhat[m, k] + bias[n]
// where xhat is x quantized to int8 (or, in the int16 mode, int16) blocks of 32 with one
// float scale each (the activation is quantized once per call, not per weight row). Weights are read in chunks of 256
// values (one K-quant super-block, or 8 blocks of 32) and split, per group of 16 or 32
// values that share a scale, into unsigned integers u and an affine map:
//   W = a * u + c        (a, c: float per group)
// so a group's contribution is  a * dx * sum(u * q)  +  c * dx * sum(q),
// one integer dot product (the hot loop) plus a term from the activation's block sums.
// (Q8_0 without VNNI keeps its signed bytes, c = 0, and moves their sign onto q.) Since
// those sums are of the same q, every path gives W @ xhat up to float32 rounding; the
// tests hold each one to that.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace yunq {

// gguf.GGMLQuantizationType values.
enum QType : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

constexpr int kChunk = 256;  // weights per chunk, on every path

// f(std::integral_constant<int, QT>{}) for the type `qtype` names: the one switch from a
// run-time type to the per-type templates, for every path. Not a type: nothing.
template <typename F>
inline void with_type(int qtype, F&& f) {
  switch (qtype) {
    case Q4_0: f(std::integral_constant<int, Q4_0>{}); break;
    case Q4_1: f(std::integral_constant<int, Q4_1>{}); break;
    case Q5_0: f(std::integral_constant<int, Q5_0>{}); break;
    case Q5_1: f(std::integral_constant<int, Q5_1>{}); break;
    case Q8_0: f(std::integral_constant<int, Q8_0>{}); break;
    case Q2_K: f(std::integral_constant<int, Q2_K>{}); break;
    case Q3_K: f(std::integral_constant<int, Q3_K>{}); break;
    case Q4_K: f(std::integral_constant<int, Q4_K>{}); break;
    case Q5_K: f(std::integral_constant<int, Q5_K>{}); break;
    case Q6_K: f(std::integral_constant<int, Q6_K>{}); break;
    default: break;
  }
}

// f(std::integral_constant<int, QT>{}, out) with `out` typed as float* (f32) or uint16_t*
// (bfloat16): every path's dequantization entry point over its dequant_rows<QT, Out>.
template <typename F>
inline void with_type_and_out(int qtype, void* out, bool f32, F&& f) {
  with_type(qtype, [&](auto t) {
    if (f32) f(t, static_cast<float*>(out));
    else f(t, static_cast<uint16_t*>(out));
  });
}

// A value as stored: float32 as computed, or bfloat16 rounded to nearest even. Not for
// NaN (a dequantized weight is never one: finite scales times small integers; callers with
// NaN store their own).
inline void store_value(float f, float* out) { *out = f; }
inline void store_value(float f, uint16_t* out) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  *out = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// block: values per block; bytes: bytes per block; groups: scale groups per chunk (8 groups
// of 32 values or 16 of 16).
template <int QT> struct Format;
template <> struct Format<Q4_0> { static constexpr int block = 32, bytes = 18, groups = 8; };
template <> struct Format<Q4_1> { static constexpr int block = 32, bytes = 20, groups = 8; };
template <> struct Format<Q5_0> { static constexpr int block = 32, bytes = 22, groups = 8; };
template <> struct Format<Q5_1> { static constexpr int block = 32, bytes = 24, groups = 8; };
template <> struct Format<Q8_0> { static constexpr int block = 32, bytes = 34, groups = 8; };
template <> struct Format<Q2_K> { static constexpr int block = 256, bytes = 84, groups = 16; };
template <> struct Format<Q3_K> { static constexpr int block = 256, bytes = 110, groups = 16; };
template <> struct Format<Q4_K> { static constexpr int block = 256, bytes = 144, groups = 8; };
template <> struct Format<Q5_K> { static constexpr int block = 256, bytes = 176, groups = 8; };
template <> struct Format<Q6_K> { static constexpr int block = 256, bytes = 210, groups = 16; };

template <int QT>
constexpr int chunk_bytes() { return Format<QT>::bytes * (kChunk / Format<QT>::block); }

inline uint16_t ld16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t ld32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// IEEE half -> float, exact (every half is a float).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24 (subnormal)
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// The packed scales come out as two 64-bit words of 8 bytes each (little-endian): the
// SIMD paths move them straight into vectors (a 16-byte load of 4-byte stores just made
// would stall on store forwarding); the scalar path reads their bytes.
struct Bytes16 { uint64_t lo, hi; };

inline uint64_t pair(uint32_t lo, uint32_t hi) { return lo | static_cast<uint64_t>(hi) << 32; }

// Q4_K / Q5_K: 12 bytes hold 8 six-bit scales and 8 six-bit mins. Bytes 0-3 and 4-7 carry
// the low 6 bits of scales 0-3 and mins 0-3 (their top 2 bits are the high bits of scales
// and mins 4-7); bytes 8-11 carry the low 4 bits of scales 4-7 (low nibble) and mins 4-7.
// Returns {scales 0-7, mins 0-7}.
inline Bytes16 unpack_k4_scales(const uint8_t* s) {
  const uint32_t w0 = ld32(s), w1 = ld32(s + 4), w2 = ld32(s + 8);
  return {pair(w0 & 0x3F3F3F3Fu, (w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u)),
          pair(w1 & 0x3F3F3F3Fu, ((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u))};
}

// Q3_K: 12 bytes hold 16 six-bit scales, stored offset by 32 (returned unsigned, 0..63:
// subtract 32). Scale t takes its low 4 bits from byte t (t < 8, low nibble) or byte t - 8
// (high nibble), and its top 2 bits from byte 8 + t % 4, bits 2 * (t / 4): on 32-bit
// words, scales 4i..4i+3 are one word each.
inline Bytes16 unpack_q3k_scales(const uint8_t* s) {
  const uint32_t w0 = ld32(s), w1 = ld32(s + 4), w2 = ld32(s + 8);
  return {pair((w0 & 0x0F0F0F0Fu) | ((w2 & 0x03030303u) << 4),
               (w1 & 0x0F0F0F0Fu) | (((w2 >> 2) & 0x03030303u) << 4)),
          pair(((w0 >> 4) & 0x0F0F0F0Fu) | (((w2 >> 4) & 0x03030303u) << 4),
               ((w1 >> 4) & 0x0F0F0F0Fu) | (((w2 >> 6) & 0x03030303u) << 4))};
}

inline uint8_t byte_of(const Bytes16& v, int i) {
  return static_cast<uint8_t>((i < 8 ? v.lo : v.hi) >> (8 * (i % 8)));
}

// The int16 activation mode: x is quantized to int16 blocks of 32 (d = max|x| / 32767,
// rounding ~1e-5 of max|x| against int8's ~4e-3), dotted against the weights widened to
// int16 (vpmaddwd / vpdpwssd). An i32 lane sums 2 or 4 products of |u| <= 255 (Q8_0's
// offset form) and |q| <= 32767: < 2^25, no overflow; K-quant sub-block scales are applied
// in float, after the integer dot. Within each 64 values the int16 q are stored permuted,
// so that the unpacklo/unpackhi widening of a weight vector (bytes 0-7 and 8-15 of every
// 16) meets its x in place: 16-value quarter t, half h (values 16t + 8h .. +8) goes to
// 32h + 8t. Both the 512-bit (one 64-value vector) and 256-bit (two 32-value ones) paths
// read this layout.
inline int64_t pos16(int64_t i) {  // value i of a row -> its index in q16
  const int64_t r = i & 63;
  return (i & ~int64_t{63}) + 32 * ((r >> 3) & 1) + 8 * (r >> 4) + (r & 7);
}

// x, quantized once per call. Each row is padded with zeros to kp (a whole number of
// chunks), so a chunk never reads past its row.
struct Act {
  const int8_t* q;   // [M, kp]      q = round(x / d); null in the int16 mode
  const int16_t* q16;  // [M, kp]    int16 mode: q = round(x / d), stored as pos16 says; else null
  const float* d32;  // [M, kp / 32] d = max|x| / 127 (int16: / 32767) over each block of 32 values
  const float* d16;  // [M, kp / 16] the same d, once per 16 values
  const float* s32;  // [M, kp / 32] d * sum(q) over each block of 32
  const float* s16;  // [M, kp / 16] d * sum(q) over each 16
  int64_t kp;
};

struct Job {
  const uint8_t* w;    // [N, row_bytes]
  int64_t row_bytes;
  int64_t chunks;      // chunks per row (the last may be partial: blocks of 32 only)
  int64_t tail_bytes;  // bytes of that partial last chunk, 0 when it is whole
  Act x;
  int64_t rows;        // M
  float* y;            // [M, ldy]
  int64_t ldy;
  const float* bias;   // [N] or null
  int prefetch_ahead;  // software-prefetch the weights (decode: they come from memory) this
                       // many passes of weight rows ahead; 0: no prefetch
  bool prefetch_l2;    // into L2 (else L1)
  int64_t n_tile;      // weight rows per tile: a tile stays in cache while every block of
                       // rows of x goes over it
};

// Rows [n0, n1) of y. Kern::row(mb, job, n, n_end, m0) computes y[m0 .. m0+mb, n ..] for
// as many weight rows as it takes at once (it returns that number; rows past n_end - 1 are
// computed as row n_end - 1 again). Kern is one (ISA, type) pair; this loop is shared.
template <class Kern>
void drive(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t t0 = n0; t0 < n1; t0 += j.n_tile) {
    const int64_t t1 = t0 + j.n_tile < n1 ? t0 + j.n_tile : n1;
    for (int64_t m0 = 0; m0 < j.rows;) {
      const int64_t left = j.rows - m0;
      const int mb = left >= Kern::kMaxRows ? Kern::kMaxRows : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t n = t0; n < t1;) n += Kern::row(mb, j, n, t1, m0);
      m0 += mb;
    }
  }
}

}  // namespace yunq
