// The vector interface, checked lane by lane on every ISA compiled into this binary
// (scalar always; avx2/avx512/neon when the compiler flags enable them) against the
// scalar C++ meaning of each operation, plus the error bounds of exp and tanh.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>
#include <kvheads/simd/simd.hpp>
#include <kvheads/storage_types.hpp>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define KVHEADS_TEST_GUARD_PAGES 1
#endif

namespace {

namespace simd = kvheads::simd;

constexpr int max_width = 16;
const float inf = std::numeric_limits<float>::infinity();
const float qnan = std::numeric_limits<float>::quiet_NaN();

std::uint32_t bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

float from_bits(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// Same value, bit for bit (any NaN matches any NaN: payloads are not part of the contract).
bool same(float actual, float expected) {
  if (std::isnan(expected)) return std::isnan(actual);
  return bits(actual) == bits(expected);
}

/// Calls f(Isa{}) for every ISA compiled in that this CPU runs; a skipped one shows as a WARN.
template <class F>
void for_each_runnable_isa(F&& f) {
  simd::for_each_enabled_isa([&](auto isa) {
    using Isa = decltype(isa);
    if (!simd::cpu_supports<Isa>()) {
      WARN("skipping ISA " << Isa::name << ": compiled in, but this CPU cannot run it");
      return;
    }
    INFO("ISA " << Isa::name);
    f(isa);
  });
}

// Values that exercise signs, zeros, infinities, NaN, subnormals and rounding.
const std::vector<float>& interesting_values() {
  static const std::vector<float> values = {
      0.f,   -0.f,   1.f,     -1.f,    0.5f,   -0.5f,   1.5f,    -2.5f,  3.f,        -7.f,       0.1f,
      -0.3f, 1e-3f,  -1e-3f,  123.456f, -65536.f, 1e30f, -1e30f, FLT_MIN, -FLT_MIN, FLT_MAX,    -FLT_MAX,
      inf,   -inf,   qnan,     std::numeric_limits<float>::denorm_min(), 1.f + 1.f / 4096,   1.f - 1.f / 4096};
  return values;
}

// Applies a two-operand vector op to every ordered pair of interesting values and
// compares each lane with the scalar expression.
template <class Isa, class VecOp, class ScalarOp>
void check_binary(const char* what, VecOp vec_op, ScalarOp scalar_op) {
  const auto& values = interesting_values();
  const std::size_t count = values.size() * values.size();
  std::vector<float> a(count + max_width), b(count + max_width), out(count + max_width);
  for (std::size_t i = 0; i < count; ++i) {
    a[i] = values[i / values.size()];
    b[i] = values[i % values.size()];
  }
  for (std::size_t i = 0; i < count; i += Isa::width)
    Isa::store(&out[i], vec_op(Isa::load(&a[i]), Isa::load(&b[i])));
  int failures = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const float expected = scalar_op(a[i], b[i]);
    if (!same(out[i], expected) && failures++ < 5) {
      FAIL_CHECK(what << "(" << a[i] << ", " << b[i] << ") = " << out[i] << ", expected " << expected);
    }
  }
  CHECK(failures == 0);
}

template <class Isa>
std::array<float, max_width> lanes(typename Isa::vec v) {
  std::array<float, max_width> out{};
  Isa::store(out.data(), v);
  return out;
}

}  // namespace

TEST_CASE("simd: every ISA named in KVHEADS_REQUIRE_ISAS is compiled in and runs here", "[simd]") {
  // The per-ISA tests skip an ISA the build or the CPU lacks, with a warning, and Catch2
  // counts a skipped case as passed: CI names the ISAs its machine must test (.ci/run), so
  // a build or host without one fails here instead of passing with its tests unrun.
  const char* required = std::getenv("KVHEADS_REQUIRE_ISAS");
  if (required == nullptr || *required == 0) {
    WARN("KVHEADS_REQUIRE_ISAS is not set: no ISA is required to run");
    return;
  }
  std::stringstream names(required);
  std::string name;
  int checked = 0;
  while (std::getline(names, name, ',')) {
    name.erase(0, name.find_first_not_of(" \t"));  // "scalar, avx2" names avx2 too
    name.erase(name.find_last_not_of(" \t") + 1);
    if (name.empty()) continue;
    bool compiled = false, runs = false;
    simd::for_each_enabled_isa([&](auto isa) {
      using Isa = decltype(isa);
      if (name == Isa::name) compiled = true, runs = simd::cpu_supports<Isa>();
    });
    INFO("KVHEADS_REQUIRE_ISAS names " << name);
    CHECK(compiled);
    CHECK(runs);
    ++checked;
  }
  CHECK(checked > 0);
}

