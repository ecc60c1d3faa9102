#pragma once
// AArch64 NEON: four floats per vector. Same interface and semantics as scalar.hpp;
// compiles to nothing unless the compiler targets NEON on AArch64 (vdivq_f32,
// vrndnq_f32 and the across-lane reductions are AArch64-only).
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#include <cstdint>

#include <cstring>

#include "kvheads/simd/register_hint.hpp"

namespace kvheads::simd {

/// 4 x fp32 in a float32x4_t (AArch64 Advanced SIMD).
struct neon {
  static constexpr const char* name = "neon";
  static constexpr int width = 4;
  /// Vector registers (v0-v31): the micro-kernels size their register tiles by it.
  static constexpr int registers = 32;
  using vec = float32x4_t;

  static vec zero() { return vdupq_n_f32(0.f); }
  static vec broadcast(float x) { return vdupq_n_f32(x); }
  static vec load(const float* p) { return vld1q_f32(p); }
  /// Lanes at and past n read as 0 and are never touched in memory
  /// (NEON has no masked load, so the valid lanes go through a stack buffer).
  static vec load_partial(const float* p, int n) {
    float buffer[width] = {0.f, 0.f, 0.f, 0.f};
    if (n > 0) std::memcpy(buffer, p, sizeof(float) * static_cast<unsigned>(n < width ? n : width));
    return vld1q_f32(buffer);
  }
  /// Pins a loaded operand to a register (see simd/register_hint.hpp).
  static void hold(vec& v) { detail::keep_in_register(v); }
  static void store(float* p, vec v) { vst1q_f32(p, v); }
  static void store_partial(float* p, vec v, int n) {
    if (n <= 0) return;
    float buffer[width];
    vst1q_f32(buffer, v);
    std::memcpy(p, buffer, sizeof(float) * static_cast<unsigned>(n < width ? n : width));
  }

  // Widening loads from KV storage (simd/widen.hpp).
  static vec load_bf16(const std::uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static vec load_fp16(const std::uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  // Narrowing store (simd/narrow.hpp): FCVTN rounds and flushes as FPCR says: nearest-even,
  // subnormals kept, unless the program changed it; NaN turns quiet with its sign and top
  // payload bits.
  static void store_fp16(std::uint16_t* p, vec v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
  static vec load_i8(const std::int8_t* p) {
    std::int32_t four;  // exactly four bytes: never read past the row
    std::memcpy(&four, p, sizeof four);
    const int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
  }

  static vec add(vec a, vec b) { return vaddq_f32(a, b); }
  static vec sub(vec a, vec b) { return vsubq_f32(a, b); }
  static vec mul(vec a, vec b) { return vmulq_f32(a, b); }
  static vec div(vec a, vec b) { return vdivq_f32(a, b); }
  /// a * b + c, fused.
  static vec fma(vec a, vec b, vec c) { return vfmaq_f32(c, a, b); }
  // fmin/fmax would propagate NaN from either side and order -0 < +0; compare and
  // select instead to keep x86 semantics (second operand on NaN or equality).
  static vec min(vec a, vec b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
  static vec max(vec a, vec b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
  static vec abs(vec a) { return vabsq_f32(a); }
  /// Per lane: a < b ? if_less : otherwise (false when either is NaN).
  static vec select_less(vec a, vec b, vec if_less, vec otherwise) {
    return vbslq_f32(vcltq_f32(a, b), if_less, otherwise);
  }

  static float reduce_sum(vec v) { return vaddvq_f32(v); }
  /// width vectors in, one out: lane i is the horizontal sum of in[i].
  static vec reduce_sum_each(const vec* in) {
    return vpaddq_f32(vpaddq_f32(in[0], in[1]), vpaddq_f32(in[2], in[3]));
  }
  static float reduce_max(vec v) { return vmaxvq_f32(v); }

  static vec round(vec x) { return vrndnq_f32(x); }
  /// 2^n for integral n in [-126, 127], built directly in the exponent field.
  static vec pow2(vec n) {
    const int32x4_t biased = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(biased, 23));
  }
  /// x * 2^n for integral n <= 127; n <= -127 gives 0 (as scalar.hpp).
  static vec ldexp(vec x, vec n) { return vmulq_f32(x, pow2(max(n, vdupq_n_f32(-127.f)))); }
};

}  // namespace kvheads::simd
#endif
