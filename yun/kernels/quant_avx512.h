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

// The first 4 bytes of each of the chunk's nb blocks (stride B; zero for the blocks past
// nb): Q4_1 / Q5_1's two half scales. (For one half, 8 plain loads measured faster.)
inline __m256i block_words(const uint8_t* p, int B, int nb) {
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(B));
  return _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), static_cast<__mmask8>((1u << nb) - 1), offsets,
                                      reinterpret_cast<const int*>(p), 1);
}

// The halves at p + i * B of the chunk's nb blocks (zero past them) -> lanes 0-7.
inline __m512 block_halves(const uint8_t* p, int B, int nb) {
  auto h = [&](int i) { return static_cast<short>(i < nb ? ld16(p + i * B) : 0); };
  return zext8(_mm256_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7))));
}

// The low (or high) halves of 8 words -> floats in lanes 0-7 (lanes 8-15 zero).
inline __m512 low_halves(__m256i w) { return zext8(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(w))); }
inline __m512 high_halves(__m256i w) { return low_halves(_mm256_srli_epi32(w, 16)); }

inline float half(const uint8_t* p) { return _cvtsh_ss(ld16(p)); }

inline __m128i lo64(uint64_t v) { return _mm_cvtsi64_si128(static_cast<long long>(v)); }
inline __m128i bytes16(const Bytes16& v) { return _mm_set_epi64x(static_cast<long long>(v.hi), static_cast<long long>(v.lo)); }

inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// [lo, hi] halves of a 512-bit vector.
inline __m512i join(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Two blocks of 32 4-bit values (16 bytes each: value i in the low nibble of byte i, value
// 16 + i in its high nibble) -> 64 bytes in value order: [q0, q0, q1, q1], the second and
// fourth quarters shifted right by 4.
inline __m512i nibbles_2blocks(const uint8_t* q0, const uint8_t* q1) {  // q1 null: zeros
  const __m256i b1 = q1 ? _mm256_broadcastsi128_si256(load128(q1)) : _mm256_setzero_si256();
  const __m512i z = join(_mm256_broadcastsi128_si256(load128(q0)), b1);
  const __m512i shift = _mm512_setr_epi64(0, 0, 0x0004000400040004, 0x0004000400040004,
                                          0, 0, 0x0004000400040004, 0x0004000400040004);
  return _mm512_and_si512(_mm512_srlv_epi16(z, shift), _mm512_set1_epi8(0x0F));
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

// Q5_K, Q3_K: hh = 32 bytes of high bits, twice. Adds v to bytes 0-31 of u where bit b of
// their byte is set, and to bytes 32-63 where bit b + 1 is: one test, no trip through
// general registers.
inline __m512i add_where_bits(__m512i u, __m512i hh, int b, char v) {
  const __m512i bits = join(_mm256_set1_epi8(static_cast<char>(1 << b)),
                            _mm256_set1_epi8(static_cast<char>(1 << (b + 1))));
  return _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(hh, bits), u, _mm512_set1_epi8(v));
}

// Two 2-bit fields of 32 bytes q: bits [b, b+1] -> values 0-31, bits [b+2, b+3] -> 32-63.
inline __m512i crumbs_64(const uint8_t* q, int b) {
  const __m256i v = load256(q);
  const __m128i s0 = _mm_cvtsi32_si128(b), s1 = _mm_cvtsi32_si128(b + 2);
  return _mm512_and_si512(join(_mm256_srl_epi16(v, s0), _mm256_srl_epi16(v, s1)),
                          _mm512_set1_epi8(3));
}

// Decodes a chunk at p. Blocks of 32: only the first nb blocks are there (nb = 8 but in a
// row's partial last chunk); the vectors past them are not used.
template <int QT> void decode(const uint8_t* p, Chunk& c, int nb);

// Blocks 2v and 2v + 1 of a chunk (stride B, 4-bit values at offset at) -> c.u[v].
template <int B, int at>
inline void nibbles_chunk(const uint8_t* p, Chunk& c, int nb) {
  for (int v = 0; v < 4; ++v)
    if (2 * v < nb) c.u[v] = nibbles_2blocks(p + 2 * v * B + at, 2 * v + 1 < nb ? p + (2 * v + 1) * B + at : nullptr);
}

template <> inline void decode<Q4_0>(const uint8_t* p, Chunk& c, int nb) {
  constexpr int B = 18;
  nibbles_chunk<B, 2>(p, c, nb);
  c.a = block_halves(p, B, nb);
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-8.f));
}

