// AVX-512 bodies of the quantized matmul (see quant.h for what every path computes).
// quant.cpp includes this file twice, each time under its own target pragma and namespace:
// YQ_VNNI 1 uses vpdpbusd (u8 x s8 -> s32, 4 products a lane, no saturation); YQ_VNNI 0
// uses vpmaddubsw + vpmaddwd, which give the same lanes (pairs saturate at int16, which
// unsigned weights below 64 times |q| <= 127 never reach). No include guard on purpose.
//
// One chunk (256 weights) is 4 vectors of 64 bytes; i32 lane L of a 64-byte dot product
// sums values 4L..4L+3, so it belongs to group L / 8 (groups of 32) or L / 4 (of 16) of
// that vector: the group's scale is spread over its lanes with one permute.

namespace YQ_NS {

using namespace yunq;

struct Chunk {
  __m512i u[4];  // the 256 weights as unsigned bytes, in order (Q8_0 without VNNI: signed)
  __m512 a, c;   // per group, W = a * u + c: lanes 0-7 (8 groups) or 0-15 (16 groups)
};

inline __m512 zext8(__m256 v) { return _mm512_zextps256_ps512(v); }

// Eight halves at p, p + stride, ... -> lanes 0-7 (lanes 8-15 zero).
inline __m512 halves8(const uint8_t* p, int stride) {
  const __m128i h = _mm_setr_epi16(
      static_cast<short>(ld16(p)), static_cast<short>(ld16(p + stride)),
      static_cast<short>(ld16(p + 2 * stride)), static_cast<short>(ld16(p + 3 * stride)),
      static_cast<short>(ld16(p + 4 * stride)), static_cast<short>(ld16(p + 5 * stride)),
      static_cast<short>(ld16(p + 6 * stride)), static_cast<short>(ld16(p + 7 * stride)));
  return zext8(_mm256_cvtph_ps(h));
}

inline float half(const uint8_t* p) { return _cvtsh_ss(ld16(p)); }

inline __m256 u8x8_to_ps(const uint8_t* v) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v))));
}

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// [lo, hi] halves of a 512-bit vector.
inline __m512i join(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Two blocks of 32 4-bit values (16 bytes each: value i in the low nibble of byte i, value
// 16 + i in its high nibble) -> 64 bytes in value order.
inline __m512i nibbles_2blocks(const uint8_t* q0, const uint8_t* q1) {
  const __m256i both = _mm256_set_m128i(load128(q1), load128(q0));
  __m512i z = join(both, _mm256_srli_epi16(both, 4));     // [q0, q1, q0 >> 4, q1 >> 4]
  z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));  // [q0, q0 >> 4, q1, q1 >> 4]
  return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
}

// 32 bytes of 4-bit pairs: low nibbles are values 0-31, high nibbles values 32-63.
inline __m512i nibbles_64(const uint8_t* q) {
  const __m256i v = load256(q);
  return _mm512_and_si512(join(v, _mm256_srli_epi16(v, 4)), _mm512_set1_epi8(0x0F));
}

// Adds `v` to byte i of u where bit i of `bits` is set.
inline __m512i add_where(__m512i u, uint64_t bits, char v) {
  return _mm512_mask_add_epi8(u, _cvtu64_mask64(bits), u, _mm512_set1_epi8(v));
}

// The 64-bit mask of bit `b` of 32 bytes h, then of bit b + 1: the high bits of values
// 0-31 and 32-63 of one vector (Q5_K, Q3_K).
inline uint64_t bit_pair_mask(__m256i h, int b) {
  const uint32_t lo = _cvtmask32_u32(_mm256_test_epi8_mask(h, _mm256_set1_epi8(static_cast<char>(1 << b))));
  const uint32_t hi = _cvtmask32_u32(_mm256_test_epi8_mask(h, _mm256_set1_epi8(static_cast<char>(1 << (b + 1)))));
  return static_cast<uint64_t>(hi) << 32 | lo;
}

// Two 2-bit fields of 32 bytes q: bits [b, b+1] -> values 0-31, bits [b+2, b+3] -> 32-63.
inline __m512i crumbs_64(const uint8_t* q, int b) {
  const __m256i v = load256(q);
  const __m128i s0 = _mm_cvtsi32_si128(b), s1 = _mm_cvtsi32_si128(b + 2);
  return _mm512_and_si512(join(_mm256_srl_epi16(v, s0), _mm256_srl_epi16(v, s1)),
                          _mm512_set1_epi8(3));
}

template <int QT> void decode(const uint8_t* p, Chunk& c);

template <> inline void decode<Q4_0>(const uint8_t* p, Chunk& c) {
  constexpr int B = 18;
  for (int s = 0; s < 4; ++s) c.u[s] = nibbles_2blocks(p + 2 * s * B + 2, p + (2 * s + 1) * B + 2);
  c.a = halves8(p, B);
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-8.f));
}

template <> inline void decode<Q4_1>(const uint8_t* p, Chunk& c) {
  constexpr int B = 20;
  for (int s = 0; s < 4; ++s) c.u[s] = nibbles_2blocks(p + 2 * s * B + 4, p + (2 * s + 1) * B + 4);
  c.a = halves8(p, B);
  c.c = halves8(p + 2, B);
}