TEST_CASE("simd: every enabled ISA is listed, runs here, and the default is the widest", "[simd]") {
  std::string names;
  int widest = 0;
  simd::for_each_enabled_isa([&](auto isa) {
    using Isa = decltype(isa);
    names += std::string(names.empty() ? "" : ", ") + Isa::name;
    if (Isa::width > widest) widest = Isa::width;
    CHECK(sizeof(typename Isa::vec) == sizeof(float) * std::size_t(Isa::width));
    if (!simd::cpu_supports<Isa>()) WARN("ISA " << Isa::name << " is compiled in but this CPU cannot run it");
  });
  INFO("enabled ISAs: " << names);
  CHECK(std::tuple_size<simd::enabled_isas>::value >= 1);
  CHECK(simd::cpu_supports<simd::scalar>());
#if defined(KVHEADS_SIMD)
#define KVHEADS_TEST_STRING2(x) #x
#define KVHEADS_TEST_STRING(x) KVHEADS_TEST_STRING2(x)
  CHECK(std::string(simd::default_isa::name) == KVHEADS_TEST_STRING(KVHEADS_SIMD));
#else
  CHECK(simd::default_isa::width == widest);
#endif
#if defined(__AVX512F__)
  CHECK(names.find("avx512") != std::string::npos);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  CHECK(names.find("avx2") != std::string::npos);
#endif
#if defined(__aarch64__)
  CHECK(names.find("neon") != std::string::npos);
#endif
}

TEST_CASE("simd: zero, broadcast, load and store", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    std::array<float, max_width + 2> memory;
    for (int i = 0; i < max_width + 2; ++i) memory[std::size_t(i)] = float(i) * 1.25f - 3.f;
    const auto loaded = lanes<Isa>(Isa::load(memory.data() + 1));  // unaligned on purpose
    const auto zero = lanes<Isa>(Isa::zero());
    const auto broadcast = lanes<Isa>(Isa::broadcast(-2.5f));
    for (int i = 0; i < Isa::width; ++i) {
      CHECK(loaded[std::size_t(i)] == memory[std::size_t(i) + 1]);
      CHECK(bits(zero[std::size_t(i)]) == 0u);
      CHECK(broadcast[std::size_t(i)] == -2.5f);
    }
    std::array<float, max_width + 2> out;
    out.fill(99.f);
    Isa::store(out.data() + 1, Isa::load(memory.data() + 1));
    CHECK(out[0] == 99.f);
    for (int i = 0; i < Isa::width; ++i) CHECK(out[std::size_t(i) + 1] == memory[std::size_t(i) + 1]);
    CHECK(out[std::size_t(Isa::width) + 1] == 99.f);
  });
}

TEST_CASE("simd: load_partial reads n lanes and zeros the rest", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    for (int n = 0; n <= Isa::width; ++n) {
      INFO("n = " << n);
      // Lanes at and past n hold NaN guards in memory; they must read as +0.
      std::array<float, max_width> memory;
      memory.fill(qnan);
      for (int i = 0; i < n; ++i) memory[std::size_t(i)] = float(i + 1) * -0.75f;
      const auto got = lanes<Isa>(Isa::load_partial(memory.data(), n));
      for (int i = 0; i < Isa::width; ++i) {
        const float expected = i < n ? memory[std::size_t(i)] : 0.f;
        CHECK(bits(got[std::size_t(i)]) == bits(expected));
      }
    }
  });
}

TEST_CASE("simd: store_partial writes n lanes and leaves the rest untouched", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    std::array<float, max_width> values;
    for (int i = 0; i < max_width; ++i) values[std::size_t(i)] = float(i) + 0.5f;
    const auto v = Isa::load(values.data());
    for (int n = 0; n <= Isa::width; ++n) {
      INFO("n = " << n);
      std::array<float, max_width + 2> memory;
      memory.fill(-12345.f);
      Isa::store_partial(memory.data() + 1, v, n);
      CHECK(memory[0] == -12345.f);
      for (int i = 0; i < max_width; ++i) {
        const float expected = i < n ? values[std::size_t(i)] : -12345.f;
        CHECK(memory[std::size_t(i) + 1] == expected);
      }
      CHECK(memory[max_width + 1] == -12345.f);
    }
  });
}

#if defined(KVHEADS_TEST_GUARD_PAGES)
TEST_CASE("simd: partial loads and stores never touch memory outside p .. p + n - 1", "[simd]") {
  // One read-write page between two inaccessible ones: touching a byte outside the
  // middle page crashes the test binary, which is the failure we want to see.
  const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
  void* mapping = mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mapping != MAP_FAILED);
  char* base = static_cast<char*>(mapping);
  REQUIRE(mprotect(base, page, PROT_NONE) == 0);
  REQUIRE(mprotect(base + 2 * page, page, PROT_NONE) == 0);
  float* begin = reinterpret_cast<float*>(base + page);
  float* end = reinterpret_cast<float*>(base + 2 * page);
  for (float* p = begin; p != end; ++p) *p = 1.f;

  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (int n = 0; n <= Isa::width; ++n) {
      INFO("n = " << n);
      const auto at_end = lanes<Isa>(Isa::load_partial(end - n, n));
      const auto at_begin = lanes<Isa>(Isa::load_partial(begin, n));
      for (int i = 0; i < Isa::width; ++i) {
        CHECK(at_end[std::size_t(i)] == (i < n ? 1.f : 0.f));
        CHECK(at_begin[std::size_t(i)] == (i < n ? 1.f : 0.f));
      }
      Isa::store_partial(end - n, Isa::broadcast(2.f), n);
      Isa::store_partial(begin, Isa::broadcast(3.f), n);
      for (int i = 0; i < n; ++i) {
        CHECK(end[i - n] == 2.f);
        CHECK(begin[i] == 3.f);
      }
      for (float* p = begin; p != end; ++p) *p = 1.f;
    }
  });
  munmap(mapping, 3 * page);
}
#endif