template <> inline void decode<Q4_1>(const uint8_t* p, Chunk& c, int nb) {
  constexpr int B = 20;
  nibbles_chunk<B, 4>(p, c, nb);
  const __m256i dm = block_words(p, B, nb);  // d | m << 16: one gather for both
  c.a = low_halves(dm);
  c.c = high_halves(dm);
}

// Q5_0 / Q5_1: 32 high bits per block at offset `at`; the words of blocks 2v, 2v + 1 make
// the 64-bit mask of vector v (plain loads: cheaper here than a second gather).
template <int B, int at>
inline void add_high_bits_5(const uint8_t* p, Chunk& c, int nb) {
  for (int v = 0; v < 4; ++v) {
    if (2 * v >= nb) break;
    const uint64_t hi = 2 * v + 1 < nb ? ld32(p + (2 * v + 1) * B + at) : 0;
    c.u[v] = add_where(c.u[v], ld32(p + 2 * v * B + at) | hi << 32, 16);
  }
}

template <> inline void decode<Q5_0>(const uint8_t* p, Chunk& c, int nb) {
  constexpr int B = 22;
  nibbles_chunk<B, 6>(p, c, nb);
  add_high_bits_5<B, 2>(p, c, nb);
  c.a = block_halves(p, B, nb);
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-16.f));
}

template <> inline void decode<Q5_1>(const uint8_t* p, Chunk& c, int nb) {
  constexpr int B = 24;
  nibbles_chunk<B, 8>(p, c, nb);
  add_high_bits_5<B, 4>(p, c, nb);
  const __m256i dm = block_words(p, B, nb);  // d | m << 16: one gather for both
  c.a = low_halves(dm);
  c.c = high_halves(dm);
}

template <> inline void decode<Q8_0>(const uint8_t* p, Chunk& c, int nb) {
  constexpr int B = 34;
  for (int v = 0; v < 4; ++v) {
    if (2 * v >= nb) break;
    const __m256i hi = 2 * v + 1 < nb ? load256(p + (2 * v + 1) * B + 2) : _mm256_setzero_si256();
    const __m512i w = join(load256(p + 2 * v * B + 2), hi);
    // VNNI: u = w + 128 as a byte, and c = -128 a takes the offset back out (exactly,
    // since the activation sums are of the same q). Otherwise the dot takes signed w.
    c.u[v] = YQ_VNNI ? _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))) : w;
  }
  c.a = block_halves(p, B, nb);
  c.c = YQ_VNNI ? _mm512_mul_ps(c.a, _mm512_set1_ps(-128.f)) : _mm512_setzero_ps();
}

inline void k4_affine(const uint8_t* p, Chunk& c) {
  const Bytes16 sm = unpack_k4_scales(p + 4);  // 8 scales, 8 mins
  c.a = zext8(_mm256_mul_ps(_mm256_set1_ps(half(p)), u8x8_to_ps(lo64(sm.lo))));
  c.c = zext8(_mm256_mul_ps(_mm256_set1_ps(-half(p + 2)), u8x8_to_ps(lo64(sm.hi))));
}

template <> inline void decode<Q4_K>(const uint8_t* p, Chunk& c, int) {
  k4_affine(p, c);
  for (int s = 0; s < 4; ++s) c.u[s] = nibbles_64(p + 16 + 32 * s);
}

template <> inline void decode<Q5_K>(const uint8_t* p, Chunk& c, int) {
  k4_affine(p, c);
  const __m512i qh = _mm512_broadcast_i64x4(load256(p + 16));
  for (int s = 0; s < 4; ++s) c.u[s] = add_where_bits(nibbles_64(p + 48 + 32 * s), qh, 2 * s, 16);
}

