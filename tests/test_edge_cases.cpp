// Numerical edge cases, each on every ISA this CPU runs, on the plain and the cache path,
// against the double-precision reference: huge logits, one-hot and uniform softmax,
// NaN and +-inf inputs (NaN stays in the rows that see it), fully masked rows, kv_len 1,
// a cache of more than 2^20 tokens, and denormal inputs.
//
// Defined behaviour for non-finite inputs (what these tests hold):
//  - NaN in q: that query row of that query head is NaN; nothing else changes.
//  - NaN in a key or value a row sees: that row (for NaN in v: that row's element) is NaN,
//    for every query head of the KV head's group and every query row that sees the key;
//    no other row or head changes.
//  - NaN or inf in a key or value a row does not see (masked by causal or window): nothing.
//  - +-inf in q or k: logits become +-inf. A +inf logit makes the row NaN (inf - inf);
//    a -inf logit gives that key weight 0, like a masked key; a row whose every visible
//    logit is -inf outputs zeros with lse -inf, like a fully masked row.
//  - Logits must be finite in fp32 (|q.k * scale| < 3.4e38); larger overflow to inf.
//    scale * q itself may overflow (a scale above 1 multiplies the logits, not the queries).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_isas.hpp"
#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;
using namespace kvheads_test;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

/// Whether KVHEADS_TEST_ISAS (comma-separated ISA names; unset: every one) selects Isa.
/// .ci/run's qemu phase sets it to neon: the scalar path runs natively on x86 in the other
/// phases (as x86 code, not aarch64 code), and emulating it too took these tests from 43 s
/// to 84 s of test time there.
template <class Isa>
bool selected_by_environment() {
  const char* list = std::getenv("KVHEADS_TEST_ISAS");
  if (!list) return true;
  std::string names = std::string(",") + list + ",";
  if (names.find(std::string(",") + Isa::name + ",") != std::string::npos) return true;
  WARN(Isa::name << " is left out by KVHEADS_TEST_ISAS=" << list);
  return false;
}

/// Calls f(Isa{}) for every ISA compiled in that this CPU can run (and the environment
/// selects).
template <class F>
void for_each_cpu_isa(F&& f) {
  int ran = 0;
  kvheads::simd::for_each_enabled_isa([&](auto isa) {
    using Isa = decltype(isa);
    if (selected_by_environment<Isa>() && cpu_runs<Isa>()) {
      f(isa);
      ++ran;
    }
  });
  if (ran == 0) FAIL("no ISA ran (KVHEADS_TEST_ISAS selects none this build and CPU run)");
}

struct Result {
  std::vector<float> out, lse;
};

template <class Isa>
Result run_plain(const Problem& p, const AttentionOptions& options) {
  Result r{std::vector<float>(p.out_size(), -123.f), std::vector<float>(std::size_t(p.q_len) * p.layout.q_heads, -123.f)};
  kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), r.out.data(), p.q_len, p.kv_len, p.layout, options,
                       r.lse.data());
  return r;
}

template <class Isa>
Result run_cache(const Problem& p, const AttentionOptions& options) {
  KvCache<float> cache(p.layout, p.kv_len);
  cache.append(p.k.data(), p.v.data(), p.kv_len);
  Result r{std::vector<float>(p.out_size(), -123.f), std::vector<float>(std::size_t(p.q_len) * p.layout.q_heads, -123.f)};
  kvheads::attend<Isa>(p.q.data(), p.q_len, cache, r.out.data(), options, r.lse.data());
  return r;
}

Result run_reference(const Problem& p, const AttentionOptions& options) {
  Result r;
  r.out = p.reference(options, &r.lse);
  return r;
}

/// Checks the plain path (and the cache path when q_len <= kv_len) of Isa against the
/// reference, threads 1 and 2: same NaN/inf positions, values within tolerance.
template <class Isa>
void check_paths(const Problem& p, AttentionOptions options, double tol = tolerance) {
  const Result expected = run_reference(p, options);
  for (int threads : {1, 2}) {
    options.threads = threads;
    INFO(describe(p.layout, p.q_len, p.kv_len, options) << " isa " << Isa::name);
    const Result plain = run_plain<Isa>(p, options);
    CHECK(relative_error(plain.out, expected.out) <= tol);
    CHECK(relative_error(plain.lse, expected.lse, 1.0) <= tol);
    if (p.kv_len > 0 && p.q_len <= p.kv_len) {
      const Result cached = run_cache<Isa>(p, options);
      CHECK(relative_error(cached.out, expected.out) <= tol);
      CHECK(relative_error(cached.lse, expected.lse, 1.0) <= tol);
    }
  }
}

/// Every element of out row (query i, head h) as a predicate's verdict: which rows must
/// hold a NaN somewhere, and that every other row is entirely finite.
void check_nan_rows(const std::vector<float>& out, const HeadLayout& layout, int q_len,
                    const std::function<bool(int, int)>& nan_expected, const char* what) {
  for (int i = 0; i < q_len; ++i)
    for (int h = 0; h < layout.q_heads; ++h) {
      bool any_nan = false, all_finite = true;
      for (int d = 0; d < layout.head_dim; ++d) {
        const float x = out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d];
        any_nan = any_nan || std::isnan(x);
        all_finite = all_finite && std::isfinite(x);
      }
      INFO(what << ": query row " << i << ", q_head " << h);
      if (nan_expected(i, h))
        CHECK(any_nan);
      else
        CHECK(all_finite);
    }
}

