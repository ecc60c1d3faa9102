#pragma once
// AVX-512F: sixteen floats per vector. Same interface and semantics as scalar.hpp;
// compiles to nothing unless the compiler targets AVX-512F. Uses AVX-512F only
// (no DQ/VL), so it runs on every AVX-512 CPU.
#if defined(__AVX512F__)
#include <immintrin.h>
#include <cstdint>

#include "kvheads/simd/register_hint.hpp"

namespace kvheads::simd {

/// 16 x fp32 in a __m512 (x86 AVX-512F).
struct avx512 {
  static constexpr const char* name = "avx512";
  static constexpr int width = 16;
  /// Vector registers (zmm0-31): the micro-kernels size their register tiles by it.
  static constexpr int registers = 32;
  using vec = __m512;

  static vec zero() { return _mm512_setzero_ps(); }
  static vec broadcast(float x) { return _mm512_set1_ps(x); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  /// Lanes at and past n read as 0 and are never touched in memory
  /// (masked-off lanes of a masked load do not fault).
  static vec load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes_below(n), p); }
  /// Pins a loaded operand to a register (see simd/register_hint.hpp).
  static void hold(vec& v) { detail::keep_in_register(v); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static void store_partial(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, lanes_below(n), v); }

  // Widening loads from KV storage (simd/widen.hpp): bf16 is the top half of an fp32,
  // fp16 converts with vcvtph2ps (AVX-512F), int8 sign-extends then converts.
  // (Masked forms with an all-ones mask: see `all` below.)
  static vec load_bf16(const std::uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i wide = _mm512_maskz_cvtepu16_epi32(all, raw);
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(wide, all, wide, 16));
  }
  static vec load_fp16(const std::uint16_t* p) {
    return _mm512_maskz_cvtph_ps(all, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Narrowing store (simd/narrow.hpp): as avx2's, with vcvtps2ph (AVX-512F).
  static void store_fp16(std::uint16_t* p, vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtps_ph(all, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static vec load_i8(const std::int8_t* p) {
    const __m512i wide = _mm512_maskz_cvtepi8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_maskz_cvtepi32_ps(all, wide);
  }

  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  /// a * b + c, fused.
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  // vminps/vmaxps already return the second operand when either is NaN (or both are zero).
  static vec min(vec a, vec b) { return _mm512_mask_min_ps(a, all, a, b); }
  static vec max(vec a, vec b) { return _mm512_mask_max_ps(a, all, a, b); }
  static vec abs(vec a) {
    // _mm512_and_ps needs AVX-512DQ; the integer form is AVX-512F.
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
  }
  /// Per lane: a < b ? if_less : otherwise (false when either is NaN).
  static vec select_less(vec a, vec b, vec if_less, vec otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), otherwise, if_less);
  }

  static float reduce_sum(vec v) {
    const __m256 h = _mm256_add_ps(half<0>(v), half<1>(v));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  /// width vectors in, one out: lane i is the horizontal sum of in[i]. Sixteen sums for
  /// 45 shuffles and adds, against about 8 per reduce_sum (Q.K of few rows needs many).
  static vec reduce_sum_each(const vec* in) {
    // Pairs of halvings: 512 -> 256 -> 128 bits across vectors, then within 128-bit lanes.
    // After them, result lane 4k + m holds the sum of input 4m + k; reading the inputs in
    // that transposed order makes lane i the sum of in[i].
    vec halves[8], quarters[4], eighths[2];
    KVHEADS_UNROLL for (int i = 0; i < 8; ++i) {
      const vec a = in[transposed(2 * i)], b = in[transposed(2 * i + 1)];
      halves[i] = _mm512_add_ps(_mm512_mask_shuffle_f32x4(a, all, a, b, 0x44), _mm512_mask_shuffle_f32x4(a, all, a, b, 0xEE));
    }
    KVHEADS_UNROLL for (int i = 0; i < 4; ++i) {
      const vec a = halves[2 * i], b = halves[2 * i + 1];
      quarters[i] = _mm512_add_ps(_mm512_mask_shuffle_f32x4(a, all, a, b, 0x88), _mm512_mask_shuffle_f32x4(a, all, a, b, 0xDD));
    }
    KVHEADS_UNROLL for (int i = 0; i < 2; ++i) {
      const vec a = quarters[2 * i], b = quarters[2 * i + 1];
      eighths[i] = _mm512_add_ps(_mm512_mask_shuffle_ps(a, all, a, b, 0x44), _mm512_mask_shuffle_ps(a, all, a, b, 0xEE));
    }
    const vec a = eighths[0], b = eighths[1];
    return _mm512_add_ps(_mm512_mask_shuffle_ps(a, all, a, b, 0x88), _mm512_mask_shuffle_ps(a, all, a, b, 0xDD));
  }
  static float reduce_max(vec v) {
    const __m256 h = _mm256_max_ps(half<0>(v), half<1>(v));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }

  static vec round(vec x) { return _mm512_mask_roundscale_ps(x, all, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  /// 2^n for integral n in [-126, 127], built directly in the exponent field.
  static vec pow2(vec n) {
    const __m512i bias = _mm512_set1_epi32(127);
    const __m512i biased = _mm512_add_epi32(_mm512_mask_cvttps_epi32(bias, all, n), bias);
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(biased, all, biased, 23));
  }
  /// x * 2^n for integral n <= 127 in one instruction (vscalefps), where the others
  /// take five; below 2^-126 it rounds to the subnormal (see scalar.hpp).
  static vec ldexp(vec x, vec n) { return _mm512_mask_scalef_ps(x, all, x, n); }

 private:
  // g++ 12 warns (-Wuninitialized, GCC PR 105593) when the unmasked forms of several
  // AVX-512 intrinsics are inlined, because they pass _mm512_undefined_*() as the merge
  // source. Their masked forms with an all-ones mask and a defined source compile to
  // the same unmasked instruction without the warning.
  static constexpr __mmask16 all = 0xffff;

  // Input order of reduce_sum_each: position 4k + m reads input 4m + k.
  static constexpr int transposed(int i) { return (i % 4) * 4 + i / 4; }
  // Bit i set for lanes i < n (n <= 0: none, n >= 16: all).
  static __mmask16 lanes_below(int n) {
    return n <= 0 ? __mmask16(0) : n >= width ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
  }
  // _mm512_extractf32x8_ps needs AVX-512DQ; going through the double view is AVX-512F.
  // (In g++ 12 even _mm512_castps512_ps256 expands to the unmasked extract, hence
  // the masked form for the low half too.)
  template <int Half>
  static __m256 half(vec v) {
    return _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xff, _mm512_castps_pd(v), Half));
  }
};

}  // namespace kvheads::simd
#endif