template <> inline void decode<Q6_K>(const uint8_t* p, Chunk& c, int) {
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

template <> inline void decode<Q3_K>(const uint8_t* p, Chunk& c, int) {
  const __m512i s32 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes16(unpack_q3k_scales(p + 96))),
                                       _mm512_set1_epi32(32));
  c.a = _mm512_mul_ps(_mm512_set1_ps(half(p + 108)), _mm512_cvtepi32_ps(s32));
  c.c = _mm512_mul_ps(c.a, _mm512_set1_ps(-4.f));
  const __m512i hmask = _mm512_broadcast_i64x4(load256(p));
  for (int s = 0; s < 4; ++s)  // u = low 2 bits + 4 * high bit, in [0, 8); W = a * (u - 4)
    c.u[s] = add_where_bits(crumbs_64(p + 32 + 32 * (s >> 1), 4 * (s & 1)), hmask, 2 * s, 4);
}

template <> inline void decode<Q2_K>(const uint8_t* p, Chunk& c, int) {
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

// The int16 mode (see pos16 in quant.h): the 64 weight bytes widened to two vectors of
// 32 int16 (bytes 0-7 and 8-15 of each 16: unpacklo/hi, no lane crossing; signed bytes
// sign-extended) against x's two 32-value halves, as stored. i32 lane L sums 4 products
// of values in 16-value quarter L / 4, the same groups as the int8 dot's lanes.
template <bool Signed>
inline void widen16(__m512i u, __m512i& lo, __m512i& hi) {
  const __m512i high = Signed ? _mm512_movm_epi8(_mm512_movepi8_mask(u)) : _mm512_setzero_si512();
  lo = _mm512_unpacklo_epi8(u, high);
  hi = _mm512_unpackhi_epi8(u, high);
}

// The widened weights (widen16) against x's two 32-value halves x0, x1.
inline __m512i dot16w(__m512i lo, __m512i hi, __m512i x0, __m512i x1) {
#if YQ_VNNI
  return _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, x0), hi, x1);
#else
  return _mm512_add_epi32(_mm512_madd_epi16(lo, x0), _mm512_madd_epi16(hi, x1));
#endif
}

template <bool Signed>
inline __m512i dot16(__m512i u, const int16_t* x) {
  __m512i lo, hi;
  widen16<Signed>(u, lo, hi);
  return dot16w(lo, hi, load512(x), load512(x + 32));
}

template <int QT, bool W16>
struct Kern {
  static constexpr int kMaxRows = 8;
  static constexpr int NG = Format<QT>::groups;
  static constexpr bool kSigned = QT == Q8_0 && !YQ_VNNI;
  using XT = typename std::conditional<W16, int16_t, int8_t>::type;  // x's quantized values

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