float& at(std::vector<float>& x, const HeadLayout& layout, int heads, int token, int head, int d) {
  (void)layout;
  return x[(std::size_t(token) * heads + head) * layout.head_dim + d];
}

/// Visible key range of query row i under options (bottom-right aligned), inclusive.
bool sees(const AttentionOptions& o, int q_len, int kv_len, int i, int j) {
  const int position = kv_len - q_len + i;
  if ((o.causal || o.window > 0) && j > position) return false;
  if (o.window > 0 && j <= position - o.window) return false;
  return j >= 0 && j < kv_len;
}

/// Integer-valued data in [-range, range] times `unit`: q.k stays exact in fp32 as long as
/// |q.k| < 2^24 * unit^2, so the kernel and the reference see identical logits.
std::vector<float> integer_vector(std::size_t n, std::uint32_t seed, int range, float unit) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(-range, range);
  std::vector<float> out(n);
  for (float& x : out) x = float(pick(rng)) * unit;
  return out;
}

}  // namespace

TEST_CASE("logits of magnitude 1e4 to 1e37 neither overflow nor lose the reference's result", "[edge]") {
  // q.k exact in fp32 (integer data, power-of-two scale), so the only differences left are
  // the softmax's own rounding: any overflow or lost max shift shows up as a large error.
  struct Case {
    int range;
    float q_unit, k_unit;
  };
  // |q.k| up to about: 1.6e4, 1.4e6, 3e16, 2e37.
  const std::vector<Case> cases = {{32, 1.f, 1.f}, {300, 1.f, 1.f}, {8, 0x1p40f, 0x1p10f}, {4, 0x1p60f, 0x1p60f}};
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const Case& c : cases)
      for (const HeadLayout& layout : {HeadLayout{4, 2, 16}, HeadLayout{8, 1, 16}, HeadLayout{3, 3, 5}})
        for (const auto& lengths : {std::pair{1, 70}, std::pair{7, 130}, std::pair{1, 1500}}) {
          const int q_len = lengths.first, kv_len = lengths.second;
          Problem p(layout, q_len, kv_len, 11);
          p.q = integer_vector(p.q.size(), 101 + std::uint32_t(c.range), c.range, c.q_unit);
          p.k = integer_vector(p.k.size(), 202 + std::uint32_t(c.range), c.range, c.k_unit);
          for (AttentionOptions options : option_sets()) {
            options.scale = c.q_unit > 1.f ? 1.f : 0.5f;  // a power of two: exact
            check_paths<Isa>(p, options, 1e-4);
          }
          // All logits hugely negative (q = -k direction): the max shift must still work.
          Problem negative = p;
          for (float& x : negative.k) x = -std::fabs(x) - c.k_unit;
          for (float& x : negative.q) x = std::fabs(x) + c.q_unit;
          AttentionOptions options;
          options.scale = 1.f;
          check_paths<Isa>(negative, options, 1e-4);
        }
  });
}

// At |logit| ~ 1e8 an fp32 log-sum-exp has an ulp of 8, so max + log(count of tied top
// keys) rounds to max: key splits (threads, plain-memory key chunks) merged through it
// weighed every split alike, and a sink as large as the logits weighed like the whole row.
// Top keys spread unevenly over the context catch that; the expected output is the mean of
// their values (every other key is 2^24 below), over one more "key" of value 0 with a sink.
TEST_CASE("top keys tied at logits of 1e8 weigh equally wherever the key splits fall, with and without a sink",
          "[edge][threads]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 2, 1}, HeadLayout{8, 1, 3}, HeadLayout{2, 2, 17}, HeadLayout{8, 2, 64}})
      for (const auto& lengths : {std::pair{1, 3000}, std::pair{2, 1025}, std::pair{17, 1000}}) {
        const int q_len = lengths.first, kv_len = lengths.second;
        Problem p(layout, q_len, kv_len, 21);
        std::fill(p.q.begin(), p.q.end(), 1.f);
        // Key j: every element 2 * 2^24 (top: 3 * 2^24), so logits are head_dim * 2^25 or
        // head_dim * 3 * 2^24: exact in fp32, and 2^24 * head_dim apart.
        std::vector<int> top = {0, 5, 6};
        for (int j = kv_len / 2; j < kv_len / 2 + 9; ++j) top.push_back(j);
        top.push_back(kv_len - 1);
        for (int j = 0; j < kv_len; ++j) {
          const bool is_top = std::find(top.begin(), top.end(), j) != top.end();
          for (int x = 0; x < layout.kv_width(); ++x) p.k[std::size_t(j) * layout.kv_width() + x] = is_top ? 0x3p24f : 0x2p24f;
        }
        const float top_logit = float(layout.head_dim) * 0x3p24f;
        std::vector<float> sinks(std::size_t(layout.q_heads), top_logit);
        for (bool with_sink : {false, true}) {
          AttentionOptions options;
          options.scale = 1.f;
          options.sinks = with_sink ? sinks.data() : nullptr;
          check_paths<Isa>(p, options, 1e-5);
          for (int threads : {1, 2}) {
            options.threads = threads;
            const Result r = run_plain<Isa>(p, options);
            INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name << " sink " << with_sink);
            for (int i = 0; i < q_len; ++i)
              for (int h = 0; h < layout.q_heads; ++h)
                for (int d = 0; d < layout.head_dim; ++d) {
                  double sum = 0;
                  for (int j : top) sum += at(p.v, layout, layout.kv_heads, j, layout.kv_head_of(h), d);
                  const double expected = sum / (double(top.size()) + (with_sink ? 1 : 0));
                  CHECK(r.out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d] ==
                        Approx(expected).margin(1e-5));
                }
          }
        }
      }
  });
}

