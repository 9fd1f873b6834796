// AVX2 bodies of the quantized matmul (see quant.h for what every path computes).
// quant.cpp includes this file twice, each time under its own target pragma and namespace:
// YQ_VNNI 1 uses AVX-VNNI's vpdpbusd on 256-bit vectors; YQ_VNNI 0 vpmaddubsw + vpmaddwd
// (same lanes; unsigned weights below 64 times |q| <= 127 never saturate int16 pairs).
// No include guard on purpose.
//
// A chunk (256 weights) is 8 vectors of 32 bytes, decoded one at a time (16 registers do
// not hold a whole chunk and several rows' accumulators). i32 lane L of a 32-byte dot
// sums values 4L..4L+3: the vector is one group of 32, or groups 2s, 2s+1 of 16.

namespace YQ_NS {

using namespace yunq;

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline float half(const uint8_t* p) { return _cvtsh_ss(ld16(p)); }

// The halves at p, p + stride, ... of a chunk's nb blocks (zero past them) -> 8 floats.
inline __m256 halves8(const uint8_t* p, int stride, int nb) {
  auto h = [&](int i) { return static_cast<short>(i < nb ? ld16(p + i * stride) : 0); };
  return _mm256_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7)));
}

inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 i8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// One block of 32 4-bit values (16 bytes: value i low nibble, 16 + i high) -> 32 bytes.
inline __m256i nibbles_block(const uint8_t* q) {
  const __m128i v = load128(q);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// Byte i = v where bit i of `bits` is set, else 0.
inline __m256i bits_to_bytes(uint32_t bits, char v) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(v));
}

// Byte i = v where bit b of h[i] is set, else 0.
inline __m256i bit_to_bytes(__m256i h, int b, char v) {
  const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << b));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit), _mm256_set1_epi8(v));
}

inline __m256i shift_mask(__m256i v, int shift, char mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(mask));
}

// Per type: scales(p, a, c) fills the affine map of the chunk's groups (NG / 8 vectors);
// vec(p, s) decodes vector s (values 32s .. 32s + 31) as bytes.
template <int QT> struct Dec;

template <> struct Dec<Q4_0> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int nb) {
    a[0] = halves8(p, 18, nb);
    c[0] = _mm256_mul_ps(a[0], _mm256_set1_ps(-8.f));
  }
  static __m256i vec(const uint8_t* p, int s) { return nibbles_block(p + 18 * s + 2); }
};

template <> struct Dec<Q4_1> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int nb) {
    a[0] = halves8(p, 20, nb);
    c[0] = halves8(p + 2, 20, nb);
  }
  static __m256i vec(const uint8_t* p, int s) { return nibbles_block(p + 20 * s + 4); }
};

template <> struct Dec<Q5_0> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int nb) {
    a[0] = halves8(p, 22, nb);
    c[0] = _mm256_mul_ps(a[0], _mm256_set1_ps(-16.f));
  }
  static __m256i vec(const uint8_t* p, int s) {
    const uint8_t* b = p + 22 * s;
    return _mm256_or_si256(nibbles_block(b + 6), bits_to_bytes(ld32(b + 2), 16));
  }
};

template <> struct Dec<Q5_1> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int nb) {
    a[0] = halves8(p, 24, nb);
    c[0] = halves8(p + 2, 24, nb);
  }
  static __m256i vec(const uint8_t* p, int s) {
    const uint8_t* b = p + 24 * s;
    return _mm256_or_si256(nibbles_block(b + 8), bits_to_bytes(ld32(b + 4), 16));
  }
};

template <> struct Dec<Q8_0> {  // signed weights: the kernel takes |w| and moves the sign to x
  static void scales(const uint8_t* p, __m256* a, __m256* c, int nb) {
    a[0] = halves8(p, 34, nb);
    c[0] = _mm256_setzero_ps();
  }
  static __m256i vec(const uint8_t* p, int s) { return load256(p + 34 * s + 2); }
};

