// bf16 / fp16 storage: exhaustive round trips over every 16-bit pattern, and
// from_float checked against an independent double-precision nearest-even reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include "kvheads/storage_types.hpp"

namespace {

using kvheads::bf16;
using kvheads::fp16;

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Value of a 16-bit pattern from the format definition (sign, exponent, mantissa), in double.
double decode(std::uint16_t bits, int exponent_bits, int mantissa_bits) {
  const int bias = (1 << (exponent_bits - 1)) - 1;
  const int e = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int m = bits & ((1 << mantissa_bits) - 1);
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if (e == (1 << exponent_bits) - 1)
    return m == 0 ? sign * std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(double(m), 1 - bias - mantissa_bits);
  return sign * std::ldexp(1.0 + std::ldexp(double(m), -mantissa_bits), e - bias);
}

// Nearest-even reference: every positive finite value of the format, plus "inf" standing in
// for 2^(emax+1), where unbounded-exponent rounding would land (the largest finite value has
// an odd mantissa, so a tie there goes to inf, as IEEE requires).
struct Reference {
  std::vector<double> values;       // ascending, index i <-> bits[i]
  std::vector<std::uint16_t> bits;  // positive encodings

  Reference(int exponent_bits, int mantissa_bits) {
    const std::uint16_t inf = std::uint16_t(((1u << exponent_bits) - 1u) << mantissa_bits);
    for (std::uint32_t b = 0; b < inf; ++b) {
      values.push_back(decode(std::uint16_t(b), exponent_bits, mantissa_bits));
      bits.push_back(std::uint16_t(b));
    }
    const int bias = (1 << (exponent_bits - 1)) - 1;
    values.push_back(std::ldexp(1.0, bias + 1));
    bits.push_back(inf);
  }

  std::uint16_t round(float f) const {
    const std::uint16_t sign = (bits_of(f) & 0x80000000u) ? 0x8000 : 0;
    const double a = std::fabs(double(f));
    if (std::isinf(a) || a >= values.back()) return std::uint16_t(sign | bits.back());
    const auto it = std::lower_bound(values.begin(), values.end(), a);
    std::size_t hi = std::size_t(it - values.begin());
    if (values[hi] == a) return std::uint16_t(sign | bits[hi]);
    const std::size_t lo = hi - 1;  // a > 0 = values[0], so hi >= 1
    const double below = a - values[lo], above = values[hi] - a;
    std::size_t pick = below < above ? lo : hi;
    if (below == above) pick = (bits[lo] & 1) ? hi : lo;
    return std::uint16_t(sign | bits[pick]);
  }
};

const Reference& bf16_reference() {
  static const Reference r(8, 7);
  return r;
}
const Reference& fp16_reference() {
  static const Reference r(5, 10);
  return r;
}

// The floats every check runs over: a stride sweep over all 2^32 patterns, random patterns,
// and for each format every value, every midpoint between neighbours and the floats next to them.
std::vector<float> probe_floats() {
  std::vector<float> out;
  for (std::uint64_t u = 0; u <= 0xFFFFFFFFull; u += 4099) out.push_back(float_of(std::uint32_t(u)));
  std::mt19937 rng(12345);
  for (int i = 0; i < 200000; ++i) out.push_back(float_of(rng()));
  for (const Reference* ref : {&bf16_reference(), &fp16_reference()}) {
    for (std::size_t i = 0; i + 1 < ref->values.size(); ++i) {
      const float v = float(ref->values[i]);
      const float mid = float((ref->values[i] + ref->values[i + 1]) / 2);  // exact in fp32
      for (float f : {v, mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) {
        out.push_back(f);
        out.push_back(-f);
      }
    }
  }
  for (float f : {0.f, -0.f, 65504.f, 65519.f, 65520.f, 65535.f, 65536.f, 1e10f, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), INFINITY, -INFINITY,
                  5.9604644775390625e-8f /* 2^-24 */, 2.98023223876953125e-8f /* 2^-25 */})
    out.push_back(f);
  return out;
}

}  // namespace