TEST_CASE("a key far above the others gets probability 1 and the output is its value", "[edge]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 8}, HeadLayout{8, 2, 64}, HeadLayout{16, 1, 3}})
      for (int kv_len : {1, 5, 64, 200, 3000}) {
        const int q_len = 2;
        Problem p(layout, q_len, kv_len, 5);
        // Query = all ones; key `hot` = 100 * ones, every other key 0: logit gap 100 * head_dim * scale.
        std::fill(p.q.begin(), p.q.end(), 1.f);
        std::fill(p.k.begin(), p.k.end(), 0.f);
        const int hot = kv_len / 2;
        for (int g = 0; g < layout.kv_heads; ++g)
          for (int d = 0; d < layout.head_dim; ++d) at(p.k, layout, layout.kv_heads, hot, g, d) = 100.f;
        AttentionOptions options;
        options.scale = 1.f;
        check_paths<Isa>(p, options);
        const Result r = run_plain<Isa>(p, options);
        for (int i = 0; i < q_len; ++i)
          for (int h = 0; h < layout.q_heads; ++h)
            for (int d = 0; d < layout.head_dim; ++d) {
              const float expected = at(p.v, layout, layout.kv_heads, hot, layout.kv_head_of(h), d);
              CHECK(r.out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d] == Approx(expected).margin(1e-6));
            }
      }
  });
}

// fp32 accumulates the weighted values before the final division, each weight at most 1:
// finite while kv_len x max|v| stays below FLT_MAX (README, Guarantees). Uniform weights
// over positive values of 3e35 and 1000 keys come within 12% of that bound.
TEST_CASE("values up to FLT_MAX / kv_len in magnitude stay finite and match the reference", "[edge]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 16}, HeadLayout{8, 2, 16}, HeadLayout{4, 1, 16}})
      for (int q_len : {1, 3}) {
        const int kv_len = 1000;
        Problem p(layout, q_len, kv_len, 13);
        std::fill(p.q.begin(), p.q.end(), 0.f);
        for (float& x : p.v) x = 3.0e35f * (0.5f + 0.5f * std::fabs(x) / (1.f + std::fabs(x)));
        check_paths<Isa>(p, AttentionOptions{});
        const Result r = run_plain<Isa>(p, AttentionOptions{});
        CHECK(std::all_of(r.out.begin(), r.out.end(), [](float x) { return std::isfinite(x) && x > 1e35f; }));
      }
  });
}

TEST_CASE("all-equal keys give the uniform average of the visible values", "[edge]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 2, 16}, HeadLayout{6, 1, 7}})
      for (bool causal : {false, true}) {
        const int q_len = 9, kv_len = 300;
        Problem p(layout, q_len, kv_len, 9);
        for (int j = 0; j < kv_len; ++j)  // every key equals key 0
          for (int x = 0; x < layout.kv_width(); ++x) p.k[std::size_t(j) * layout.kv_width() + x] = p.k[std::size_t(x)];
        AttentionOptions options;
        options.causal = causal;
        check_paths<Isa>(p, options);
        const Result r = run_plain<Isa>(p, options);
        for (int i = 0; i < q_len; ++i)
          for (int h = 0; h < layout.q_heads; ++h)
            for (int d = 0; d < layout.head_dim; ++d) {
              double sum = 0;
              int count = 0;
              for (int j = 0; j < kv_len; ++j)
                if (sees(options, q_len, kv_len, i, j)) {
                  sum += at(p.v, layout, layout.kv_heads, j, layout.kv_head_of(h), d);
                  ++count;
                }
              CHECK(r.out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d] ==
                    Approx(sum / count).margin(1e-5));
            }
      }
  });
}

TEST_CASE("NaN in a query makes exactly that query row and head NaN", "[edge][nan]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{8, 2, 16}, HeadLayout{4, 4, 3}, HeadLayout{8, 1, 64}})
      for (const auto& lengths : {std::pair{1, 2000}, std::pair{6, 6}, std::pair{20, 100}}) {
        const int q_len = lengths.first, kv_len = lengths.second;
        Problem p(layout, q_len, kv_len, 21);
        const int bad_i = q_len / 2, bad_h = layout.q_heads - 1;
        at(p.q, layout, layout.q_heads, bad_i, bad_h, layout.head_dim / 2) = kNaN;
        for (AttentionOptions options : option_sets()) {
          check_paths<Isa>(p, options);
          options.threads = 2;
          check_nan_rows(run_plain<Isa>(p, options).out, layout, q_len,
                         [&](int i, int h) { return i == bad_i && h == bad_h; }, "NaN q");
        }
      }
  });
}

TEST_CASE("NaN in a visible key or value makes exactly the rows of its KV head group that see it NaN", "[edge][nan]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{8, 2, 16}, HeadLayout{4, 4, 3}, HeadLayout{12, 3, 64}})
      for (const auto& lengths : {std::pair{1, 2000}, std::pair{8, 8}, std::pair{20, 150}})
        for (bool in_value : {false, true}) {
          const int q_len = lengths.first, kv_len = lengths.second;
          Problem p(layout, q_len, kv_len, 31);
          const int bad_j = kv_len - q_len / 2 - 1, bad_g = layout.kv_heads - 1;
          at(in_value ? p.v : p.k, layout, layout.kv_heads, bad_j, bad_g, 0) = kNaN;
          for (AttentionOptions options : option_sets()) {
            check_paths<Isa>(p, options);
            options.threads = 2;
            check_nan_rows(run_plain<Isa>(p, options).out, layout, q_len,
                           [&](int i, int h) {
                             return layout.kv_head_of(h) == bad_g && sees(options, q_len, kv_len, i, bad_j);
                           },
                           in_value ? "NaN v" : "NaN k");
          }
        }
  });
}