inline __m128i lo64(uint64_t v) { return _mm_cvtsi64_si128(static_cast<long long>(v)); }
inline __m128i bytes16(const Bytes16& v) { return _mm_set_epi64x(static_cast<long long>(v.hi), static_cast<long long>(v.lo)); }

inline void k4_scales(const uint8_t* p, __m256* a, __m256* c) {
  const Bytes16 sm = unpack_k4_scales(p + 4);  // 8 scales, 8 mins
  a[0] = _mm256_mul_ps(_mm256_set1_ps(half(p)), u8x8_to_ps(lo64(sm.lo)));
  c[0] = _mm256_mul_ps(_mm256_set1_ps(-half(p + 2)), u8x8_to_ps(lo64(sm.hi)));
}

template <> struct Dec<Q4_K> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int) { k4_scales(p, a, c); }
  static __m256i vec(const uint8_t* p, int s) {  // 32 bytes: low nibbles, then high ones
    return shift_mask(load256(p + 16 + 32 * (s >> 1)), 4 * (s & 1), 0x0F);
  }
};

template <> struct Dec<Q5_K> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int) { k4_scales(p, a, c); }
  static __m256i vec(const uint8_t* p, int s) {
    const __m256i lo = shift_mask(load256(p + 48 + 32 * (s >> 1)), 4 * (s & 1), 0x0F);
    return _mm256_or_si256(lo, bit_to_bytes(load256(p + 16), s, 16));
  }
};

template <> struct Dec<Q6_K> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int) {
    const __m256 d = _mm256_set1_ps(half(p + 208));
    const __m128i sc = load128(p + 192);
    a[0] = _mm256_mul_ps(d, i8x8_to_ps(sc));
    a[1] = _mm256_mul_ps(d, i8x8_to_ps(_mm_unpackhi_epi64(sc, sc)));
    c[0] = _mm256_mul_ps(a[0], _mm256_set1_ps(-32.f));
    c[1] = _mm256_mul_ps(a[1], _mm256_set1_ps(-32.f));
  }
  // Half h (128 values): vector r takes low (r < 2) or high nibbles of 32 bytes of ql, and
  // bits 2r, 2r + 1 of 32 bytes of qh.
  static __m256i vec(const uint8_t* p, int s) {
    const int h = s >> 2, r = s & 3;
    const __m256i lo = shift_mask(load256(p + 64 * h + 32 * (r & 1)), 4 * (r >> 1), 0x0F);
    const __m256i hi = shift_mask(load256(p + 128 + 32 * h), 2 * r, 3);
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
};

template <> struct Dec<Q3_K> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int) {
    const __m256 d = _mm256_set1_ps(half(p + 108));
    const __m128i v = _mm_sub_epi8(bytes16(unpack_q3k_scales(p + 96)), _mm_set1_epi8(32));  // -> -32..31
    a[0] = _mm256_mul_ps(d, i8x8_to_ps(v));
    a[1] = _mm256_mul_ps(d, i8x8_to_ps(_mm_unpackhi_epi64(v, v)));
    c[0] = _mm256_mul_ps(a[0], _mm256_set1_ps(-4.f));
    c[1] = _mm256_mul_ps(a[1], _mm256_set1_ps(-4.f));
  }
  static __m256i vec(const uint8_t* p, int s) {  // u = 2 low bits + 4 * high bit
    const __m256i lo = shift_mask(load256(p + 32 + 32 * (s >> 2)), 2 * (s & 3), 3);
    return _mm256_or_si256(lo, bit_to_bytes(load256(p), s, 4));
  }
};