  // One chunk of R weight rows against MB rows of x, into acc. Of a row's partial last
  // chunk (blocks of 32 only) only the blocks there are read, and their vectors dotted.
  template <bool Whole, int R, int MB>
  __attribute__((always_inline)) static inline void chunk(const Job& j, const uint8_t* const* w, int64_t ch, const XT* xq,
                           const float* dg, const float* sg, int64_t gpr, const __m512i* idx,
                           __m512 (*acc)[MB]) {
    constexpr int CB = chunk_bytes<QT>();
    const int64_t kp = j.x.kp;
    const int nb = Whole ? 8 : static_cast<int>(j.tail_bytes / Format<QT>::bytes);
    const int nv = Whole ? 4 : (nb + 1) / 2;
    for (int r = 0; r < R; ++r) {
      Chunk c;
      decode<QT>(w[r] + ch * CB, c, nb);
      for (int m = 0; m < MB; ++m) {
        const XT* x = xq + m * kp + ch * kChunk;
        const __m512 sc = _mm512_mul_ps(c.a, group_floats(dg + m * gpr + ch * NG));
        __m512 am = _mm512_fmadd_ps(c.c, group_floats(sg + m * gpr + ch * NG), acc[r][m]);
        for (int v = 0; v < nv; ++v) {
          __m512i i;
          if constexpr (W16) {
            i = dot16<kSigned>(c.u[v], reinterpret_cast<const int16_t*>(x) + 64 * v);
          } else {
            const __m512i xv = load512(x + 64 * v);
            i = kSigned ? dot_signed(c.u[v], xv) : dot(c.u[v], xv);
          }
          am = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(idx[v], sc), am);
        }
        acc[r][m] = am;
      }
    }
  }

  // Where chunk_many() runs instead of chunk(): K-quants (whole chunks only: a K-quant
  // block is a chunk) against 8 rows of x. Measured on
  // Zen 5 (2 threads, M = 16..256, interleaved A/B): 1.1-1.25x for Q4_K and Q6_K, 0.86-0.96x
  // for the blocks of 32 (Q5_0, Q8_0), whose lighter decode leaves less to share.
  template <int MB>
  static constexpr bool kMany = MB >= 8 && Format<QT>::block == 256;

  // The same sums for many rows of x (MB >= 8), looped vector-outer: per vector of the
  // chunk, the weight rows' scales are spread over lanes (and, in the int16 mode, their
  // bytes widened) once for all MB rows, and each row's x scales once for all R weight
  // rows, where chunk() does both per (weight row, x row). The per-lane scale a * dx is
  // the same product either way, and each accumulator adds the same terms in the same
  // order (the c term, then vectors 0, 1, ...): the result is bit for bit chunk()'s.
  template <int R, int MB>
  __attribute__((always_inline)) static inline void chunk_many(const Job& j, const uint8_t* const* w, int64_t ch,
                                                              const XT* xq, const float* dg, const float* sg,
                                                              int64_t gpr, const __m512i* idx, __m512 (*acc)[MB]) {
    constexpr int CB = chunk_bytes<QT>();
    const int64_t kp = j.x.kp;
    Chunk c[R];
    for (int r = 0; r < R; ++r) {
      decode<QT>(w[r] + ch * CB, c[r], 8);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_fmadd_ps(c[r].c, group_floats(sg + m * gpr + ch * NG), acc[r][m]);
    }
    for (int v = 0; v < 4; ++v) {
      __m512 aw[R];
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        aw[r] = _mm512_permutexvar_ps(idx[v], c[r].a);
        if constexpr (W16) widen16<kSigned>(c[r].u[v], lo[r], hi[r]);
      }
      for (int m = 0; m < MB; ++m) {
        const XT* x = xq + m * kp + ch * kChunk + 64 * v;
        const __m512 dx = _mm512_permutexvar_ps(idx[v], group_floats(dg + m * gpr + ch * NG));
        __m512i x0, x1;
        if constexpr (W16) {
          x0 = load512(reinterpret_cast<const int16_t*>(x));
          x1 = load512(reinterpret_cast<const int16_t*>(x) + 32);
        } else {
          x0 = load512(x);
        }
        for (int r = 0; r < R; ++r) {
          __m512i i;
          if constexpr (W16) {
            i = dot16w(lo[r], hi[r], x0, x1);
          } else {
            i = kSigned ? dot_signed(c[r].u[v], x0) : dot(c[r].u[v], x0);
          }
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(aw[r], dx), acc[r][m]);
        }
      }
    }
  }

  // R weight rows at once, against MB rows of x: each chunk of x is fetched into L1 once
  // per R weight rows (with long rows x does not stay in L1 from one weight row to the
  // next, and for M > 1 it outweighs the weights).
  template <int R, int MB>
  static void rows(const Job& j, int64_t n, int64_t n_end, int64_t m0) {
    const int64_t kp = j.x.kp, gpr = kp / (256 / NG);  // groups per row of x
    const float* dg = (NG == 8 ? j.x.d32 : j.x.d16) + m0 * gpr;
    const float* sg = (NG == 8 ? j.x.s32 : j.x.s16) + m0 * gpr;
    const XT* xq = reinterpret_cast<const XT*>(W16 ? static_cast<const void*>(j.x.q16)
                                                   : static_cast<const void*>(j.x.q)) + m0 * kp;
    int64_t nr[R];
    const uint8_t* w[R];
    for (int r = 0; r < R; ++r) {
      nr[r] = n + r < n_end ? n + r : n_end - 1;
      w[r] = j.w + nr[r] * j.row_bytes;
    }
    const __m512i idx[4] = {spread(0), spread(1), spread(2), spread(3)};
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t full = j.tail_bytes ? j.chunks - 1 : j.chunks;
    // Decode streams the weights from memory: fetch a later pass's rows (prefetch_ahead
    // passes on) evenly over this pass's chunks. Past the end of w is harmless (no fault).
    const char* next = reinterpret_cast<const char*>(w[R - 1] + j.row_bytes +
                                                     (j.prefetch_ahead - 1) * R * j.row_bytes);
    const int64_t lines = j.prefetch_ahead > 0 ? R * j.row_bytes / 64 : 0;
    int64_t fetched = 0;
    for (int64_t ch = 0; ch < full; ++ch) {
      for (const int64_t want = (ch + 1) * lines / j.chunks; fetched < want; ++fetched)
        if (j.prefetch_l2) _mm_prefetch(next + 64 * fetched, _MM_HINT_T1);
        else _mm_prefetch(next + 64 * fetched, _MM_HINT_T0);
      if constexpr (kMany<MB>) chunk_many<R, MB>(j, w, ch, xq, dg, sg, gpr, idx, acc);
      else chunk<true, R, MB>(j, w, ch, xq, dg, sg, gpr, idx, acc);
    }
    if (full < j.chunks) chunk<false, R, MB>(j, w, full, xq, dg, sg, gpr, idx, acc);
    for (int r = 0; r < R; ++r) {
      const float b = j.bias ? j.bias[nr[r]] : 0.f;
      for (int m = 0; m < MB; ++m) j.y[(m0 + m) * j.ldy + nr[r]] = _mm512_reduce_add_ps(acc[r][m]) + b;
    }
  }

  // 4 weight rows for up to 4 rows of x, 2 for 8: at most 16 accumulators.
  static int row(int mb, const Job& j, int64_t n, int64_t n_end, int64_t m0) {
    switch (mb) {
      case 1: rows<4, 1>(j, n, n_end, m0); return 4;
      case 2: rows<4, 2>(j, n, n_end, m0); return 4;
      case 4: rows<4, 4>(j, n, n_end, m0); return 4;
      default: rows<2, 8>(j, n, n_end, m0); return 2;
    }
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

// Rows [n0, n1) of W as float32 or bfloat16 (quant.cpp's dequantize): a * v + c per group,
// v the scalar decode's integers (Q8_0 signed, c = 0, also where this path's chunk holds the
// VNNI offset form), two roundings as there (no fma); bfloat16 then rounds to nearest even.
// The same bits as the scalar loop; 16 values per step instead of one.
inline void store16(float* dst, __m512 f) { _mm512_storeu_ps(dst, f); }
inline void store16(uint16_t* dst, __m512 f) {
  const __m512i bits = _mm512_castps_si512(f);  // no NaN: finite scales, small integers
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}

template <int QT, typename Out>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1,
                  Out* out) {
  constexpr int GS = kChunk / Format<QT>::groups;
  const int64_t nblocks = K / Format<QT>::block, per_chunk = kChunk / Format<QT>::block;
  const int64_t chunks = (nblocks + per_chunk - 1) / per_chunk;
  alignas(64) uint8_t u[64];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* dst = out + n * K;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int nb = static_cast<int>(std::min<int64_t>(per_chunk, nblocks - ch * per_chunk));
      Chunk c;
      decode<QT>(row + ch * chunk_bytes<QT>(), c, nb);
      constexpr bool kOffset = QT == Q8_0 && YQ_VNNI;  // u = w + 128: back to signed w
      const __m512 cs = kOffset ? _mm512_setzero_ps() : c.c;
      const int64_t values = std::min<int64_t>(kChunk, K - ch * kChunk);  // a multiple of 32
      for (int v = 0; v < 4 && 64 * v < values; ++v) {
        _mm512_store_si512(reinterpret_cast<__m512i*>(u), c.u[v]);
        for (int q = 0; q < 4 && 64 * v + 16 * q < values; ++q) {
          const int at = 64 * v + 16 * q;
          const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(u + 16 * q));
          const __m512i iv = QT == Q8_0
              ? _mm512_cvtepi8_epi32(kOffset ? _mm_xor_si128(b, _mm_set1_epi8(static_cast<char>(0x80))) : b)
              : _mm512_cvtepu8_epi32(b);
          const __m512i g = _mm512_set1_epi32(at / GS);
          store16(dst + ch * kChunk + at,
                  _mm512_add_ps(_mm512_mul_ps(_mm512_permutexvar_ps(g, c.a), _mm512_cvtepi32_ps(iv)),
                                _mm512_permutexvar_ps(g, cs)));
        }
      }
    }
  }
}

void dequant(const uint8_t* w, int64_t row_bytes, int64_t K, int qtype, int64_t n0, int64_t n1,
             void* out, bool f32) {
  with_type_and_out(qtype, out, f32, [&](auto t, auto* dst) {
    dequant_rows<decltype(t)::value>(w, row_bytes, K, n0, n1, dst);
  });
}

}  // namespace YQ_NS