TEST_CASE("NaN in a visible value whose weight underflows to 0 in fp32 still makes its rows NaN",
          "[edge][nan][mask]") {
  // exp(-200) is 0 in fp32 but not in the double-precision reference, whose tiny weight
  // times NaN is NaN. P.V leaves out masked keys only, not every zero weight: the far key
  // sits in a block with masked keys (causal edge or window start) and in unmasked ones.
  // Decode (few-row tiles) and prefill (many-row tiles); MHA, GQA and MQA.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 8}, HeadLayout{8, 2, 8}, HeadLayout{8, 1, 8}})
      for (const auto& lengths : {std::pair{1, 100}, std::pair{40, 40}, std::pair{3, 300}}) {
        const int q_len = lengths.first, kv_len = lengths.second;
        Problem p(layout, q_len, kv_len, 5);
        // One-hot queries and keys on dim 0: logit 0 for every key but the far one (-200).
        std::fill(p.q.begin(), p.q.end(), 0.f);
        std::fill(p.k.begin(), p.k.end(), 0.f);
        for (int i = 0; i < q_len; ++i)
          for (int h = 0; h < layout.q_heads; ++h) at(p.q, layout, layout.q_heads, i, h, 0) = 1.f;
        const int far_j = kv_len == 40 ? 5 : kv_len - 10;
        for (int g = 0; g < layout.kv_heads; ++g) {
          at(p.k, layout, layout.kv_heads, far_j, g, 0) = -200.f;
          at(p.v, layout, layout.kv_heads, far_j, g, 0) = kNaN;
        }
        for (int variant = 0; variant < 4; ++variant) {
          AttentionOptions options;
          options.scale = 1.f;
          options.causal = variant % 2 == 1;
          options.window = variant >= 2 ? 20 : 0;
          check_paths<Isa>(p, options);
          options.threads = 1;
          check_nan_rows(run_plain<Isa>(p, options).out, layout, q_len,
                         [&](int i, int) { return sees(options, q_len, kv_len, i, far_j); }, "underflowed NaN v");
        }
      }
  });
}

TEST_CASE("NaN in a key split or row whose whole weight underflows next to another part or a sink stays NaN",
          "[edge][nan][split][sinks]") {
  // Long decodes are split over keys and merged by log-sum-exp; a sink joins a row the
  // same way. Here every key but the last five has logit -200 and the NaN value sits at
  // key 3, so the splits without the last keys (or, with a sink of 0 and no logit-0 key,
  // the whole row) carry a NaN whose fp32 weight in the merge is exactly 0. The
  // double-precision reference gives a tiny weight times NaN = NaN, so the row must be
  // NaN: a merge may leave out only a part that saw no key. Lengths of 1100 and 2200 keys
  // are split on 1 thread (MQA) and on 2 (every layout), and split by chunks on the plain
  // path (MHA, GQA).
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 8}, HeadLayout{8, 2, 8}, HeadLayout{8, 1, 8}})
      for (int q_len : {1, 3})
        for (int kv_len : {1100, 2200})
          for (bool with_sink : {false, true}) {
            Problem p(layout, q_len, kv_len, 7);
            // One-hot queries and keys on dim 0: logit -200 for every key, 0 for the last
            // five unless a sink (logit 0) stands in for them.
            std::fill(p.q.begin(), p.q.end(), 0.f);
            std::fill(p.k.begin(), p.k.end(), 0.f);
            for (int i = 0; i < q_len; ++i)
              for (int h = 0; h < layout.q_heads; ++h) at(p.q, layout, layout.q_heads, i, h, 0) = 1.f;
            const int far_end = with_sink ? kv_len : kv_len - 5;
            for (int j = 0; j < far_end; ++j)
              for (int g = 0; g < layout.kv_heads; ++g) at(p.k, layout, layout.kv_heads, j, g, 0) = -200.f;
            for (int g = 0; g < layout.kv_heads; ++g) at(p.v, layout, layout.kv_heads, 3, g, 0) = kNaN;
            const std::vector<float> sinks(std::size_t(layout.q_heads), 0.f);
            AttentionOptions options;
            options.scale = 1.f;
            if (with_sink) options.sinks = sinks.data();
            check_paths<Isa>(p, options);
            for (int threads : {1, 2}) {
              options.threads = threads;
              INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name);
              check_nan_rows(run_plain<Isa>(p, options).out, layout, q_len, [](int, int) { return true; },
                             "NaN in an underflowed split, plain");
              check_nan_rows(run_cache<Isa>(p, options).out, layout, q_len, [](int, int) { return true; },
                             "NaN in an underflowed split, cache");
            }
          }
  });
}