template <> struct Dec<Q2_K> {
  static void scales(const uint8_t* p, __m256* a, __m256* c, int) {
    const __m128i sc = load128(p);
    const __m128i lo = _mm_and_si128(sc, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(0x0F));
    const __m256 d = _mm256_set1_ps(half(p + 80)), dmin = _mm256_set1_ps(-half(p + 82));
    a[0] = _mm256_mul_ps(d, u8x8_to_ps(lo));
    a[1] = _mm256_mul_ps(d, u8x8_to_ps(_mm_unpackhi_epi64(lo, lo)));
    c[0] = _mm256_mul_ps(dmin, u8x8_to_ps(hi));
    c[1] = _mm256_mul_ps(dmin, u8x8_to_ps(_mm_unpackhi_epi64(hi, hi)));
  }
  static __m256i vec(const uint8_t* p, int s) {
    return shift_mask(load256(p + 16 + 32 * (s >> 2)), 2 * (s & 3), 3);
  }
};

inline __m256i dot(__m256i u, __m256i x) {
#if YQ_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The int16 mode (see pos16 in quant.h): 32 weight bytes widened to two vectors of 16
// int16 (bytes 0-7 and 8-15 of each 16: unpacklo/hi; signed bytes sign-extended) against
// x's matching 16-value pieces, as stored. i32 lanes 0-3 sum values 0-15, lanes 4-7
// values 16-31: the int8 dot's lanes.
template <bool Signed>
inline __m256i dot16(__m256i u, const int16_t* x0, const int16_t* x1) {
  const __m256i high = Signed ? _mm256_cmpgt_epi8(_mm256_setzero_si256(), u) : _mm256_setzero_si256();
  const __m256i lo = _mm256_unpacklo_epi8(u, high), hi = _mm256_unpackhi_epi8(u, high);
#if YQ_VNNI
  return _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(lo, load256(x0)), hi, load256(x1));
#else
  return _mm256_add_epi32(_mm256_madd_epi16(lo, load256(x0)), _mm256_madd_epi16(hi, load256(x1)));
#endif
}

template <int QT, bool W16>
struct Kern {
  static constexpr int kMaxRows = 4;
  static constexpr int NG = Format<QT>::groups;
  using XT = typename std::conditional<W16, int16_t, int8_t>::type;  // x's quantized values

  // One chunk of R weight rows against MB rows of x, into acc; of a partial last chunk
  // only the blocks there are read.
  template <bool Whole, int R, int MB>
  __attribute__((always_inline)) static inline void chunk(
      const Job& j, const uint8_t* const* w, int64_t ch, const XT* xq, const float* dg,
      const float* sg, int64_t gpr, __m256 (*acc)[MB]) {
    constexpr int CB = chunk_bytes<QT>(), NV = NG / 8;
    const int64_t kp = j.x.kp;
    const int nv = Whole ? 8 : static_cast<int>(j.tail_bytes / Format<QT>::bytes);
    // Groups 2s, 2s + 1 of 16 (within a vector of 8 scales) over lanes 0-3, 4-7.
    const __m256i pairs[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                              _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
    alignas(32) float sc[MB][NG];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w[r] + ch * CB;
      __m256 a[NV], c[NV];
      Dec<QT>::scales(p, a, c, nv);
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < NV; ++v) {
          const int64_t g = m * gpr + ch * NG + 8 * v;
          _mm256_store_ps(sc[m] + 8 * v, _mm256_mul_ps(a[v], _mm256_loadu_ps(dg + g)));
          acc[r][m] = _mm256_fmadd_ps(c[v], _mm256_loadu_ps(sg + g), acc[r][m]);
        }
#pragma GCC unroll 8
      for (int s = 0; s < nv; ++s) {
        __m256i u = Dec<QT>::vec(p, s);
        const __m256i sign = u;
        if (QT == Q8_0 && !W16) u = _mm256_abs_epi8(u);
        for (int m = 0; m < MB; ++m) {
          __m256i i;
          if constexpr (W16) {
            const int16_t* x = xq + m * kp + ch * kChunk + 64 * (s >> 1) + 16 * (s & 1);
            i = dot16<QT == Q8_0>(u, x, x + 32);
          } else {
            __m256i x = load256(xq + m * kp + ch * kChunk + 32 * s);
            if (QT == Q8_0) x = _mm256_sign_epi8(x, sign);
            i = dot(u, x);
          }
          const __m256 f = NG == 8 ? _mm256_broadcast_ss(sc[m] + s)
                                   : _mm256_permutevar8x32_ps(_mm256_load_ps(sc[m] + 8 * (s >> 2)), pairs[s & 3]);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), f, acc[r][m]);
        }
      }
    }
  }

  // R weight rows at once against MB rows of x (see the AVX-512 body).
  template <int R, int MB>
  static void rows(const Job& j, int64_t n, int64_t n_end, int64_t m0) {
    const int64_t kp = j.x.kp, gpr = kp / (256 / NG);
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
    __m256 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
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
      chunk<true, R, MB>(j, w, ch, xq, dg, sg, gpr, acc);
    }
    if (full < j.chunks) chunk<false, R, MB>(j, w, full, xq, dg, sg, gpr, acc);
    for (int r = 0; r < R; ++r) {
      const float b = j.bias ? j.bias[nr[r]] : 0.f;
      for (int m = 0; m < MB; ++m) j.y[(m0 + m) * j.ldy + nr[r]] = hsum(acc[r][m]) + b;
    }
  }

  // 16 registers: 4 weight rows for one row of x, 2 for up to 4 (8 accumulators).
  static int row(int mb, const Job& j, int64_t n, int64_t n_end, int64_t m0) {
    switch (mb) {
      case 1: rows<4, 1>(j, n, n_end, m0); return 4;
      case 2: rows<2, 2>(j, n, n_end, m0); return 2;
      default: rows<2, 4>(j, n, n_end, m0); return 2;
    }
  }
};