TEST_CASE("simd: add, sub, mul, div and fma round like scalar IEEE arithmetic", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    check_binary<Isa>("add", [](auto a, auto b) { return Isa::add(a, b); }, [](float a, float b) { return a + b; });
    check_binary<Isa>("sub", [](auto a, auto b) { return Isa::sub(a, b); }, [](float a, float b) { return a - b; });
    check_binary<Isa>("mul", [](auto a, auto b) { return Isa::mul(a, b); }, [](float a, float b) { return a * b; });
    check_binary<Isa>("div", [](auto a, auto b) { return Isa::div(a, b); }, [](float a, float b) { return a / b; });
    // fma(a, b, c) with c = a and with c = -b covers every operand position.
    check_binary<Isa>(
        "fma(a, b, a)", [](auto a, auto b) { return Isa::fma(a, b, a); },
        [](float a, float b) { return std::fma(a, b, a); });
    check_binary<Isa>(
        "fma(a, b, -b)", [](auto a, auto b) { return Isa::fma(a, b, Isa::sub(Isa::zero(), b)); },
        [](float a, float b) { return std::fma(a, b, 0.f - b); });
    // Fused: (1 + 2^-12)(1 - 2^-12) - 1 = -2^-24 exactly; a separate multiply rounds it to 0.
    const float e = 1.f / 4096;
    const auto fused = lanes<Isa>(Isa::fma(Isa::broadcast(1.f + e), Isa::broadcast(1.f - e), Isa::broadcast(-1.f)));
    for (int i = 0; i < Isa::width; ++i) CHECK(fused[std::size_t(i)] == -e * e);
  });
}

TEST_CASE("simd: min and max have x86 semantics (second operand on NaN or equal)", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    check_binary<Isa>("min", [](auto a, auto b) { return Isa::min(a, b); },
                      [](float a, float b) { return a < b ? a : b; });
    check_binary<Isa>("max", [](auto a, auto b) { return Isa::max(a, b); },
                      [](float a, float b) { return a > b ? a : b; });
    // Spelled out, because exp relies on them to pass NaN through.
    CHECK(std::isnan(lanes<Isa>(Isa::max(Isa::broadcast(1.f), Isa::broadcast(qnan)))[0]));
    CHECK(lanes<Isa>(Isa::max(Isa::broadcast(qnan), Isa::broadcast(1.f)))[0] == 1.f);
    CHECK(std::isnan(lanes<Isa>(Isa::min(Isa::broadcast(1.f), Isa::broadcast(qnan)))[0]));
    CHECK(lanes<Isa>(Isa::min(Isa::broadcast(qnan), Isa::broadcast(1.f)))[0] == 1.f);
    CHECK(bits(lanes<Isa>(Isa::max(Isa::broadcast(-0.f), Isa::broadcast(0.f)))[0]) == bits(0.f));
    CHECK(bits(lanes<Isa>(Isa::max(Isa::broadcast(0.f), Isa::broadcast(-0.f)))[0]) == bits(-0.f));
  });
}

TEST_CASE("simd: abs and select_less", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    // abs through a binary op whose second operand is ignored.
    check_binary<Isa>("abs", [](auto a, auto) { return Isa::abs(a); }, [](float a, float) { return std::fabs(a); });
    // select_less(a, b, 1, 2): NaN compares false, equal compares false.
    check_binary<Isa>(
        "select_less", [](auto a, auto b) { return Isa::select_less(a, b, Isa::broadcast(1.f), Isa::broadcast(2.f)); },
        [](float a, float b) { return a < b ? 1.f : 2.f; });
    // The selected operands pass through bit for bit (including -0 and NaN).
    check_binary<Isa>(
        "select_less(1, 2, a, b)",
        [](auto a, auto b) { return Isa::select_less(Isa::broadcast(1.f), Isa::broadcast(2.f), a, b); },
        [](float a, float) { return a; });
    check_binary<Isa>(
        "select_less(2, 1, a, b)",
        [](auto a, auto b) { return Isa::select_less(Isa::broadcast(2.f), Isa::broadcast(1.f), a, b); },
        [](float, float b) { return b; });
  });
}

TEST_CASE("simd: reduce_sum and reduce_max over every lane count", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    // Small integers sum exactly in any order; padding lanes read as 0.
    std::array<float, max_width> data;
    for (int i = 0; i < max_width; ++i) data[std::size_t(i)] = float(i + 1);
    for (int n = 0; n <= Isa::width; ++n) {
      INFO("n = " << n);
      CHECK(Isa::reduce_sum(Isa::load_partial(data.data(), n)) == float(n * (n + 1) / 2));
    }
    // Non-integers: within the rounding of a width-term sum.
    std::array<float, max_width> mixed;
    double exact = 0, magnitude = 0;
    for (int i = 0; i < Isa::width; ++i) {
      mixed[std::size_t(i)] = std::sin(float(i) * 1.7f + 0.3f) * 1e3f;
      exact += double(mixed[std::size_t(i)]);
      magnitude += std::fabs(double(mixed[std::size_t(i)]));
    }
    CHECK(std::fabs(double(Isa::reduce_sum(Isa::load(mixed.data()))) - exact) <= magnitude * Isa::width * 6e-8);
    // The maximum at each position, among negative values, -inf and duplicates.
    for (int at = 0; at < Isa::width; ++at) {
      INFO("max at lane " << at);
      std::array<float, max_width> v;
      for (int i = 0; i < max_width; ++i) v[std::size_t(i)] = i % 3 == 0 ? -inf : -100.f - float(i);
      v[std::size_t(at)] = -1.5f;
      CHECK(Isa::reduce_max(Isa::load(v.data())) == -1.5f);
      v[std::size_t((at + 1) % Isa::width)] = -1.5f;
      CHECK(Isa::reduce_max(Isa::load(v.data())) == -1.5f);
    }
    CHECK(Isa::reduce_max(Isa::broadcast(-inf)) == -inf);
    CHECK(Isa::reduce_max(Isa::broadcast(inf)) == inf);
    CHECK(Isa::reduce_sum(Isa::broadcast(0.25f)) == 0.25f * float(Isa::width));
    CHECK(Isa::reduce_max(Isa::load_partial(data.data(), 1)) == 1.f);
  });
}