TEST_CASE("NaN or inf in a masked-out key or value changes nothing", "[edge][nan][mask]") {
  // Causal prefill: key `bad` is in the future of the first rows of the same key block and
  // query tile, so the kernel loads it for the tile but must give it no weight at all
  // (0 * NaN is NaN). Window: key `bad` is older than the window of the last rows.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{8, 2, 16}, HeadLayout{4, 4, 3}, HeadLayout{16, 1, 64}})
      for (float poison : {kNaN, kInf, -kInf})
        for (bool in_value : {false, true})
          for (int variant = 0; variant < 3; ++variant) {
            const int q_len = 12, kv_len = 12;
            Problem p(layout, q_len, kv_len, 41);
            AttentionOptions options;
            int bad = 0;
            if (variant == 0) {  // a future key for rows 0..6
              options.causal = true;
              bad = 7;
            } else if (variant == 1) {  // a key the last rows' window has passed
              options.window = 4;
              bad = 3;
            } else {  // causal with more queries than keys: rows 0..3 see nothing at all
              options.causal = true;
              p = Problem(layout, 16, 12, 43);
              bad = 10;
            }
            const int rows = p.q_len;
            const Result expected = run_reference(p, options);  // before the poison
            for (int g = 0; g < layout.kv_heads; ++g)
              for (int d = 0; d < layout.head_dim; ++d) at(in_value ? p.v : p.k, layout, layout.kv_heads, bad, g, d) = poison;
            INFO("variant " << variant << " poison " << poison << (in_value ? " in v" : " in k") << " isa "
                            << Isa::name << " layout " << layout.q_heads << "/" << layout.kv_heads << "/"
                            << layout.head_dim);
            for (int threads : {1, 2}) {
              options.threads = threads;
              const Result r = run_plain<Isa>(p, options);
              // Rows that cannot see `bad` equal the clean reference; rows that see it follow
              // the poisoned reference.
              const Result poisoned = run_reference(p, options);
              for (int i = 0; i < rows; ++i) {
                const bool affected = sees(options, rows, p.kv_len, i, bad);
                const std::vector<float>& want = affected ? poisoned.out : expected.out;
                const std::size_t begin = std::size_t(i) * layout.q_width(), end = begin + layout.q_width();
                const std::vector<float> got_row(r.out.begin() + std::ptrdiff_t(begin), r.out.begin() + std::ptrdiff_t(end));
                const std::vector<float> want_row(want.begin() + std::ptrdiff_t(begin), want.begin() + std::ptrdiff_t(end));
                INFO("query row " << i << (affected ? " (sees the key)" : " (does not see the key)") << " threads "
                                  << threads);
                CHECK(relative_error(got_row, want_row) <= tolerance);
              }
              if (p.q_len <= p.kv_len) {
                const Result c = run_cache<Isa>(p, options);
                for (int i = 0; i < rows; ++i) {
                  if (sees(options, rows, p.kv_len, i, bad)) continue;
                  const std::size_t begin = std::size_t(i) * layout.q_width(), end = begin + layout.q_width();
                  const std::vector<float> got_row(c.out.begin() + std::ptrdiff_t(begin), c.out.begin() + std::ptrdiff_t(end));
                  const std::vector<float> want_row(expected.out.begin() + std::ptrdiff_t(begin),
                                                    expected.out.begin() + std::ptrdiff_t(end));
                  INFO("cache path, query row " << i << " threads " << threads);
                  CHECK(relative_error(got_row, want_row) <= tolerance);
                }
              }
            }
          }
  });
}

TEST_CASE("+-inf in q or k follows the reference and stays in its rows", "[edge][inf]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{8, 2, 16}, HeadLayout{4, 4, 1}})
      for (float poison : {kInf, -kInf}) {
        const int q_len = 10, kv_len = 40;
        // inf in one query: that row and head only (its logits are +-inf; a +inf makes NaN).
        Problem pq(layout, q_len, kv_len, 51);
        at(pq.q, layout, layout.q_heads, 4, 1, 0) = poison;
        for (const AttentionOptions& options : option_sets()) {
          check_paths<Isa>(pq, options);
          // Without softcap the row has +inf logits (keys with k > 0 for q = +inf), so it is
          // NaN; softcap maps +-inf logits to +-softcap, and the row stays finite.
          check_nan_rows(run_plain<Isa>(pq, options).out, layout, q_len,
                         [&](int i, int h) { return i == 4 && h == 1 && options.softcap == 0.f; }, "inf q");
        }
        // inf in one key: only rows of its group that see it may change.
        Problem pk(layout, q_len, kv_len, 52);
        const int bad_j = 33, bad_g = layout.kv_heads - 1;
        at(pk.k, layout, layout.kv_heads, bad_j, bad_g, 0) = poison;
        const Problem clean(layout, q_len, kv_len, 52);
        for (const AttentionOptions& options : option_sets()) {
          check_paths<Isa>(pk, options);
          const Result r = run_plain<Isa>(pk, options);
          const Result expected = run_reference(clean, options);
          for (int i = 0; i < q_len; ++i)
            for (int h = 0; h < layout.q_heads; ++h) {
              if (layout.kv_head_of(h) == bad_g && sees(options, q_len, kv_len, i, bad_j)) continue;
              for (int d = 0; d < layout.head_dim; ++d) {
                const std::size_t x = (std::size_t(i) * layout.q_heads + h) * layout.head_dim + d;
                INFO("row " << i << " head " << h << " d " << d << " isa " << Isa::name);
                CHECK(r.out[x] == Approx(expected.out[x]).margin(1e-5));
              }
            }
        }
      }
  });
}

