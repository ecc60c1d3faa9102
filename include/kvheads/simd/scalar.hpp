#pragma once
// The portable ISA: one float per "vector". It is a full, tested ISA (not a fallback
// written differently): kernels run on it through exactly the same interface.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvheads::simd {

/// The vector interface every ISA file implements (this one is the reference):
///   width, registers, vec, zero, broadcast, load, load_partial, store, store_partial,
///   hold (keep a loaded operand in a register), add, sub, mul, div, fma, min, max, abs,
///   select_less, reduce_sum, reduce_sum_each (width vectors -> one vector of their sums),
///   reduce_max, round (to nearest even), pow2 (2^n for integral n in [-126, 127]),
///   ldexp (x * 2^n for integral n <= 127; see below for n < -126).
/// min/max follow x86 semantics: max(a, b) = a > b ? a : b (returns b when either is NaN),
/// which vector_math.hpp relies on to propagate NaN. exp/tanh are written once
/// over these operations in vector_math.hpp.
struct scalar {
  static constexpr const char* name = "scalar";
  static constexpr int width = 1;
  /// Registers a scalar loop can keep values in: the micro-kernels size their tiles by it.
  static constexpr int registers = 16;
  using vec = float;

  static vec zero() { return 0.f; }
  static vec broadcast(float x) { return x; }
  static vec load(const float* p) { return *p; }
  /// Lanes at and past n read as 0 and are never touched in memory.
  static vec load_partial(const float* p, int n) { return n > 0 ? *p : 0.f; }
  /// Pins a loaded operand to a register (a hint for SIMD ISAs; nothing to do here).
  static void hold(vec&) {}
  static void store(float* p, vec v) { *p = v; }
  static void store_partial(float* p, vec v, int n) {
    if (n > 0) *p = v;
  }

  static vec add(vec a, vec b) { return a + b; }
  static vec sub(vec a, vec b) { return a - b; }
  static vec mul(vec a, vec b) { return a * b; }
  static vec div(vec a, vec b) { return a / b; }
  /// a * b + c, fused where the hardware can.
  static vec fma(vec a, vec b, vec c) { return std::fma(a, b, c); }
  static vec min(vec a, vec b) { return a < b ? a : b; }
  static vec max(vec a, vec b) { return a > b ? a : b; }
  static vec abs(vec a) { return std::fabs(a); }
  /// Per lane: a < b ? if_less : otherwise.
  static vec select_less(vec a, vec b, vec if_less, vec otherwise) { return a < b ? if_less : otherwise; }

  static float reduce_sum(vec v) { return v; }
  /// width vectors in, one out: lane i is the horizontal sum of in[i].
  static vec reduce_sum_each(const vec* in) { return in[0]; }
  static float reduce_max(vec v) { return v; }

  static vec round(vec x) { return std::nearbyint(x); }
  static vec pow2(vec n) {
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
  /// x * 2^n for integral n <= 127. For n < -126, where exp_nonpositive's results are
  /// below the normal range, ISAs may differ: here n <= -127 gives 0 (pow2(-127) is the
  /// zero bit pattern), AVX-512 rounds to the subnormal; either way |error| < 2^-125 for
  /// |x| < 2, and n <= -151 gives 0 everywhere. NaN n gives 0 * x (NaN for NaN x); n >= 128
  /// (+inf too: a +inf logit next to a NaN one, whose max is lost) gives x * inf, never a
  /// float-to-int conversion out of range, which is undefined behaviour.
  static vec ldexp(vec x, vec n) { return x * pow2(n > -127.f ? (n < 128.f ? n : 128.f) : -127.f); }
};

}  // namespace kvheads::simd