TEST_CASE("bf16 and fp16 are two plain bytes", "[storage]") {
  STATIC_REQUIRE(sizeof(bf16) == 2);
  STATIC_REQUIRE(sizeof(fp16) == 2);
  STATIC_REQUIRE(std::is_trivially_copyable<bf16>::value);
  STATIC_REQUIRE(std::is_trivially_copyable<fp16>::value);
  STATIC_REQUIRE(kvheads::bf16::from_bits(0x3F80).bits == 0x3F80);
}

TEST_CASE("to_float is exact for all 65536 patterns", "[storage]") {
  int bf16_mismatch = 0, fp16_mismatch = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = std::uint16_t(b);
    const double want_bf = decode(bits, 8, 7), want_fp = decode(bits, 5, 10);
    const float got_bf = bf16{bits}.to_float(), got_fp = fp16{bits}.to_float();
    if (std::isnan(want_bf) ? !std::isnan(got_bf) : double(got_bf) != want_bf) ++bf16_mismatch;
    if (std::isnan(want_fp) ? !std::isnan(got_fp) : double(got_fp) != want_fp) ++fp16_mismatch;
    // The sign of zero survives too.
    if (!std::isnan(got_bf)) REQUIRE(std::signbit(got_bf) == bool(bits & 0x8000));
    if (!std::isnan(got_fp)) REQUIRE(std::signbit(got_fp) == bool(bits & 0x8000));
  }
  CHECK(bf16_mismatch == 0);
  CHECK(fp16_mismatch == 0);
}

TEST_CASE("to_float then from_float round-trips all 65536 patterns", "[storage]") {
  int bf16_bad = 0, fp16_bad = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = std::uint16_t(b);
    const bool bf_nan = (bits & 0x7F80) == 0x7F80 && (bits & 0x007F) != 0;
    const bool fp_nan = (bits & 0x7C00) == 0x7C00 && (bits & 0x03FF) != 0;
    const std::uint16_t bf_back = bf16::from_float(bf16{bits}.to_float()).bits;
    const std::uint16_t fp_back = fp16::from_float(fp16{bits}.to_float()).bits;
    // NaN keeps sign and payload and comes back quiet; everything else comes back identical.
    if (bf_back != (bf_nan ? (bits | 0x0040) : bits)) ++bf16_bad;
    if (fp_back != (fp_nan ? (bits | 0x0200) : bits)) ++fp16_bad;
  }
  CHECK(bf16_bad == 0);
  CHECK(fp16_bad == 0);
}

TEST_CASE("from_float rounds to nearest even like a double-precision reference", "[storage]") {
  const std::vector<float> probes = probe_floats();
  INFO(probes.size() << " probe floats");
  REQUIRE(probes.size() > 1000000);
  std::size_t bf16_bad = 0, fp16_bad = 0, nans = 0;
  float first_bad_bf = 0, first_bad_fp = 0;
  for (float f : probes) {
    const std::uint16_t got_bf = bf16::from_float(f).bits, got_fp = fp16::from_float(f).bits;
    if (std::isnan(f)) {
      ++nans;
      // Quiet NaN out, sign kept.
      if ((got_bf & 0x7FC0) != 0x7FC0 || bool(got_bf & 0x8000) != std::signbit(f)) ++bf16_bad;
      if ((got_fp & 0x7E00) != 0x7E00 || bool(got_fp & 0x8000) != std::signbit(f)) ++fp16_bad;
      continue;
    }
    if (got_bf != bf16_reference().round(f) && bf16_bad++ == 0) first_bad_bf = f;
    if (got_fp != fp16_reference().round(f) && fp16_bad++ == 0) first_bad_fp = f;
  }
  INFO("first bf16 mismatch " << first_bad_bf << ", first fp16 mismatch " << first_bad_fp);
  CHECK(nans > 100);
  CHECK(bf16_bad == 0);
  CHECK(fp16_bad == 0);
}