TEST_CASE("a row whose every visible logit is -inf outputs zeros like a fully masked row", "[edge][inf]") {
  // k = -inf in dimension 0 with q > 0 there: every logit of the row is -inf. Such keys get
  // weight 0 (as masked keys), so the row has no weight at all: zeros and lse -inf, on
  // every path. The reference is held to the same contract.
  const HeadLayout layout{4, 2, 8};
  const int q_len = 3, kv_len = 70;
  Problem p(layout, q_len, kv_len, 61);
  for (float& x : p.q) x = std::fabs(x) + 0.1f;
  for (int j = 0; j < kv_len; ++j) at(p.k, layout, layout.kv_heads, j, 0, 0) = -kInf;  // KV head 0 only
  const Result reference = run_reference(p, AttentionOptions{});
  auto check = [&](const Result& r, const char* what) {
    INFO(what);
    for (int i = 0; i < q_len; ++i)
      for (int h = 0; h < layout.q_heads; ++h) {
        const bool dead = layout.kv_head_of(h) == 0;
        INFO("row " << i << " head " << h);
        const float lse = r.lse[std::size_t(i) * layout.q_heads + h];
        if (dead)
          CHECK(lse == -kInf);
        else
          CHECK(lse == Approx(reference.lse[std::size_t(i) * layout.q_heads + h]).epsilon(1e-5));
        for (int d = 0; d < layout.head_dim; ++d) {
          const float x = r.out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d];
          if (dead)
            CHECK(x == 0.f);
          else
            CHECK(std::isfinite(x));
        }
      }
  };
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (int threads : {1, 2}) {
      AttentionOptions options;
      options.threads = threads;
      check(run_plain<Isa>(p, options), Isa::name);
      check(run_cache<Isa>(p, options), Isa::name);
    }
  });
  check(reference, "reference_attend");
}

TEST_CASE("fully masked rows output zeros and lse -inf on every ISA and path", "[edge][mask]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{8, 2, 16}, HeadLayout{5, 1, 3}, HeadLayout{2, 2, 64}})
      for (const auto& lengths : {std::pair{10, 4}, std::pair{70, 3}, std::pair{3, 0}}) {
        const int q_len = lengths.first, kv_len = lengths.second;
        const Problem p(layout, q_len, kv_len, 71);
        for (AttentionOptions options : option_sets()) {
          if (kv_len > 0 && !options.causal && options.window == 0) continue;  // nothing masked
          for (int threads : {1, 2}) {
            options.threads = threads;
            const Result r = run_plain<Isa>(p, options);
            for (int i = 0; i < q_len; ++i) {
              bool any = false;
              for (int j = 0; j < kv_len; ++j) any = any || sees(options, q_len, kv_len, i, j);
              if (any) continue;
              INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name << " row " << i);
              for (int h = 0; h < layout.q_heads; ++h) {
                CHECK(r.lse[std::size_t(i) * layout.q_heads + h] == -kInf);
                for (int d = 0; d < layout.head_dim; ++d)
                  CHECK(r.out[(std::size_t(i) * layout.q_heads + h) * layout.head_dim + d] == 0.f);
              }
            }
            options.threads = 0;
            check_paths<Isa>(p, options);
          }
        }
      }
  });
}

TEST_CASE("kv_len 1 returns the single value on every ISA and path", "[edge]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{1, 1, 1}, HeadLayout{8, 2, 16}, HeadLayout{16, 1, 80}})
      for (AttentionOptions options : option_sets()) {
        const Problem p(layout, 1, 1, 81);
        check_paths<Isa>(p, options);
        const Result r = run_plain<Isa>(p, options);
        for (int h = 0; h < layout.q_heads; ++h)
          for (int d = 0; d < layout.head_dim; ++d)
            CHECK(r.out[std::size_t(h) * layout.head_dim + d] ==
                  Approx(p.v[std::size_t(layout.kv_head_of(h)) * layout.head_dim + d]).margin(1e-6));
      }
  });
}

TEST_CASE("a cache of more than 2^20 tokens matches the reference (no index overflow)", "[edge][large]") {
  const HeadLayout layout{2, 1, 1};
  const int kv_len = (1 << 20) + 37;
  // bf16-representable data, so a bf16 cache holds exactly the same keys and values.
  std::vector<float> k = random_vector(std::size_t(kv_len), 91), v = random_vector(std::size_t(kv_len), 92);
  for (float& x : k) x = kvheads::bf16::from_float(x).to_float();
  for (float& x : v) x = kvheads::bf16::from_float(x).to_float();
  KvCache<float> cache(layout, kv_len);
  KvCache<kvheads::bf16> cache16(layout, kv_len);
  for (int done = 0; done < kv_len;) {  // in uneven chunks
    const int n = std::min(kv_len - done, 100003);
    cache.append(k.data() + done, v.data() + done, n);
    cache16.append(k.data() + done, v.data() + done, n);
    done += n;
  }
  REQUIRE(cache.size() == kv_len);
  std::vector<AttentionOptions> sets(3);
  sets[1].window = 1000;
  sets[2].alibi = true;
  sets[2].causal = true;
  for (int q_len : {1, 3}) {
    const std::vector<float> q = random_vector(std::size_t(q_len) * 2, 93 + std::uint32_t(q_len), 3.f);
    for (const AttentionOptions& options : sets) {
      std::vector<float> expected(q.size()), expected_lse(q.size());
      kvheads::reference_attend(q.data(), k.data(), v.data(), expected.data(), q_len, kv_len, layout, options,
                                expected_lse.data());
      for_each_cpu_isa([&](auto isa) {
        using Isa = decltype(isa);
        // Float cache with 1 and 2 threads (2: key splits), the bf16 cache and plain memory.
        for (int path = 0; path < 4; ++path) {
          AttentionOptions o = options;
          o.threads = path == 0 ? 1 : 2;
          INFO(describe(layout, q_len, kv_len, o) << " isa " << Isa::name << " path " << path);
          std::vector<float> out(q.size(), -1.f), lse(q.size(), -1.f);
          if (path < 2)
            kvheads::attend<Isa>(q.data(), q_len, cache, out.data(), o, lse.data());
          else if (path == 2)
            kvheads::attend<Isa>(q.data(), q_len, cache16, out.data(), o, lse.data());
          else
            kvheads::attend<Isa>(q.data(), k.data(), v.data(), out.data(), q_len, kv_len, layout, o, lse.data());
          CHECK(relative_error(out, expected) <= 1e-4);
          CHECK(relative_error(lse, expected_lse, 1.0) <= 1e-5);
        }
      });
    }
  }
}