TEST_CASE("simd: reduce_sum_each sums each of width vectors into its lane", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    using V = typename Isa::vec;
    // Input i holds i * 100 + lane + 1 in each lane: every sum is distinct and exact, so a
    // lane that summed the wrong input or the wrong lanes shows up.
    V inputs[max_width];
    std::array<float, max_width> expected, lanes, got;
    for (int i = 0; i < Isa::width; ++i) {
      double sum = 0;
      for (int lane = 0; lane < Isa::width; ++lane) {
        lanes[std::size_t(lane)] = float(i * 100 + lane * lane + 1);
        sum += lanes[std::size_t(lane)];
      }
      inputs[i] = Isa::load(lanes.data());
      expected[std::size_t(i)] = float(sum);
    }
    Isa::store(got.data(), Isa::reduce_sum_each(inputs));
    for (int i = 0; i < Isa::width; ++i) {
      INFO(Isa::name << " lane " << i);
      CHECK(got[std::size_t(i)] == expected[std::size_t(i)]);
    }
  });
}

TEST_CASE("simd: round is to nearest, ties to even", "[simd]") {
  const std::vector<float> values = {0.5f,    1.5f,   2.5f,     3.5f,  -0.5f,        -1.5f,      -2.5f,       0.49999997f,
                                     -0.49999997f, 0.50000006f, 2.4f, -3.7f, 8388607.5f, -8388607.5f, 8388609.f, 1e10f,
                                     -1e10f,  0.f,    -0.f,     inf,   -inf,          qnan,        126.5f,      -126.5f,
                                     -125.99999f, 127.49999f, 1e-30f, -1e-30f};
  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (float x : values) {
      const float got = lanes<Isa>(Isa::round(Isa::broadcast(x)))[0];
      INFO("round(" << x << ") = " << got);
      CHECK(same(got, std::nearbyint(x)));
    }
  });
}

TEST_CASE("simd: pow2 is exact for n = -126 .. 127", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    for (int first = -126; first <= 127; first += Isa::width) {
      std::array<float, max_width> n;
      for (int i = 0; i < max_width; ++i) n[std::size_t(i)] = float(std::min(first + i, 127));
      const auto got = lanes<Isa>(Isa::pow2(Isa::load(n.data())));
      for (int i = 0; i < Isa::width; ++i) {
        INFO("2^" << n[std::size_t(i)]);
        CHECK(got[std::size_t(i)] == std::ldexp(1.f, int(n[std::size_t(i)])));
      }
    }
  });
}

TEST_CASE("simd: ldexp scales by 2^n exactly in the normal range, to 0 far below it", "[simd]") {
  const std::vector<float> mantissas = {1.f, 0.7f, 1.4142135f, 0.99999994f, 1.4999999f, -1.25f};
  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (float x : mantissas)
      for (int n = -160; n <= 127; ++n) {
        const float got = lanes<Isa>(Isa::ldexp(Isa::broadcast(x), Isa::broadcast(float(n))))[0];
        const float exact = std::ldexp(x, n);  // correctly rounded, subnormals included
        INFO("ldexp(" << x << ", " << n << ") = " << got << ", exact " << exact);
        if (std::fabs(exact) >= FLT_MIN) {
          CHECK(got == exact);
        } else if (n <= -151) {
          CHECK(got == 0.f);
        } else {  // the subnormal range: exact on AVX-512, 0 or exact elsewhere
          CHECK(std::fabs(double(got) - double(exact)) < std::ldexp(1.0, -125));
        }
      }
    CHECK(std::isnan(lanes<Isa>(Isa::ldexp(Isa::broadcast(qnan), Isa::broadcast(3.f)))[0]));
    CHECK(std::isnan(lanes<Isa>(Isa::ldexp(Isa::broadcast(qnan), Isa::broadcast(qnan)))[0]));
  });
}