TEST_CASE("named edge cases", "[storage]") {
  // Ties to even.
  CHECK(bf16::from_float(float_of(0x3F808000u)).bits == 0x3F80);  // 1 + 2^-8: tie, 0x3F80 even
  CHECK(bf16::from_float(float_of(0x3F818000u)).bits == 0x3F82);  // tie, rounds up to even
  CHECK(fp16::from_float(1.f + 1.f / 2048).bits == 0x3C00);       // tie between 1 and 1+2^-10
  CHECK(fp16::from_float(1.f + 3.f / 2048).bits == 0x3C02);
  // Overflow boundary of fp16: 65504 is the largest finite, 65520 the first value to round to inf.
  CHECK(fp16::from_float(65504.f).bits == 0x7BFF);
  CHECK(fp16::from_float(std::nextafter(65520.f, 0.f)).bits == 0x7BFF);
  CHECK(fp16::from_float(65520.f).bits == 0x7C00);
  CHECK(fp16::from_float(-65520.f).bits == 0xFC00);
  CHECK(fp16::from_float(1e30f).bits == 0x7C00);
  CHECK(bf16::from_float(std::numeric_limits<float>::max()).bits == 0x7F80);
  CHECK(bf16::from_float(-INFINITY).bits == 0xFF80);
  // fp16 subnormals: 2^-24 is the smallest; 2^-25 ties to zero; just above it rounds up.
  CHECK(fp16::from_float(5.9604644775390625e-8f).bits == 0x0001);
  CHECK(fp16::from_float(2.98023223876953125e-8f).bits == 0x0000);
  CHECK(fp16::from_float(std::nextafter(2.98023223876953125e-8f, 1.f)).bits == 0x0001);
  CHECK(fp16::from_float(-3 * 2.98023223876953125e-8f).bits == 0x8002);  // 1.5 * 2^-24 ties to 2
  CHECK(fp16::from_float(6.097555160522461e-05f).bits == 0x03FF);      // largest subnormal
  CHECK(fp16::from_float(6.103515625e-05f).bits == 0x0400);            // smallest normal
  CHECK(fp16::from_float(-0.f).bits == 0x8000);
  // NaN stays NaN and becomes quiet.
  const float snan = float_of(0x7F800001u);
  CHECK(std::isnan(bf16::from_float(snan).to_float()));
  CHECK(std::isnan(fp16::from_float(snan).to_float()));
  CHECK((fp16::from_float(snan).bits & 0x7E00) == 0x7E00);
  CHECK((bf16::from_float(snan).bits & 0x7FC0) == 0x7FC0);
}

TEST_CASE("bulk helpers match the scalar conversions", "[storage]") {
  std::vector<float> src;
  for (int i = -300; i <= 300; ++i) src.push_back(float(i) * 0.37f + 1e-6f * float(i * i));
  src.push_back(NAN);
  src.push_back(INFINITY);
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(7), src.size()}) {
    std::vector<bf16> b(n);
    std::vector<fp16> h(n);
    std::vector<float> back_b(n), back_h(n), copy(n);
    kvheads::detail::from_float(src.data(), b.data(), n);
    kvheads::detail::from_float(src.data(), h.data(), n);
    kvheads::detail::to_float(b.data(), back_b.data(), n);
    kvheads::detail::to_float(h.data(), back_h.data(), n);
    kvheads::detail::from_float(src.data(), copy.data(), n);
    for (std::size_t i = 0; i < n; ++i) {
      REQUIRE(b[i].bits == bf16::from_float(src[i]).bits);
      REQUIRE(h[i].bits == fp16::from_float(src[i]).bits);
      REQUIRE(bits_of(back_b[i]) == bits_of(b[i].to_float()));
      REQUIRE(bits_of(back_h[i]) == bits_of(h[i].to_float()));
      REQUIRE(bits_of(copy[i]) == bits_of(src[i]));
    }
  }
}