TEST_CASE("denormal inputs give the reference's results without NaN or inf or flushing to zero", "[edge][denormal]") {
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 2, 16}, HeadLayout{8, 1, 3}})
      for (const auto& lengths : {std::pair{1, 100}, std::pair{9, 9}, std::pair{1, 1500}}) {
        const int q_len = lengths.first, kv_len = lengths.second;
        Problem p(layout, q_len, kv_len, 101);
        for (auto* x : {&p.q, &p.k, &p.v})
          for (float& y : *x) y *= 1e-40f;
        for (AttentionOptions options : option_sets()) {
          const Result expected = run_reference(p, options);
          for (int threads : {1, 2}) {
            options.threads = threads;
            INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name);
            for (const Result& r : {run_plain<Isa>(p, options), run_cache<Isa>(p, options)}) {
              double magnitude = 0, worst = 0;
              for (std::size_t i = 0; i < r.out.size(); ++i) {
                REQUIRE(std::isfinite(r.out[i]));
                magnitude = std::max(magnitude, std::fabs(double(expected.out[i])));
                worst = std::max(worst, std::fabs(double(r.out[i]) - double(expected.out[i])));
              }
              REQUIRE(magnitude > 0);
              CHECK(worst <= 1e-3 * magnitude);  // relative to the denormal outputs themselves
              CHECK(relative_error(r.lse, expected.lse, 1.0) <= tolerance);
            }
          }
        }
      }
  });
}

TEST_CASE("a softcap too small for its reciprocal in fp32 still gives the reference's result", "[edge][softcap]") {
  // Below 1 / FLT_MAX the reciprocal the kernels multiply by is infinite, so a zero logit
  // would become 0 * inf = NaN. q = 0 makes every logit exactly zero; random q makes every
  // other logit saturate the cap. Large caps (reciprocals near the denormal range) too.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 16}, HeadLayout{8, 2, 17}, HeadLayout{8, 1, 64}})
      for (bool zero_q : {true, false}) {
        Problem p(layout, 3, 40, 211);
        if (zero_q) std::fill(p.q.begin(), p.q.end(), 0.f);
        for (float softcap : {1e-45f, 1e-40f, 2e-39f, std::numeric_limits<float>::min(), 3e38f}) {
          AttentionOptions options;
          options.softcap = softcap;
          options.causal = true;
          INFO("softcap " << softcap << (zero_q ? ", q = 0" : ", random q"));
          check_paths<Isa>(p, options);
        }
      }
  });
}

TEST_CASE("a scale above 1 whose product with q overflows fp32 still gives the reference's result", "[edge][scale]") {
  // The kernels used to stage scale * q, which overflows here (|q| * scale >= 2^130) though
  // every logit scale * (q.k) is small: q = int * 2^26, k = int * 2^-136, scale 2^104, so
  // logits are int * 2^-6, exact in fp32 for both the kernel and the reference.
  const float scale = std::ldexp(1.f, 104);
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 16}, HeadLayout{8, 2, 17}, HeadLayout{8, 1, 64}})
      for (const auto& [q_len, kv_len] : {std::pair{1, 1000}, std::pair{2, 2}, std::pair{17, 17}, std::pair{3, 40}}) {
        Problem p(layout, q_len, kv_len, 223);
        p.q = integer_vector(p.q.size(), 224, 3, std::ldexp(1.f, 26));
        p.k = integer_vector(p.k.size(), 225, 3, std::ldexp(1.f, -136));
        for (int variant = 0; variant < 3; ++variant) {
          AttentionOptions options;
          options.scale = scale;
          if (variant == 1) {
            options.causal = true;
            options.softcap = 5.f;
          } else if (variant == 2) {
            options.window = 7;
            options.alibi = true;
          }
          check_paths<Isa>(p, options);
        }
      }
  });
}

TEST_CASE("a +inf logit next to a NaN one gives NaN on every ISA, without undefined behaviour", "[edge][inf]") {
  // q = +inf against k = 1 and k = 0: logits +inf and NaN (inf * 0) in one block. The
  // block max lost both (max() drops a NaN operand) and the scalar exp converted +inf to
  // int, undefined behaviour that UBSan reports.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (int kv_len : {2, 5, 17}) {
      Problem p(HeadLayout{1, 1, 1}, 1, kv_len, 227);
      p.q = {kInf};
      for (int j = 0; j < kv_len; ++j) p.k[std::size_t(j)] = j == 1 ? 0.f : 1.f;
      check_paths<Isa>(p, AttentionOptions{});
      const Result plain = run_plain<Isa>(p, AttentionOptions{});
      CHECK(std::isnan(plain.out[0]));
    }
  });
}