namespace {

// A sweep over float bit patterns: [first, last] by step, all of one sign.
struct BitRange {
  std::uint32_t first, last, step;
};

struct SweepResult {
  double worst = 0;      // max error seen (NaN shows as +inf)
  float worst_x = 0;     // where
  std::uint64_t count = 0;
};

// Evaluates F<Isa> on every x of the ranges and tracks the max error against `reference`
// in double: relative (exp) or absolute (tanh). Blocks keep the reference shared by
// every ISA so each x costs one std::exp/std::tanh call in total.
template <bool Relative, class Reference, class Eval>
std::vector<SweepResult> sweep(const std::vector<BitRange>& ranges, Reference reference, Eval eval) {
  std::vector<SweepResult> results(std::tuple_size<simd::enabled_isas>::value);
  constexpr int block = 4096;
  std::vector<float> x(block), y(block);
  std::vector<double> ref(block);
  for (const BitRange& range : ranges) {
    std::uint64_t b = range.first;
    while (b <= range.last) {
      int n = 0;
      for (; n < block && b <= range.last; ++n, b += range.step) {
        x[std::size_t(n)] = from_bits(std::uint32_t(b));
        ref[std::size_t(n)] = reference(double(x[std::size_t(n)]));
      }
      std::size_t slot = 0;
      simd::for_each_enabled_isa([&](auto isa) {
        using Isa = decltype(isa);
        SweepResult& r = results[slot++];
        if (!simd::cpu_supports<Isa>()) return;
        eval(isa, x.data(), y.data(), n);
        double worst = r.worst;
        int worst_at = -1;
        for (int i = 0; i < n; ++i) {
          const double diff = std::fabs(double(y[std::size_t(i)]) - ref[std::size_t(i)]);
          const double err = Relative ? diff / ref[std::size_t(i)] : diff;
          if (!(err <= worst)) {
            worst = err == err ? err : INFINITY;
            worst_at = i;
          }
        }
        if (worst_at >= 0) {
          r.worst = worst;
          r.worst_x = x[std::size_t(worst_at)];
        }
        r.count += std::uint64_t(n);
      });
    }
  }
  return results;
}

template <class Isa>
void eval_exp(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += Isa::width)
    Isa::store_partial(y + i, simd::exp<Isa>(Isa::load_partial(x + i, n - i)), n - i);
}

template <class Isa>
void eval_exp_nonpositive(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += Isa::width)
    Isa::store_partial(y + i, simd::exp_nonpositive<Isa>(Isa::load_partial(x + i, n - i)), n - i);
}

template <class Isa>
void eval_tanh(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += Isa::width)
    Isa::store_partial(y + i, simd::tanh<Isa>(Isa::load_partial(x + i, n - i)), n - i);
}

// Both signs of [smallest, largest] by `step` bit patterns, every float near 0 and next
// to each end, and a denser look at [0.25, 0.5] (exp's reduction switches n at ln2/2,
// tanh its formula at 0.5): the sweep every run of the tests can afford.
std::vector<BitRange> sampled_ranges(float smallest, float largest_negative, float largest_positive,
                                     std::uint32_t step) {
  const std::uint32_t sign = 0x80000000u;
  const std::uint32_t lo = bits(smallest), hi_n = bits(largest_negative), hi_p = bits(largest_positive);
  return {
      {lo, hi_p, step},               {sign | lo, sign | hi_n, step},           // strided, both signs
      {0u, 4096u, 1u},                {sign, sign | 4096u, 1u},                 // +-0 and subnormals
      {hi_p - 20000u, hi_p, 1u},      {sign | (hi_n - 20000u), sign | hi_n, 1u},  // the range ends
      {bits(0.25f), bits(0.5f), 97u}, {sign | bits(0.25f), sign | bits(0.5f), 97u},
  };
}

// Every float of both signs in [0, largest]: the exhaustive measurement (about a minute).
std::vector<BitRange> every_float(float largest_negative, float largest_positive) {
  return {{0u, bits(largest_positive), 1u}, {0x80000000u, 0x80000000u | bits(largest_negative), 1u}};
}

void report(const char* what, const std::vector<SweepResult>& results, double bound, bool print) {
  std::size_t slot = 0;
  simd::for_each_enabled_isa([&](auto isa) {
    using Isa = decltype(isa);
    const SweepResult& r = results[slot++];
    if (!simd::cpu_supports<Isa>()) {
      WARN(what << ": ISA " << Isa::name << " skipped, this CPU cannot run it");
      return;
    }
    std::ostringstream line;
    line << what << " on " << Isa::name << ": max error " << r.worst << " at x = " << r.worst_x << " over "
         << r.count << " inputs";
    if (print) WARN(line.str());
    INFO(line.str());
    CHECK(r.count > 0);
    CHECK(r.worst <= bound);
  });
}

constexpr float exp_lowest = -87.33654f;
constexpr float exp_highest = 88.37626f;

double exp_reference(double x) { return std::exp(x); }
double tanh_reference(double x) { return std::tanh(x); }

}  // namespace

