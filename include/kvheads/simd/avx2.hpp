#pragma once
// AVX2 + FMA: eight floats per vector. Same interface and semantics as scalar.hpp;
// compiles to nothing unless the compiler targets both AVX2 and FMA.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <cstdint>

#include "kvheads/simd/register_hint.hpp"

namespace kvheads::simd {

/// 8 x fp32 in a __m256 (x86 AVX2 + FMA).
struct avx2 {
  static constexpr const char* name = "avx2";
  static constexpr int width = 8;
  /// Vector registers (ymm0-15): the micro-kernels size their register tiles by it.
  static constexpr int registers = 16;
  using vec = __m256;

  static vec zero() { return _mm256_setzero_ps(); }
  static vec broadcast(float x) { return _mm256_set1_ps(x); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  /// Lanes at and past n read as 0 and are never touched in memory
  /// (vmaskmovps does not fault on masked-off lanes).
  static vec load_partial(const float* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  /// Pins a loaded operand to a register (see simd/register_hint.hpp).
  static void hold(vec& v) { detail::keep_in_register(v); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static void store_partial(float* p, vec v, int n) { _mm256_maskstore_ps(p, lanes_below(n), v); }

  // Widening loads from KV storage (simd/widen.hpp); fp16 needs F16C, which every
  // AVX2 CPU has but the compiler enables separately (-mf16c or -march=native).
  static vec load_bf16(const std::uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
#if defined(__F16C__)
  static vec load_fp16(const std::uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Narrowing store (simd/narrow.hpp): nearest-even from the immediate whatever MXCSR's
  // rounding mode, and fp16 subnormals kept (the instruction ignores MXCSR.FTZ); NaN keeps
  // its sign and top payload bits and turns quiet, as in fp16::from_float. It still sets
  // MXCSR's status flags (see narrow.hpp).
  static void store_fp16(std::uint16_t* p, vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  static vec load_i8(const std::int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }

  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  /// a * b + c, fused.
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  // vminps/vmaxps already return the second operand when either is NaN (or both are zero).
  static vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec abs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  /// Per lane: a < b ? if_less : otherwise (false when either is NaN).
  static vec select_less(vec a, vec b, vec if_less, vec otherwise) {
    return _mm256_blendv_ps(otherwise, if_less, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }

  static float reduce_sum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  /// width vectors in, one out: lane i is the horizontal sum of in[i] (hadd tree: 9 operations
  /// for 8 sums).
  static vec reduce_sum_each(const vec* in) {
    // Each 128-bit half of these holds four inputs' partial sums (low half: lanes 0-3).
    const vec first = _mm256_hadd_ps(_mm256_hadd_ps(in[0], in[1]), _mm256_hadd_ps(in[2], in[3]));
    const vec second = _mm256_hadd_ps(_mm256_hadd_ps(in[4], in[5]), _mm256_hadd_ps(in[6], in[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20), _mm256_permute2f128_ps(first, second, 0x31));
  }
  static float reduce_max(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }

  static vec round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  /// 2^n for integral n in [-126, 127], built directly in the exponent field.
  static vec pow2(vec n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  /// x * 2^n for integral n <= 127; n <= -127 gives 0 (as scalar.hpp).
  static vec ldexp(vec x, vec n) { return _mm256_mul_ps(x, pow2(_mm256_max_ps(n, _mm256_set1_ps(-127.f)))); }

 private:
  // All-ones in lanes i < n (n <= 0: none, n >= 8: all).
  static __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

}  // namespace kvheads::simd
#endif