TEST_CASE("a NaN logit followed only by logits of -inf makes the row NaN in the reference too", "[edge][inf][nan]") {
  // q = (+inf, +inf): key 0 = (1, -1) has logit inf - inf = NaN, every later key = (-1, -1)
  // logit -inf. The reference's running max took the NaN and then the next -inf, so the
  // row read as having no weight: zeros and lse -inf where the kernels give NaN (found by
  // fuzz_attend's inf mode). The sink must not replace a NaN max either, and a sink of
  // -inf made the kernels' row zeros (with lse NaN): max -inf read as "no weight".
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (int kv_len : {2, 5, 17}) {
      for (float sink : {1.f, -30.f, -kInf}) {
        for (bool with_sink : {false, true}) {
          Problem p(HeadLayout{1, 1, 2}, 1, kv_len, 229);
          p.q = {kInf, kInf};
          for (int j = 0; j < kv_len; ++j) {
            p.k[std::size_t(2 * j)] = j == 0 ? 1.f : -1.f;
            p.k[std::size_t(2 * j + 1)] = -1.f;
          }
          AttentionOptions options;
          const float sinks[1] = {sink};
          if (with_sink) options.sinks = sinks;
          INFO("kv_len " << kv_len << (with_sink ? " sink " : " no sink") << (with_sink ? sink : 0.f));
          const Result expected = run_reference(p, options);
          CHECK(std::isnan(expected.out[0]));
          CHECK(std::isnan(expected.lse[0]));
          check_paths<Isa>(p, options);
        }
      }
    }
  });
}

TEST_CASE("a row that sees no key is zeros next to any sink, +inf included", "[edge][inf][sinks]") {
  // Causal with more queries than keys: the first rows see nothing. The contract's output
  // for such a row is zeros whatever joins the denominator; a sink of +inf used to make it
  // NaN (its weight exp(inf - inf) scaled the empty row), where the reference gives zeros
  // (found by fuzz_attend's inf mode). Rows that do see keys next to a +inf sink are NaN in
  // both (the sink's weight is NaN), as the reference defines.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 4, 5}, HeadLayout{8, 2, 33}, HeadLayout{4, 1, 64}}) {
      for (int kv_len : {0, 1, 2, 17}) {
        for (int extra_queries : {1, 3, 20}) {
          for (float sink : {kInf, 0.f, -kInf}) {
            Problem p(layout, kv_len + extra_queries, kv_len, 233);
            AttentionOptions options;
            options.causal = true;
            // Every other head's sink is the one under test, so heads differ within a group.
            std::vector<float> sinks(std::size_t(layout.q_heads), 0.5f);
            for (int h = 0; h < layout.q_heads; h += 2) sinks[std::size_t(h)] = sink;
            options.sinks = sinks.data();
            INFO("sink " << sink << " extra queries " << extra_queries);
            const Result expected = run_reference(p, options);
            for (int i = 0; i < extra_queries; ++i)  // rows 0..extra-1 see no key
              for (int j = 0; j < layout.q_width(); ++j)
                REQUIRE(expected.out[std::size_t(i) * std::size_t(layout.q_width()) + std::size_t(j)] == 0.f);
            for (int threads : {1, 2}) {
              options.threads = threads;
              INFO(describe(p.layout, p.q_len, p.kv_len, options) << " isa " << Isa::name);
              const Result plain = run_plain<Isa>(p, options);
              for (int i = 0; i < extra_queries; ++i)
                for (int j = 0; j < layout.q_width(); ++j) {
                  INFO("query row " << i << " element " << j);
                  REQUIRE(plain.out[std::size_t(i) * std::size_t(layout.q_width()) + std::size_t(j)] == 0.f);
                }
              CHECK(relative_error(plain.out, expected.out) <= tolerance);
              CHECK(relative_error(plain.lse, expected.lse, 1.0) <= tolerance);
            }
          }
        }
      }
    }
  });
}

TEST_CASE("visible keys of logit -inf with an inf value give NaN wherever the key splits fall, and with sinks",
          "[edge][inf][splits]") {
  // The reference multiplies every visible key's weight by its value once any key (or a
  // sink) has weight: 0 * inf = NaN. The kernel used to drop a key split whose keys all
  // had weight 0 (sum 0 read as "saw nothing"), so the answer depended on where splits
  // fell (1000 keys: NaN, 1024: 1), and a sink next to such keys gave 0.
  for_each_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    for (const HeadLayout& layout : {HeadLayout{4, 1, 4}, HeadLayout{8, 2, 16}, HeadLayout{4, 4, 17}})
      for (int kv_len : {10, 1000, 1024, 3000})
        for (bool all_minus_inf : {false, true}) {
          Problem p(layout, 1, kv_len, 229);
          for (float& x : p.q) x = std::fabs(x) + 0.25f;  // q > 0: a -inf key component gives logit -inf
          const int minus_inf_keys = all_minus_inf ? kv_len : kv_len / 2;
          for (int j = 0; j < minus_inf_keys; ++j)
            for (int h = 0; h < layout.kv_heads; ++h) at(p.k, layout, layout.kv_heads, j, h, 0) = -kInf;
          for (int h = 0; h < layout.kv_heads; ++h) at(p.v, layout, layout.kv_heads, 3, h, 0) = kInf;
          for (float sink : {kNaN, 0.f, -kInf, 3.f}) {  // NaN: no sink
            std::vector<float> sinks(std::size_t(layout.q_heads), sink);
            AttentionOptions options;
            if (!std::isnan(sink)) options.sinks = sinks.data();
            INFO((all_minus_inf ? "every" : "half the") << " keys at logit -inf, sink " << sink);
            check_paths<Isa>(p, options);
          }
        }
  });
}