TEST_CASE("simd: exp special values", "[simd][exp]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    auto at = [](float x) { return lanes<Isa>(simd::exp<Isa>(Isa::broadcast(x)))[0]; };
    CHECK(bits(at(-inf)) == bits(0.f));
    CHECK(bits(at(-1e30f)) == bits(0.f));
    CHECK(bits(at(-FLT_MAX)) == bits(0.f));
    CHECK(bits(at(-88.f)) == bits(0.f));
    CHECK(bits(at(std::nextafter(exp_lowest, -inf))) == bits(0.f));
    CHECK(at(exp_lowest) >= FLT_MIN);  // the lowest input still gives a normal number
    CHECK(std::isnan(at(qnan)));
    CHECK(at(0.f) == 1.f);
    CHECK(at(-0.f) == 1.f);
    CHECK(at(1.f) == Approx(2.718281828).epsilon(2e-7));
    // Above the range the input is clamped, never inf or NaN.
    CHECK(at(inf) == at(exp_highest));
    CHECK(at(1000.f) == at(exp_highest));
    CHECK(std::isfinite(at(exp_highest)));
    // Lanes are independent: a vector mixing every special value.
    const auto& values = interesting_values();
    std::vector<float> y(values.size());
    eval_exp<Isa>(values.data(), y.data(), int(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i) {
      const float v = values[i];
      INFO("exp(" << v << ") = " << y[i]);
      if (std::isnan(v)) {
        CHECK(std::isnan(y[i]));
      } else if (v < exp_lowest) {
        CHECK(bits(y[i]) == bits(0.f));
      } else {
        const double expected = std::exp(double(std::min(v, exp_highest)));
        CHECK(std::fabs(double(y[i]) - expected) <= 2e-7 * expected);
      }
    }
    // Below the threshold the result is exactly 0, above it a normal number: never a subnormal.
    std::vector<float> low;
    for (float v = -104.f; v < -86.f; v += 1.f / 1024) low.push_back(v);
    low.push_back(exp_lowest);
    std::vector<float> low_out(low.size());
    const int n = int(low.size());
    eval_exp<Isa>(low.data(), low_out.data(), n);
    int failures = 0;
    for (int i = 0; i < n; ++i) {
      const float v = low[std::size_t(i)], got = low_out[std::size_t(i)];
      const bool ok = v < exp_lowest ? bits(got) == 0u : got >= FLT_MIN;
      if (!ok && failures++ < 5) FAIL_CHECK("exp(" << v << ") = " << got);
    }
    CHECK(failures == 0);
  });
}

TEST_CASE("simd: exp relative error <= 2e-7 from -87.33654 to 88.37626", "[simd][exp]") {
  // ~8.4 million inputs: every 73rd float from 2^-30 up to both ends of the range (so
  // every binade is visited with varied low bits) plus the dense windows of
  // sampled_ranges. The exhaustive sweep is the hidden test below.
  const auto ranges = sampled_ranges(std::ldexp(1.f, -30), exp_lowest, exp_highest, 73u);
  const auto results = sweep<true>(ranges, exp_reference,
                                   [](auto isa, const float* x, float* y, int n) { eval_exp<decltype(isa)>(x, y, n); });
  report("exp", results, 2e-7, false);
}

TEST_CASE("simd: exp_nonpositive special values and its subnormal tail", "[simd][exp]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    auto at = [](float x) { return lanes<Isa>(simd::exp_nonpositive<Isa>(Isa::broadcast(x)))[0]; };
    // Masked keys (-inf) and anything at or below -104 weigh exactly 0.
    for (float x : {-inf, -FLT_MAX, -1e30f, -1000.f, -110.f, -104.f})
      CHECK(bits(at(x)) == bits(0.f));
    CHECK(std::isnan(at(qnan)));
    CHECK(at(0.f) == 1.f);
    CHECK(at(-0.f) == 1.f);
    CHECK(at(-1.f) == Approx(0.36787944117).epsilon(2e-7));
    // Between exp's normal range and -104: subnormal or 0, within 2^-125 of e^x.
    std::vector<float> tail;
    for (float v = -110.f; v <= exp_lowest; v += 1.f / 256) tail.push_back(v);
    std::vector<float> out(tail.size());
    eval_exp_nonpositive<Isa>(tail.data(), out.data(), int(tail.size()));
    int failures = 0;
    for (std::size_t i = 0; i < tail.size(); ++i) {
      const double error = std::fabs(double(out[i]) - std::exp(double(tail[i])));
      const bool ok = out[i] >= 0.f && error < std::ldexp(1.0, -125) && (tail[i] > -104.f || out[i] == 0.f);
      if (!ok && failures++ < 5) FAIL_CHECK("exp_nonpositive(" << tail[i] << ") = " << out[i]);
    }
    CHECK(failures == 0);
  });
}

TEST_CASE("simd: exp_nonpositive is exp bit for bit from -87.33654 to 0", "[simd][exp]") {
  // Same reduction and polynomial: the error bound of exp carries over. Every 997th
  // float of [-87.33654, -2^-30] (about 8,400 per binade, 306,000 in all).
  const std::uint32_t sign = 0x80000000u;
  const std::uint32_t first = sign | bits(std::ldexp(1.f, -30)), last = sign | bits(exp_lowest);
  std::vector<float> x, a, b;
  for (std::uint64_t pattern = first; pattern <= last; pattern += 997) x.push_back(from_bits(std::uint32_t(pattern)));
  x.push_back(exp_lowest);
  x.push_back(0.f);
  x.push_back(-0.f);
  a.resize(x.size());
  b.resize(x.size());
  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    eval_exp<Isa>(x.data(), a.data(), int(x.size()));
    eval_exp_nonpositive<Isa>(x.data(), b.data(), int(x.size()));
    int failures = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      if (bits(a[i]) != bits(b[i]) && failures++ < 5)
        FAIL_CHECK("x = " << x[i] << ": exp " << a[i] << ", exp_nonpositive " << b[i]);
    CHECK(failures == 0);
  });
  const auto results = sweep<true>({{first, last, 7919u}}, exp_reference, [](auto isa, const float* in, float* out, int n) {
    eval_exp_nonpositive<decltype(isa)>(in, out, n);
  });
  report("exp_nonpositive", results, 2e-7, false);
}