// quantize_row of quant.cpp (same results), 32 values at a time.
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

bool quantize_row(const float* x, int64_t K, int64_t kp, int8_t* q, float* d32, float* d16,
                  float* s32, float* s16) {
  const __m256 zero = _mm256_setzero_ps(), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 probe = zero;
  int64_t b = 0;
  for (; 32 * b < K; ++b) {
    __m256 v[4];
    __m256 mx = zero;
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
      probe = _mm256_add_ps(probe, _mm256_mul_ps(v[i], zero));
      mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], abs_mask));
    }
    const float amax = hmax(mx);
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    // packs interleave 128-bit lanes: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] |
    // q0[4:8] ...; the permute puts them back in order.
    const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), p8);
    const int s0 = hsum_i32(_mm256_add_epi32(qi[0], qi[1])), s1 = hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
    d32[b] = d16[2 * b] = d16[2 * b + 1] = d;
    s16[2 * b] = d * s0;
    s16[2 * b + 1] = d * s1;
    s32[b] = d * (s0 + s1);
  }
  for (; b < kp / 32; ++b) {
    std::memset(q + 32 * b, 0, 32);
    d32[b] = s32[b] = d16[2 * b] = d16[2 * b + 1] = s16[2 * b] = s16[2 * b + 1] = 0.f;
  }
  return hsum(probe) == 0.f;
}