template <> inline void decode<Q5_0>(const uint8_t* p, Chunk& c) {
  constexpr int B = 22;
  for (int s = 0; s < 4; ++s) {
    const uint8_t* b0 = p + 2 * s * B;
    const uint8_t* b1 = b0 + B;
    const uint64_t high = ld32(b0 + 2) | static_cast<uint64_t>(ld32(b1 + 2)) << 32;
    c.u[s] = add_where(nibbles_2blocks(b0 + 6, b1 + 6), high, 16);
  }
  c.a = halves8(p, B);
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-16.f));
}

template <> inline void decode<Q5_1>(const uint8_t* p, Chunk& c) {
  constexpr int B = 24;
  for (int s = 0; s < 4; ++s) {
    const uint8_t* b0 = p + 2 * s * B;
    const uint8_t* b1 = b0 + B;
    const uint64_t high = ld32(b0 + 4) | static_cast<uint64_t>(ld32(b1 + 4)) << 32;
    c.u[s] = add_where(nibbles_2blocks(b0 + 8, b1 + 8), high, 16);
  }
  c.a = halves8(p, B);
  c.c = halves8(p + 2, B);
}

template <> inline void decode<Q8_0>(const uint8_t* p, Chunk& c) {
  constexpr int B = 34;
  for (int s = 0; s < 4; ++s) {
    const __m512i w = join(load256(p + 2 * s * B + 2), load256(p + (2 * s + 1) * B + 2));
    // VNNI: u = w + 128 as a byte, and c = -128 a takes the offset back out (exactly,
    // since the activation sums are of the same q). Otherwise the dot takes signed w.
    c.u[s] = YQ_VNNI ? _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))) : w;
  }
  c.a = halves8(p, B);
  c.c = YQ_VNNI ? _mm512_mul_ps(c.a, _mm512_set1_ps(-128.f)) : _mm512_setzero_ps();
}

inline void k4_affine(const uint8_t* p, Chunk& c) {
  uint8_t sc[8], mn[8];
  unpack_k4_scales(p + 4, sc, mn);
  c.a = zext8(_mm256_mul_ps(_mm256_set1_ps(half(p)), u8x8_to_ps(sc)));
  c.c = zext8(_mm256_mul_ps(_mm256_set1_ps(-half(p + 2)), u8x8_to_ps(mn)));
}

template <> inline void decode<Q4_K>(const uint8_t* p, Chunk& c) {
  k4_affine(p, c);
  for (int s = 0; s < 4; ++s) c.u[s] = nibbles_64(p + 16 + 32 * s);
}

template <> inline void decode<Q5_K>(const uint8_t* p, Chunk& c) {
  k4_affine(p, c);
  const __m256i qh = load256(p + 16);
  for (int s = 0; s < 4; ++s) c.u[s] = add_where(nibbles_64(p + 48 + 32 * s), bit_pair_mask(qh, 2 * s), 16);
}

template <> inline void decode<Q6_K>(const uint8_t* p, Chunk& c) {
  const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(p + 192)));
  c.a = _mm512_mul_ps(_mm512_set1_ps(half(p + 208)), sc);
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-32.f));
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {  // 128 values each: 64 bytes of low nibbles, 32 of 2-bit highs
    const __m512i ql = load512(p + 64 * h);
    const __m256i qh = load256(p + 128 + 32 * h);
    const __m512i h01 = _mm512_and_si512(join(qh, _mm256_srli_epi16(qh, 2)), m2);
    const __m512i h23 = _mm512_and_si512(join(_mm256_srli_epi16(qh, 4), _mm256_srli_epi16(qh, 6)), m2);
    c.u[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(h01, 4));
    c.u[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                     _mm512_slli_epi16(h23, 4));
  }
}

template <> inline void decode<Q3_K>(const uint8_t* p, Chunk& c) {
  alignas(16) int8_t sc[16];
  unpack_q3k_scales(p + 96, sc);
  c.a = _mm512_mul_ps(_mm512_set1_ps(half(p + 108)),
                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(sc))));
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-4.f));
  const __m256i hmask = load256(p);
  for (int s = 0; s < 4; ++s)  // u = low 2 bits + 4 * high bit, in [0, 8); W = a * (u - 4)
    c.u[s] = add_where(crumbs_64(p + 32 + 32 * (s >> 1), 4 * (s & 1)), bit_pair_mask(hmask, 2 * s), 4);
}

template <> inline void decode<Q2_K>(const uint8_t* p, Chunk& c) {
  const __m128i sc = load128(p);
  const __m128i lo = _mm_and_si128(sc, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(0x0F));
  c.a = _mm512_mul_ps(_mm512_set1_ps(half(p + 80)), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)));
  c.c = _mm512_mul_ps(_mm512_set1_ps(-half(p + 82)), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)));
  for (int s = 0; s < 4; ++s) c.u[s] = crumbs_64(p + 16 + 32 * (s >> 1), 4 * (s & 1));
}