TEST_CASE("simd: exp_nonpositive_each gives every vector exp_nonpositive's bits", "[simd][exp]") {
  // The softmax takes its exponentials N vectors at a time; the results must not depend
  // on N or on a vector's place among the N. Inputs: every 997th float of
  // [-87.33654, -2^-30], every 61st of the subnormal tail below it to -110, then -inf,
  // NaN, both zeros, -104 and the normal range's edge, each in every lane of N vectors.
  const std::uint32_t sign = 0x80000000u;
  std::vector<float> regular;
  for (std::uint64_t pattern = sign | bits(std::ldexp(1.f, -30)); pattern < (sign | bits(exp_lowest)); pattern += 997)
    regular.push_back(from_bits(std::uint32_t(pattern)));
  for (std::uint64_t pattern = sign | bits(exp_lowest); pattern <= (sign | bits(110.f)); pattern += 61)
    regular.push_back(from_bits(std::uint32_t(pattern)));
  const std::vector<float> special = {-inf, qnan, 0.f, -0.f, -104.f, exp_lowest};
  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    using V = typename Isa::vec;
    const auto check_each = [&](auto n_vectors) {
      constexpr int N = decltype(n_vectors)::value;
      constexpr int floats = N * Isa::width;
      int failures = 0;
      const auto check_group = [&](const float (&in)[floats]) {
        V vectors[N];
        for (int k = 0; k < N; ++k) vectors[k] = Isa::load(in + k * Isa::width);
        simd::exp_nonpositive_each<Isa, N>(vectors);
        float out[floats];
        for (int k = 0; k < N; ++k) Isa::store(out + k * Isa::width, vectors[k]);
        for (int i = 0; i < floats; ++i) {
          const float one = lanes<Isa>(simd::exp_nonpositive<Isa>(Isa::broadcast(in[i])))[0];
          if (bits(one) != bits(out[i]) && failures++ < 5)
            FAIL_CHECK(Isa::name << ", " << N << " vectors: x = " << in[i] << ": " << out[i] << ", alone " << one);
        }
      };
      float in[floats];
      for (std::size_t first = 0; first < regular.size(); first += floats) {
        for (int i = 0; i < floats; ++i) in[i] = regular[(first + std::size_t(i)) % regular.size()];
        check_group(in);
      }
      for (float value : special)
        for (int lane = 0; lane < floats; ++lane) {
          for (int i = 0; i < floats; ++i) in[i] = regular[std::size_t(lane * floats + i) % regular.size()];
          in[lane] = value;
          check_group(in);
        }
      CHECK(failures == 0);
    };
    check_each(std::integral_constant<int, 2>{});
    check_each(std::integral_constant<int, 3>{});
    check_each(std::integral_constant<int, 4>{});
  });
}

TEST_CASE("simd: tanh special values", "[simd][tanh]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    auto at = [](float x) { return lanes<Isa>(simd::tanh<Isa>(Isa::broadcast(x)))[0]; };
    CHECK(at(inf) == 1.f);
    CHECK(at(-inf) == -1.f);
    CHECK(at(1e30f) == 1.f);
    CHECK(at(-1e30f) == -1.f);
    CHECK(at(FLT_MAX) == 1.f);
    CHECK(std::isnan(at(qnan)));
    CHECK(at(0.f) == 0.f);
    CHECK(at(-0.f) == 0.f);
    CHECK(at(1e-30f) == 1e-30f);
    CHECK(at(-1e-30f) == -1e-30f);
    CHECK(std::fabs(double(at(0.5f)) - std::tanh(0.5)) <= 2e-7);
    CHECK(std::fabs(double(at(-0.5f)) - std::tanh(-0.5)) <= 2e-7);
  });
}

TEST_CASE("simd: tanh absolute error <= 2e-7 from -20 to 20", "[simd][tanh]") {
  // ~4.1 million inputs, sampled as for exp.
  const auto ranges = sampled_ranges(std::ldexp(1.f, -30), -20.f, 20.f, 139u);
  const auto results = sweep<false>(ranges, tanh_reference,
                                    [](auto isa, const float* x, float* y, int n) { eval_tanh<decltype(isa)>(x, y, n); });
  report("tanh", results, 2e-7, false);
}

TEST_CASE("simd: max_finite_magnitude leaves out inf and NaN, at every position and length", "[simd]") {
  for_each_runnable_isa([](auto isa) {
    using Isa = decltype(isa);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // Lengths through the four-vector loop, the one-vector loop and every tail; the floats
    // past n are larger than any inside, so a read past the end changes the result.
    for (int n = 0; n <= 9 * Isa::width + 3; ++n) {
      INFO("n = " << n);
      std::vector<float> data(std::size_t(n) + 2 * max_width, 1e30f);
      for (int i = 0; i < n; ++i) data[std::size_t(i)] = std::sin(float(i) * 0.7f) * 10.f;
      double expected = 0;
      for (int i = 0; i < n; ++i) expected = std::max(expected, std::fabs(double(data[std::size_t(i)])));
      CHECK(kvheads::simd::max_finite_magnitude<Isa>(data.data(), n) == float(expected));
      for (int at = 0; at < n; ++at) {
        INFO("largest at " << at);
        std::vector<float> with = data;
        with[std::size_t(at)] = at % 2 ? -5000.f : 5000.f;
        with[std::size_t((at + 1) % n)] = at % 3 ? inf : -inf;  // the largest may be overwritten:
        with[std::size_t((at + 2) % n)] = nan;                   // then only non-finite values remain big
        double want = 0;
        for (int i = 0; i < n; ++i)
          if (std::isfinite(with[std::size_t(i)])) want = std::max(want, std::fabs(double(with[std::size_t(i)])));
        CHECK(kvheads::simd::max_finite_magnitude<Isa>(with.data(), n) == float(want));
      }
      std::vector<float> non_finite(std::size_t(n) + 2 * max_width, 1e30f);
      for (int i = 0; i < n; ++i) non_finite[std::size_t(i)] = i % 2 ? nan : i % 4 ? inf : -inf;
      CHECK(kvheads::simd::max_finite_magnitude<Isa>(non_finite.data(), n) == 0.f);
    }
    const float largest = std::numeric_limits<float>::max();
    const float edge[] = {-largest, 1.f};
    CHECK(kvheads::simd::max_finite_magnitude<Isa>(edge, 2) == largest);
  });
}