// The int16 mode's quantize_row (scalar::quantize_row16's results): d = max|x| / 32767, q
// stored as pos16 says. Block b of 32 is half b % 2 of its 64: values 0-7 and 16-23 go to
// 16 contiguous int16 at 64 * (b / 2) + 16 * (b % 2), values 8-15 and 24-31 32 further.
bool quantize_row16(const float* x, int64_t K, int64_t kp, int16_t* q, float* d32, float* d16,
                    float* s32, float* s16) {
  const __m256 zero = _mm256_setzero_ps(), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 probe = zero;
  int64_t b = 0;
  for (; 32 * b < K; ++b) {
    __m256 v[4];
    __m256 mx = zero;
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
      probe = _mm256_add_ps(probe, _mm256_mul_ps(v[i], zero));
      mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], abs_mask));
    }
    const float amax = hmax(mx);
    const float d = amax / 32767.f, id = amax > 0.f ? 32767.f / amax : 0.f;
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    // packs interleave 128-bit lanes (a[0:4] b[0:4] a[4:8] b[4:8]); the permute undoes it.
    int16_t* out = q + 64 * (b >> 1) + 16 * (b & 1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[2]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[1], qi[3]), 0xD8));
    const int s0 = hsum_i32(_mm256_add_epi32(qi[0], qi[1])), s1 = hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
    d32[b] = d16[2 * b] = d16[2 * b + 1] = d;
    s16[2 * b] = d * s0;
    s16[2 * b + 1] = d * s1;
    s32[b] = d * (s0 + s1);
  }
  for (; b < kp / 32; ++b) {
    int16_t* out = q + 64 * (b >> 1) + 16 * (b & 1);
    std::memset(out, 0, 32);
    std::memset(out + 32, 0, 32);
    d32[b] = s32[b] = d16[2 * b] = d16[2 * b + 1] = s16[2 * b] = s16[2 * b + 1] = 0.f;
  }
  return hsum(probe) == 0.f;
}

template <bool W16>
void run_mode(const Job& j, int qtype, int64_t n0, int64_t n1) {
  with_type(qtype, [&](auto t) { drive<Kern<decltype(t)::value, W16>>(j, n0, n1); });
}

void run(const Job& j, int qtype, int64_t n0, int64_t n1) {
  if (j.x.q16) run_mode<true>(j, qtype, n0, n1);
  else run_mode<false>(j, qtype, n0, n1);
}

// Rows [n0, n1) of W as float32 or bfloat16 (quant.cpp's dequantize): a * v + c per group
// from the kernels' own decode (Dec), two roundings as in the scalar loop (no fma);
// bfloat16 then rounds to nearest even. The same bits as the scalar loop, 8 values a step.
inline void store8(float* dst, __m256 f) { _mm256_storeu_ps(dst, f); }
inline void store8(uint16_t* dst, __m256 f) {
  const __m256i bits = _mm256_castps_si256(f);  // no NaN: finite scales, small integers
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
  // r <= 0xFFFF: packus's unsigned saturation keeps it; the two 128-bit halves in order.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

template <int QT, typename Out>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1,
                  Out* out) {
  constexpr int NG = Format<QT>::groups, NV = NG / 8;
  const int64_t nblocks = K / Format<QT>::block, per_chunk = kChunk / Format<QT>::block;
  const int64_t chunks = (nblocks + per_chunk - 1) / per_chunk;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Out* dst = out + n * K;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint8_t* p = row + ch * chunk_bytes<QT>();
      const int nv = static_cast<int>(std::min<int64_t>(kChunk, K - ch * kChunk) / 32);
      __m256 a[NV], c[NV];
      Dec<QT>::scales(p, a, c, per_chunk == 1 ? 8 : nv);
      for (int s = 0; s < nv; ++s) {
        const __m256i u = Dec<QT>::vec(p, s);
        const __m128i half[2] = {_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)};
        for (int q = 0; q < 4; ++q) {  // values 32s + 8q .. + 8
          const __m128i b = q & 1 ? _mm_srli_si128(half[q >> 1], 8) : half[q >> 1];
          const __m256i iv = QT == Q8_0 ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
          const int g = NG == 8 ? s : 2 * s + (q >> 1);  // the group of these 8 values
          const __m256i lane = _mm256_set1_epi32(g & 7);
          store8(dst + ch * kChunk + 32 * s + 8 * q,
                 _mm256_add_ps(_mm256_mul_ps(_mm256_permutevar8x32_ps(a[g >> 3], lane), _mm256_cvtepi32_ps(iv)),
                               _mm256_permutevar8x32_ps(c[g >> 3], lane)));
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