// sum over each 4 bytes of u * x, u unsigned, x signed.
inline __m512i dot(__m512i u, __m512i x) {
#if YQ_VNNI
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1));
#endif
}

// Signed w (Q8_0 without VNNI): |w| times x with w's sign. |w| <= 128, |x| <= 127: pairs
// stay within int16.
inline __m512i dot_signed(__m512i w, __m512i x) {
  const __mmask64 neg = _mm512_movepi8_mask(w);
  return dot(_mm512_abs_epi8(w), _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
}

template <int QT>
struct Kern {
  static constexpr int kMaxRows = 8;
  static constexpr int NG = Format<QT>::groups;
  static constexpr bool kSigned = QT == Q8_0 && !YQ_VNNI;

  // Lane -> group index for vector s of a chunk.
  static __m512i spread(int s) {
    return NG == 8 ? _mm512_add_epi32(_mm512_set1_epi32(2 * s),
                                      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1))
                   : _mm512_add_epi32(_mm512_set1_epi32(4 * s),
                                      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
  }

  static __m512 group_floats(const float* p) {  // NG floats of one chunk, zero above
    return NG == 8 ? zext8(_mm256_loadu_ps(p)) : _mm512_loadu_ps(p);
  }

  template <int MB>
  static void rows(const Job& j, int64_t n, int64_t m0) {
    constexpr int CB = chunk_bytes<QT>();
    const int64_t kp = j.x.kp, gpr = kp / (256 / NG);  // groups per row of x
    const float* dg = (NG == 8 ? j.x.d32 : j.x.d16) + m0 * gpr;
    const float* sg = (NG == 8 ? j.x.s32 : j.x.s16) + m0 * gpr;
    const int8_t* xq = j.x.q + m0 * kp;
    const uint8_t* w = j.w + n * j.row_bytes;
    const __m512i idx0 = spread(0), idx1 = spread(1), idx2 = spread(2), idx3 = spread(3);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    alignas(64) uint8_t tail[CB];
    for (int64_t ch = 0; ch < j.chunks; ++ch) {
      const uint8_t* p = w + ch * CB;
      if (j.tail_bytes && ch == j.chunks - 1) {  // a partial chunk: zero blocks add nothing
        std::memset(tail, 0, CB);
        std::memcpy(tail, p, j.tail_bytes);
        p = tail;
      }
      Chunk c;
      decode<QT>(p, c);
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xq + m * kp + ch * kChunk;
        const __m512 sc = _mm512_mul_ps(c.a, group_floats(dg + m * gpr + ch * NG));
        __m512 am = _mm512_fmadd_ps(c.c, group_floats(sg + m * gpr + ch * NG), acc[m]);
        const __m512i i0 = kSigned ? dot_signed(c.u[0], load512(x)) : dot(c.u[0], load512(x));
        const __m512i i1 = kSigned ? dot_signed(c.u[1], load512(x + 64)) : dot(c.u[1], load512(x + 64));
        const __m512i i2 = kSigned ? dot_signed(c.u[2], load512(x + 128)) : dot(c.u[2], load512(x + 128));
        const __m512i i3 = kSigned ? dot_signed(c.u[3], load512(x + 192)) : dot(c.u[3], load512(x + 192));
        am = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(idx0, sc), am);
        am = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(idx1, sc), am);
        am = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i2), _mm512_permutexvar_ps(idx2, sc), am);
        am = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i3), _mm512_permutexvar_ps(idx3, sc), am);
        acc[m] = am;
      }
    }
    const float b = j.bias ? j.bias[n] : 0.f;
    for (int m = 0; m < MB; ++m) j.y[(m0 + m) * j.ldy + n] = _mm512_reduce_add_ps(acc[m]) + b;
  }

  static void row(int mb, const Job& j, int64_t n, int64_t m0) {
    switch (mb) {
      case 1: rows<1>(j, n, m0); break;
      case 2: rows<2>(j, n, m0); break;
      case 4: rows<4>(j, n, m0); break;
      default: rows<8>(j, n, m0); break;
    }
  }
};

void run(const Job& j, int qtype, int64_t n0, int64_t n1) {
  switch (qtype) {
    case Q4_0: drive<Kern<Q4_0>>(j, n0, n1); break;
    case Q4_1: drive<Kern<Q4_1>>(j, n0, n1); break;
    case Q5_0: drive<Kern<Q5_0>>(j, n0, n1); break;
    case Q5_1: drive<Kern<Q5_1>>(j, n0, n1); break;
    case Q8_0: drive<Kern<Q8_0>>(j, n0, n1); break;
    case Q2_K: drive<Kern<Q2_K>>(j, n0, n1); break;
    case Q3_K: drive<Kern<Q3_K>>(j, n0, n1); break;
    case Q4_K: drive<Kern<Q4_K>>(j, n0, n1); break;
    case Q5_K: drive<Kern<Q5_K>>(j, n0, n1); break;
    case Q6_K: drive<Kern<Q6_K>>(j, n0, n1); break;
  }
}

}  // namespace YQ_NS
