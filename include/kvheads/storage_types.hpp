#pragma once
// bf16 and fp16: 16-bit storage types for weights and the KV cache. Arithmetic is
// always done in fp32; these types only store. Conversions are portable bit code:
// from_float rounds to nearest, ties to even; to_float is exact.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kvheads {

namespace detail {

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

/// x rounded to float "to odd": exact values stay; any other gives the float next to x
/// toward zero with its last mantissa bit forced to 1. Rounding that float to bf16 or fp16
/// (to nearest, ties to even) then gives x correctly rounded: float has more than two bits
/// beyond either, so the odd bit stands for "somewhat above" and can never fake a tie.
/// Plain float(x) first would round twice (a mean just above a bf16 tie can land on it).
inline float float_round_to_odd(double x) {
  float rounded = float(x);
  if (double(rounded) == x || x != x) return rounded;
  if (std::fabs(double(rounded)) > std::fabs(x)) rounded = std::nextafter(rounded, 0.f);
  return bits_float(float_bits(rounded) | 1u);
}

}  // namespace detail

/// bfloat16: the top 16 bits of an IEEE fp32 (1 sign, 8 exponent, 7 mantissa bits).
struct bf16 {
  std::uint16_t bits;

  /// Nearest bf16 (ties to even). NaN stays NaN (made quiet, sign kept); +-inf stays +-inf;
  /// finite values above the largest bf16 round to +-inf as IEEE rounding demands.
  static bf16 from_float(float value) {
    const std::uint32_t x = detail::float_bits(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: keep sign and top payload, set the quiet bit
      return bf16{std::uint16_t((x >> 16) | 0x0040u)};
    // Adding 0x7FFF plus the lowest kept bit rounds to nearest even; a carry out of the
    // mantissa correctly bumps the exponent (up to inf).
    const std::uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
    return bf16{std::uint16_t(rounded >> 16)};
  }
  static constexpr bf16 from_bits(std::uint16_t raw) { return bf16{raw}; }

  /// Exact: every bf16 is an fp32.
  float to_float() const { return detail::bits_float(std::uint32_t(bits) << 16); }
};

/// IEEE binary16 (1 sign, 5 exponent, 10 mantissa bits; largest finite 65504).
struct fp16 {
  std::uint16_t bits;

  /// Nearest fp16 (ties to even), subnormals included. NaN stays NaN (quiet, sign kept);
  /// +-inf stays +-inf; |value| >= 65520 (halfway past 65504) becomes +-inf.
  static fp16 from_float(float value) {
    const std::uint32_t x = detail::float_bits(value);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t mag = x & 0x7FFFFFFFu;
    if (mag > 0x7F800000u)  // NaN: keep the top 10 payload bits, set the quiet bit
      return fp16{std::uint16_t(sign | 0x7E00u | ((mag >> 13) & 0x03FFu))};
    if (mag >= 0x47800000u)  // >= 2^16 (inf included): beyond any rounding to 65504
      return fp16{std::uint16_t(sign | 0x7C00u)};
    if (mag >= 0x38800000u) {  // >= 2^-14: normal fp16 (or rounds up to inf)
      // Round the 23-bit mantissa to 10 bits (ties to even), then rebias 127 -> 15.
      // A carry from the mantissa moves into the exponent, which is what we want;
      // 65520 and above land exactly on 0x7C00 (inf).
      const std::uint32_t rounded = mag + 0x0FFFu + ((mag >> 13) & 1u);
      return fp16{std::uint16_t(sign | ((rounded >> 13) - (112u << 10)))};
    }
    if (mag <= 0x33000000u)  // <= 2^-25: zero (2^-25 itself ties to the even zero)
      return fp16{std::uint16_t(sign)};
    // Subnormal: value = m * 2^-24 with m = mantissa(with implicit 1) >> (126 - exponent).
    const std::uint32_t exponent = mag >> 23;  // 102 .. 112 here
    const std::uint32_t mantissa = (mag & 0x007FFFFFu) | 0x00800000u;
    const std::uint32_t shift = 126u - exponent;  // 14 .. 24
    std::uint32_t m = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (m & 1u))) ++m;  // may become 0x400, the smallest normal
    return fp16{std::uint16_t(sign | m)};
  }
  static constexpr fp16 from_bits(std::uint16_t raw) { return fp16{raw}; }

  /// Exact: every fp16 (subnormals, inf, NaN payloads) is representable in fp32.
  float to_float() const {
    const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
    const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
    const std::uint32_t mantissa = bits & 0x03FFu;
    if (exponent == 0x1Fu)  // inf or NaN, payload kept
      return detail::bits_float(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0)
      return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0) return detail::bits_float(sign);
    // Subnormal m * 2^-24: normalise so the leading 1 becomes the implicit bit.
    int e = 113;  // biased fp32 exponent of 2^-14
    std::uint32_t m = mantissa;
    while ((m & 0x0400u) == 0) {
      m <<= 1;
      --e;
    }
    return detail::bits_float(sign | (std::uint32_t(e) << 23) | ((m & 0x03FFu) << 13));
  }
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable<bf16>::value, "bf16 must be 2 plain bytes");
static_assert(sizeof(fp16) == 2 && std::is_trivially_copyable<fp16>::value, "fp16 must be 2 plain bytes");

namespace detail {

// Bulk conversions (portable loops; vectorised versions may replace them per ISA).
inline void to_float(const bf16* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = src[i].to_float();
}
inline void to_float(const fp16* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = src[i].to_float();
}
inline void to_float(const float* src, float* dst, std::size_t n) {
  if (n != 0) std::memcpy(dst, src, n * sizeof(float));
}
inline void from_float(const float* src, bf16* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16::from_float(src[i]);
}
inline void from_float(const float* src, fp16* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = fp16::from_float(src[i]);
}
inline void from_float(const float* src, float* dst, std::size_t n) {
  if (n != 0) std::memcpy(dst, src, n * sizeof(float));
}

}  // namespace detail

}  // namespace kvheads