TEST_CASE("simd: narrow to fp16 gives fp16::from_float's bits, over the float range and at every length", "[simd]") {
  // Every float that decides a rounding: each fp16 value, the midpoints between
  // neighbours (ties to even), and the floats one ulp either side of both, in both signs,
  // subnormals, 65504 and 65520 (the overflow edge) included; then every 65521st bit
  // pattern (NaN payloads, sNaN, the whole exponent range); then the named specials.
  std::vector<float> values;
  const auto push_near = [&](float x) {
    values.push_back(std::nextafter(x, -INFINITY));
    values.push_back(x);
    values.push_back(std::nextafter(x, INFINITY));
  };
  for (std::uint32_t bits = 0; bits < 0x7C00u; ++bits) {
    const float here = kvheads::fp16::from_bits(std::uint16_t(bits)).to_float();
    // Past 65504 the next step would be 65536 (where fp16 has inf): the midpoint is 65520,
    // the overflow edge.
    const float next = bits == 0x7BFFu ? 65536.f : kvheads::fp16::from_bits(std::uint16_t(bits + 1)).to_float();
    const float midpoint = float((double(here) + double(next)) / 2);  // exact in float
    for (const float sign : {1.f, -1.f}) {
      push_near(sign * here);
      push_near(sign * midpoint);
    }
  }
  for (std::uint64_t bits = 0; bits <= 0xFFFFFFFFu; bits += 65521) {
    float x;
    const auto narrow_bits = std::uint32_t(bits);
    std::memcpy(&x, &narrow_bits, sizeof x);
    values.push_back(x);
  }
  for (const std::uint32_t bits : {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00001u, 0x7F800001u, 0xFFBFFFFFu,
                                   0x7F7FFFFFu, 0x00000001u, 0x80000000u, 0x477FE000u, 0x477FEFFFu, 0x477FF000u,
                                   0x477FF001u}) {
    float x;
    std::memcpy(&x, &bits, sizeof x);
    values.push_back(x);
  }
  std::vector<std::uint16_t> want(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) want[i] = kvheads::fp16::from_float(values[i]).bits;

  for_each_runnable_isa([&](auto isa) {
    using Isa = decltype(isa);
    std::vector<kvheads::fp16> got(values.size());
    kvheads::simd::narrow<Isa>(values.data(), got.data(), std::ptrdiff_t(values.size()));
    std::size_t mismatches = 0, first = values.size();
    for (std::size_t i = 0; i < values.size(); ++i)
      if (got[i].bits != want[i]) {
        ++mismatches;
        first = std::min(first, i);
      }
    INFO(values.size() << " values; first mismatch at " << first << " of value bits 0x" << std::hex
                       << (first < values.size() ? kvheads::detail::float_bits(values[first]) : 0u));
    CHECK(mismatches == 0);
    // Every length through the vector loop and the tail, at every offset in a vector:
    // nothing past n is written.
    const std::uint16_t guard = 0x5A5A;
    for (int offset = 0; offset < Isa::width; ++offset)
      for (int n = 0; n <= 3 * Isa::width + 3; ++n) {
        std::vector<kvheads::fp16> out(std::size_t(n) + max_width, kvheads::fp16::from_bits(guard));
        kvheads::simd::narrow<Isa>(values.data() + offset, out.data(), n);
        bool same = true, untouched = true;
        for (int i = 0; i < n; ++i) same = same && out[std::size_t(i)].bits == want[std::size_t(offset + i)];
        for (std::size_t i = std::size_t(n); i < out.size(); ++i) untouched = untouched && out[i].bits == guard;
        INFO("offset " << offset << ", n = " << n);
        CHECK(same);
        CHECK(untouched);
      }
  });
}

// Run on purpose with: <test binary> "[exhaustive]" (about a minute per function on
// one x86 core; much longer under qemu). Prints the measured figures quoted in vector_math.hpp.
TEST_CASE("simd: exp over every float of its range", "[.exhaustive][simd][exp]") {
  const auto results = sweep<true>(every_float(exp_lowest, exp_highest), exp_reference,
                                   [](auto isa, const float* x, float* y, int n) { eval_exp<decltype(isa)>(x, y, n); });
  report("exp (every float)", results, 2e-7, true);
}

TEST_CASE("simd: tanh over every float from -20 to 20", "[.exhaustive][simd][tanh]") {
  const auto results = sweep<false>(every_float(-20.f, 20.f), tanh_reference,
                                    [](auto isa, const float* x, float* y, int n) { eval_tanh<decltype(isa)>(x, y, n); });
  report("tanh (every float)", results, 2e-7, true);
}
