// The cache a serving engine needs and the variants modern models use: bf16/fp16/int8
// storage, sliding-window rings, ragged batches, drop/truncate/grow, attention sinks,
// and log-sum-exp outputs with an exact merge. All checked against the reference.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_isas.hpp"
#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;
using namespace kvheads_test;

namespace {

// The cache's contents read back as plain [tokens][kv_heads][head_dim] K and V.
template <class T>
std::pair<std::vector<float>, std::vector<float>> cached_kv(const KvCache<T>& cache) {
  const HeadLayout& l = cache.layout();
  std::vector<float> k(std::size_t(cache.size()) * std::size_t(l.kv_width())), v(k.size());
  for (int t = 0; t < cache.size(); ++t)
    for (int h = 0; h < l.kv_heads; ++h) {
      const std::size_t offset = (std::size_t(t) * std::size_t(l.kv_heads) + std::size_t(h)) * std::size_t(l.head_dim);
      cache.read_token(cache.first_position() + t, h, k.data() + offset, v.data() + offset);
    }
  return {k, v};
}

template <class T>
const char* storage_name() {
  if constexpr (std::is_same_v<T, kvheads::bf16>) return "bf16";
  if constexpr (std::is_same_v<T, kvheads::fp16>) return "fp16";
  if constexpr (std::is_same_v<T, std::int8_t>) return "int8";
  return "float";
}

// Stated error of each storage type against the fp32 reference, relative to the
// output's magnitude (random normal K/V; see README "Features").
template <class T>
double storage_tolerance() {
  if constexpr (std::is_same_v<T, kvheads::bf16>) return 2e-2;
  if constexpr (std::is_same_v<T, kvheads::fp16>) return 3e-3;
  if constexpr (std::is_same_v<T, std::int8_t>) return 3e-2;
  return tolerance;
}

/// Options with the fp32 reference's output for them (shared by the storage types).
struct AttendOptionsAndReference {
  AttentionOptions options;
  std::vector<float> expected;
};

template <class T, class Isa>
void check_storage(const Problem& p, const AttendOptionsAndReference& fp32) {
  const AttentionOptions& options = fp32.options;
  INFO(describe(p.layout, p.q_len, p.kv_len, options) << " storage " << storage_name<T>() << " isa " << Isa::name);
  KvCache<T> cache(p.layout, p.kv_len);
  cache.append(p.k.data(), p.v.data(), p.kv_len);
  std::vector<float> out(p.out_size());
  kvheads::attend<Isa>(p.q.data(), p.q_len, cache, out.data(), options);
  // Tight: against the reference on the values the cache actually holds.
  const auto [k, v] = cached_kv(cache);
  std::vector<float> rounded(p.out_size());
  kvheads::reference_attend(p.q.data(), k.data(), v.data(), rounded.data(), p.q_len, p.kv_len, p.layout, options);
  CHECK(relative_error(out, rounded) <= tolerance);
  // Stated: against the fp32 reference.
  CHECK(relative_error(out, fp32.expected) <= storage_tolerance<T>());
}

// A ring that has wrapped: the kernel reads its keys in two segments (from the oldest
// slot to the end, then from slot 0), and int8 each slot's own scale, on every storage
// type. Against the reference over the tokens the ring holds, with its window.
template <class T, class Isa>
void check_ring_storage() {
  for (int head_dim : {17, 128})
    for (const HeadLayout& layout : {HeadLayout{4, 4, head_dim}, HeadLayout{8, 2, head_dim}, HeadLayout{8, 1, head_dim}})
      for (int q_len : {1, 3})
        for (int window : {37, 300}) {
          const int total = 3 * window + 11;  // wrapped three times: the oldest slot sits mid-ring
          const Problem p(layout, q_len, total, std::uint32_t(head_dim + window + q_len));
          auto ring = KvCache<T>::ring(layout, window, q_len);
          for (int done = 0; done < total; done += 7) {
            const int n = std::min(7, total - done);
            const std::ptrdiff_t offset = std::ptrdiff_t(done) * layout.kv_width();
            ring.append(p.k.data() + offset, p.v.data() + offset, n);
          }
          AttentionOptions options = option_sets().back();
          options.window = 0;  // the ring's own
          const auto [k, v] = cached_kv(ring);
          AttentionOptions reference_options = options;
          reference_options.window = window;
          std::vector<float> expected(p.out_size());
          kvheads::reference_attend(p.q.data(), k.data(), v.data(), expected.data(), q_len, ring.size(), layout,
                                    reference_options);
          for (int threads : {1, 2}) {
            options.threads = threads;
            INFO(describe(layout, q_len, total, options) << " ring window " << window << " storage " << storage_name<T>()
                                                         << " isa " << Isa::name);
            std::vector<float> out(p.out_size());
            kvheads::attend<Isa>(p.q.data(), q_len, ring, out.data(), options);
            CHECK(relative_error(out, expected) <= tolerance);
          }
        }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("bf16, fp16 and int8 caches match the reference on every ISA", "[cache][storage][isa]",
                        kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  for (int head_dim : {3, 17, 64, 128})
    for (const HeadLayout& layout : {HeadLayout{4, 4, head_dim}, HeadLayout{8, 2, head_dim}, HeadLayout{8, 1, head_dim}})
      for (auto [q_len, kv_len] : {std::pair{1, 17}, std::pair{17, 1000}, std::pair{1, 3000}})
        for (AttentionOptions options : {AttentionOptions{}, option_sets().back()}) {
          options.threads = 2;
          const Problem p(layout, q_len, kv_len, std::uint32_t(head_dim + q_len + kv_len));
          const AttendOptionsAndReference fp32{options, p.reference(options)};  // once for the three types
          check_storage<kvheads::bf16, Isa>(p, fp32);
          check_storage<kvheads::fp16, Isa>(p, fp32);
          check_storage<std::int8_t, Isa>(p, fp32);
        }
}

TEMPLATE_LIST_TEST_CASE("wrapped rings of every storage type match the reference on every ISA",
                        "[cache][storage][ring][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  check_ring_storage<float, Isa>();
  check_ring_storage<kvheads::bf16, Isa>();
  check_ring_storage<kvheads::fp16, Isa>();
  check_ring_storage<std::int8_t, Isa>();
}

TEST_CASE("a moved-from cache is empty and usable again; a growable cache may re-append its own tokens",
          "[cache][ops]") {
  const HeadLayout layout{4, 1, 16};  // one KV head: a plane's rows are [tokens][kv_heads][head_dim]
  const Problem p(layout, 1, 40, 3);
  for (bool ring : {false, true}) {
    INFO((ring ? "ring" : "linear") << " source");
    KvCache<float> source = ring ? KvCache<float>::ring(layout, 8) : KvCache<float>(layout, 8);
    source.append(p.k.data(), p.v.data(), 5);
    KvCache<float> moved = std::move(source);
    CHECK(moved.size() == 5);
    // Moved from: empty, linear, capacity 0, no storage; every call is an error, not a crash.
    CHECK(source.size() == 0);       // NOLINT(bugprone-use-after-move): the state after a move is the point
    CHECK(source.capacity() == 0);   // NOLINT(bugprone-use-after-move)
    CHECK(source.position() == 0);   // NOLINT(bugprone-use-after-move)
    CHECK(!source.is_ring());        // NOLINT(bugprone-use-after-move)
    CHECK(source.bytes() == 0);      // NOLINT(bugprone-use-after-move)
    CHECK_THROWS_AS(source.append(p.k.data(), p.v.data(), 1), std::length_error);
    std::vector<float> out(std::size_t(layout.q_width()));
    CHECK_THROWS_WITH(kvheads::attend(p.q.data(), 1, source, out.data()),
                      Catch::Contains("q_len (1) must not exceed the cache's size (0)"));
    float k_row[16], v_row[16];
    CHECK_THROWS_AS(source.read_token(0, 0, k_row, v_row), std::invalid_argument);
    // reserve() makes it a usable linear cache again.
    source.reserve(6);
    source.append(p.k.data(), p.v.data(), 6);
    KvCache<float> fresh(layout, 6);
    fresh.append(p.k.data(), p.v.data(), 6);
    std::vector<float> expected(out.size());
    kvheads::attend(p.q.data(), 1, source, out.data());
    kvheads::attend(p.q.data(), 1, fresh, expected.data());
    CHECK(out == expected);
    // Move assignment leaves the same state.
    KvCache<float> target(layout, 2);
    target = std::move(source);
    CHECK(target.size() == 6);
    CHECK(source.capacity() == 0);  // NOLINT(bugprone-use-after-move)
  }

  // Re-appending cached tokens from the cache's own planes when the append grows it: the
  // source rows must be read before the old planes are freed (ASan builds check that).
  kvheads::CacheOptions growable;
  growable.growable = true;
  KvCache<float> cache(layout, 3, growable);
  cache.append(p.k.data(), p.v.data(), 3);
  cache.append(cache.keys(), cache.values(), 3);  // full: grows while reading its own rows
  CHECK(cache.size() == 6);
  CHECK(cache.capacity() >= 6);
  for (int t = 0; t < 6; ++t) {
    float k_row[16], v_row[16];
    cache.read_token(t, 0, k_row, v_row);
    for (int d = 0; d < 16; ++d) {
      CHECK(k_row[d] == p.k[std::size_t((t % 3) * 16 + d)]);
      CHECK(v_row[d] == p.v[std::size_t((t % 3) * 16 + d)]);
    }
  }
}

TEST_CASE("an int8 row holding a non-finite value reads back as all NaN", "[cache][storage]") {
  const HeadLayout layout{2, 1, 4};
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (float bad : {inf, -inf, nan}) {
    INFO("value " << bad);
    const float finite[4] = {1.f, -2.f, 3.f, 0.5f};
    const float row[4] = {1.f, bad, 3.f, 0.5f};
    KvCache<std::int8_t> cache(layout, 2);
    cache.append(row, finite, 1);
    cache.append(finite, finite, 1);
    float k_read[4], v_read[4];
    cache.read_token(0, 0, k_read, v_read);
    for (int d = 0; d < 4; ++d) {
      CHECK(std::isnan(k_read[d]));
      CHECK(std::isfinite(v_read[d]));  // the value row beside it is finite and kept
    }
    cache.read_token(1, 0, k_read, v_read);  // the next token is unaffected
    for (int d = 0; d < 4; ++d) CHECK(std::fabs(k_read[d] - finite[d]) <= 3.f / 254 * 1.001f);
  }
}

TEST_CASE("int8 rows of any finite magnitude read back within half a step, zeros as zeros", "[cache][storage]") {
  // 127 / max overflows fp32 below max ~3.7e-37: zeros became NaN (and were cast to int8,
  // undefined behaviour) and every other value clamped to +-127 steps.
  const HeadLayout layout{2, 1, 8};
  for (float max : {3e38f, 1e30f, 1.f, 1e-30f, 4e-37f, 3.6e-37f, 1e-37f, 1e-40f, 1e-44f}) {
    INFO("row maximum " << max);
    const float k[8] = {max, -max / 2, 0.f, max / 127 * 3, -max, max / 3, 0.f, max / 1000};
    float v[8];
    for (int d = 0; d < 8; ++d) v[d] = -k[d];
    KvCache<std::int8_t> cache(layout, 2);
    cache.append(k, v, 1);
    float k_read[8], v_read[8];
    cache.read_token(0, 0, k_read, v_read);
    // Half a quantisation step, plus the rounding of a denormal scale (127 x its spacing).
    const double tolerance = double(max) / 254 * 1.001 + 127 * 1.5e-45;
    for (int d = 0; d < 8; ++d) {
      INFO("dim " << d);
      REQUIRE(std::isfinite(k_read[d]));
      REQUIRE(std::isfinite(v_read[d]));
      CHECK(std::fabs(double(k_read[d]) - double(k[d])) <= tolerance);
      CHECK(std::fabs(double(v_read[d]) - double(v[d])) <= tolerance);
      if (k[d] == 0.f) CHECK((k_read[d] == 0.f && v_read[d] == 0.f));
    }
  }
}

TEST_CASE("int8 stores nearest-even(x * 127 / max) exactly, and finds a non-finite value anywhere", "[cache][storage]") {
  // Every head_dim through the compiler-vectorised loops and their tails; values with
  // ties (x * 127 / max = k + 1/2 exactly: max 127, x = k + 1/2) and random ones.
  for (int head_dim = 1; head_dim <= 67; ++head_dim) {
    INFO("head_dim " << head_dim);
    const HeadLayout layout{1, 1, head_dim};
    const auto length = static_cast<std::size_t>(head_dim);
    std::vector<float> k(length), v(length);
    std::uint32_t state = 7u + std::uint32_t(head_dim);
    for (int d = 0; d < head_dim; ++d) {
      state = state * 1664525u + 1013904223u;
      k[std::size_t(d)] = d % 3 == 0 ? float(d % 127) + 0.5f : float(int(state >> 9) - (1 << 22)) / 65536.f;
      v[std::size_t(d)] = (d % 2 ? -1.f : 1.f) * (float(d % 127) + 0.5f);
    }
    k[std::size_t(head_dim) / 2] = -127.f;  // max |k| = 127 unless a random value is larger
    v[std::size_t(head_dim - 1)] = 127.f;
    KvCache<std::int8_t> cache(layout, 1);
    cache.append(k.data(), v.data(), 1);
    for (const bool keys : {true, false}) {
      const std::vector<float>& row = keys ? k : v;
      double max = 0;
      for (float x : row) max = std::max(max, std::fabs(double(x)));
      const float scale = (keys ? cache.key_scales() : cache.value_scales())[0];
      CHECK(scale == float(max) / 127.f);
      const std::int8_t* stored = keys ? cache.keys() : cache.values();
      int wrong = 0;
      for (int d = 0; d < head_dim; ++d) {
        // x * 127 / max is within 2^-40 of k + 1/2 only for the exact ties here.
        const double want = std::clamp(std::nearbyint(double(row[std::size_t(d)]) * 127.0 / max), -127.0, 127.0);
        wrong += stored[d] != std::int8_t(want);
      }
      INFO((keys ? "keys" : "values"));
      CHECK(wrong == 0);
    }
    // A non-finite value at any position makes the row NaN (scale NaN), wherever it falls
    // in the vectorised loop.
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    int missed = 0;
    for (int at = 0; at < head_dim; ++at)
      for (const float bad : {inf, -inf, nan}) {
        std::vector<float> with = k;
        with[std::size_t(at)] = bad;
        KvCache<std::int8_t> poisoned(layout, 1);
        poisoned.append(with.data(), v.data(), 1);
        missed += !std::isnan(poisoned.key_scales()[0]) || std::isnan(poisoned.value_scales()[0]);
      }
    CHECK(missed == 0);
  }
}

TEST_CASE("an fp16 cache stores fp16::from_float of every value, at every head_dim", "[cache][storage]") {
  for (int head_dim = 1; head_dim <= 67; ++head_dim) {
    INFO("head_dim " << head_dim);
    const HeadLayout layout{2, 2, head_dim};
    const int tokens = 3;
    std::vector<float> k(std::size_t(tokens) * 2 * std::size_t(head_dim)), v(k.size());
    std::uint32_t state = 11u + std::uint32_t(head_dim);
    for (std::size_t i = 0; i < k.size(); ++i) {
      state = state * 1664525u + 1013904223u;
      // Magnitudes from fp16's subnormals (~6e-8) to past its largest finite value.
      const float magnitude = std::ldexp(1.f + float(state >> 9) / float(1 << 23), int(state % 42) - 26);
      k[i] = state & 1u ? magnitude : -magnitude;
      v[i] = magnitude > 65000.f ? std::numeric_limits<float>::quiet_NaN() : -k[i];
    }
    for (std::size_t i = 0; i < k.size(); ++i)
      if (std::fabs(k[i]) >= 65520.f) k[i] = std::copysign(65504.f, k[i]);  // would throw: stays finite in fp16
    KvCache<kvheads::fp16> cache(layout, tokens);
    cache.append(k.data(), v.data(), tokens);
    int wrong = 0;
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < 2; ++h)
        for (int d = 0; d < head_dim; ++d) {
          const std::size_t src = (std::size_t(t) * 2 + std::size_t(h)) * std::size_t(head_dim) + std::size_t(d);
          const std::ptrdiff_t slot = h * cache.head_stride() + t * cache.token_stride() + d;
          wrong += cache.keys()[slot].bits != kvheads::fp16::from_float(k[src]).bits;
          wrong += cache.values()[slot].bits != kvheads::fp16::from_float(v[src]).bits;
        }
    CHECK(wrong == 0);
  }
}

TEST_CASE("reduced-precision caches hold fewer bytes", "[cache][storage]") {
  const HeadLayout layout{32, 8, 128};
  const KvCache<float> f32(layout, 1024);
  CHECK(KvCache<kvheads::bf16>(layout, 1024).bytes() * 2 == f32.bytes());
  CHECK(KvCache<kvheads::fp16>(layout, 1024).bytes_per_token() * 2 == f32.bytes_per_token());
  // int8: a quarter of the fp32 bytes plus one float scale per token and KV head.
  CHECK(KvCache<std::int8_t>(layout, 1024).bytes_per_token() == f32.bytes_per_token() / 4 + 2 * 8 * sizeof(float));
}

TEST_CASE("a sliding-window ring equals a full cache with the same window over a long decode", "[cache][ring]") {
  const int window = 37;
  // {8, 2, 64}: groups of 4 read their rows in place and request them ahead to the end of
  // each of the ring's two segments (Tiling::dims_own_ahead).
  for (const HeadLayout& layout : {HeadLayout{4, 4, 16}, HeadLayout{8, 2, 9}, HeadLayout{8, 2, 64}, HeadLayout{8, 1, 64}})
    for (AttentionOptions options : option_sets()) {
      options.window = window;  // the full cache needs it; the ring implies it
      std::vector<float> sinks(std::size_t(layout.q_heads), 0.5f);
      if (options.alibi) options.sinks = sinks.data();
      INFO(describe(layout, 1, 5 * window, options));
      const int steps = 5 * window;
      const Problem p(layout, steps, steps, 77);
      KvCache<float> full(layout, steps);
      KvCache<float> ring = KvCache<float>::ring(layout, window);
      CHECK(ring.capacity() == window);
      for (int t = 0; t < steps; ++t) {
        const std::ptrdiff_t offset = std::ptrdiff_t(t) * layout.kv_width();
        full.append(p.k.data() + offset, p.v.data() + offset, 1);
        ring.append(p.k.data() + offset, p.v.data() + offset, 1);
        REQUIRE(ring.size() == std::min(t + 1, window));
        REQUIRE(ring.position() == t + 1);
        const float* q = p.q.data() + std::ptrdiff_t(t) * layout.q_width();
        std::vector<float> a(std::size_t(layout.q_width())), b(a.size());
        kvheads::attend(q, 1, full, a.data(), options);
        AttentionOptions ring_options = options;
        ring_options.window = 0;  // the ring brings its own window
        kvheads::attend(q, 1, ring, b.data(), ring_options);
        REQUIRE(relative_error(b, a) <= 1e-6);
      }
    }
}

TEST_CASE("a ring attends with its own window or a narrower one, and refuses a wider one", "[cache][ring]") {
  const HeadLayout layout{8, 2, 16};
  const int window = 20, steps = 50;
  const Problem p(layout, steps, steps, 5);
  KvCache<float> full(layout, steps);
  KvCache<float> ring = KvCache<float>::ring(layout, window);
  full.append(p.k.data(), p.v.data(), steps);
  for (int t = 0; t < steps; t += 7) ring.append(p.k.data() + std::ptrdiff_t(t) * layout.kv_width(),
                                                 p.v.data() + std::ptrdiff_t(t) * layout.kv_width(), std::min(7, steps - t));
  const float* q = p.q.data() + std::ptrdiff_t(steps - 1) * layout.q_width();
  std::vector<float> a(std::size_t(layout.q_width())), b(a.size());
  for (int asked : {0, window, 7, 1}) {
    INFO("options.window " << asked);
    AttentionOptions full_options, ring_options;
    full_options.window = asked > 0 ? asked : window;
    ring_options.window = asked;
    kvheads::attend(q, 1, full, a.data(), full_options);
    kvheads::attend(q, 1, ring, b.data(), ring_options);
    CHECK(relative_error(b, a) <= 1e-6);
  }
  // A wider window needs keys the ring has overwritten: an error, never a narrower answer.
  AttentionOptions wider;
  wider.window = window + 1;
  CHECK_THROWS_AS(kvheads::attend(q, 1, ring, b.data(), wider), std::invalid_argument);
  CHECK_THROWS_WITH(kvheads::attend(q, 1, ring, b.data(), wider),
                    Catch::Contains("window (21) must not exceed the ring cache's window (20)"));
  // A layer refuses it before appending anything.
  kvheads::Attention<float> layer(16, layout);
  KvCache<float> layer_ring = KvCache<float>::ring(layout, window);
  const std::vector<float> x = random_vector(16, 9);
  std::vector<float> out(16);
  layer.forward(x.data(), 1, layer_ring, out.data());
  CHECK_THROWS_WITH(layer.forward(x.data(), 1, layer_ring, out.data(), wider),
                    Catch::Contains("window (21) must not exceed the ring cache's window (20)"));
  CHECK(layer_ring.size() == 1);
  CHECK(layer_ring.position() == 1);
}

TEST_CASE("a ring made for several queries per call serves chunked prefill", "[cache][ring]") {
  const HeadLayout layout{8, 2, 16};
  const int window = 20, chunk = 4, steps = 100;
  const Problem p(layout, steps, steps, 3);
  KvCache<float> full(layout, steps);
  KvCache<float> ring = KvCache<float>::ring(layout, window, chunk);
  AttentionOptions options;
  options.window = window;
  options.alibi = true;
  for (int t = 0; t < steps; t += chunk) {
    const std::ptrdiff_t offset = std::ptrdiff_t(t) * layout.kv_width();
    full.append(p.k.data() + offset, p.v.data() + offset, chunk);
    ring.append(p.k.data() + offset, p.v.data() + offset, chunk);
    const float* q = p.q.data() + std::ptrdiff_t(t) * layout.q_width();
    std::vector<float> a(std::size_t(chunk * layout.q_width())), b(a.size());
    kvheads::attend(q, chunk, full, a.data(), options);
    kvheads::attend(q, chunk, ring, b.data(), options);
    REQUIRE(relative_error(b, a) <= 1e-6);
  }
  // More queries than the ring can serve is an error, not a silently short window.
  KvCache<float> small = KvCache<float>::ring(layout, window);
  small.append(p.k.data(), p.v.data(), 30);
  std::vector<float> out(std::size_t(2 * layout.q_width()));
  CHECK_THROWS_WITH(kvheads::attend(p.q.data(), 2, small, out.data()), Catch::Contains("q_len (2) is too many queries"));
  // A ring never refuses an append for being full, even a long one.
  small.append(p.k.data(), p.v.data(), 90);
  CHECK(small.size() == window);
  CHECK(small.position() == 120);
}

TEST_CASE("a ragged batch equals per-sequence calls", "[cache][batch]") {
  for (const HeadLayout& layout : {HeadLayout{8, 8, 16}, HeadLayout{8, 2, 64}, HeadLayout{16, 1, 32}})
    for (int threads : {1, 2}) {
      const std::vector<std::pair<int, int>> shapes = {{1, 1}, {1, 2000}, {5, 17}, {1, 700}, {17, 300}};
      std::vector<KvCache<float>> caches;
      std::vector<Problem> problems;
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        problems.emplace_back(layout, shapes[i].first, shapes[i].second, std::uint32_t(i * 10));
        caches.emplace_back(layout, shapes[i].second);
        caches.back().append(problems.back().k.data(), problems.back().v.data(), shapes[i].second);
      }
      AttentionOptions options = option_sets().back();
      options.threads = threads;
      std::vector<std::vector<float>> batched(shapes.size()), single(shapes.size()), lse(shapes.size());
      std::vector<kvheads::AttendItem<float>> items;
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        batched[i].assign(problems[i].out_size(), -1.f);
        single[i].assign(problems[i].out_size(), -2.f);
        lse[i].assign(std::size_t(shapes[i].first * layout.q_heads), 0.f);
        items.push_back({problems[i].q.data(), shapes[i].first, &caches[i], batched[i].data(), lse[i].data()});
      }
      kvheads::attend(items, options);
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        INFO(describe(layout, shapes[i].first, shapes[i].second, options) << " item " << i);
        std::vector<float> expected_lse;
        kvheads::attend(problems[i].q.data(), shapes[i].first, caches[i], single[i].data(), options);
        CHECK(relative_error(batched[i], single[i]) <= 1e-6);
        CHECK(relative_error(batched[i], problems[i].reference(options, &expected_lse)) <= tolerance);
        CHECK(relative_error(lse[i], expected_lse, 1.0) <= tolerance);
      }
    }
  KvCache<float> a(HeadLayout{4, 4, 8}, 4), b(HeadLayout{4, 2, 8}, 4);
  std::vector<float> q(32), out(32);
  a.append(q.data(), q.data(), 1);
  b.append(q.data(), q.data(), 1);
  std::vector<kvheads::AttendItem<float>> mixed = {{q.data(), 1, &a, out.data()}, {q.data(), 1, &b, out.data()}};
  CHECK_THROWS_WITH(kvheads::attend(mixed), Catch::Contains("items[1].cache has layout (4, 2, 8)"));
}

TEST_CASE("drop_last, truncate, copies, reserve and growth keep the cache consistent", "[cache][ops]") {
  const HeadLayout layout{8, 2, 16};
  const Problem p(layout, 1, 60, 8);
  const std::ptrdiff_t width = layout.kv_width();
  auto attend_last = [&](const KvCache<float>& cache) {
    std::vector<float> out(std::size_t(layout.q_width()));
    AttentionOptions options;
    options.causal = true;
    options.alibi = true;
    kvheads::attend(p.q.data(), 1, cache, out.data(), options);
    return out;
  };
  // Speculative decoding: append 10 guesses, reject 6, append the 6 true tokens.
  KvCache<float> cache(layout, 60);
  cache.append(p.k.data(), p.v.data(), 40);
  const std::vector<float> junk = random_vector(std::size_t(10 * width), 99);
  cache.append(junk.data(), junk.data(), 10);
  cache.drop_last(6);
  CHECK(cache.size() == 44);
  cache.truncate(40);
  CHECK(cache.position() == 40);
  cache.append(p.k.data() + 40 * width, p.v.data() + 40 * width, 20);
  KvCache<float> fresh(layout, 60);
  fresh.append(p.k.data(), p.v.data(), 60);
  CHECK(attend_last(cache) == attend_last(fresh));
  CHECK_THROWS_AS(cache.drop_last(61), std::invalid_argument);
  CHECK_THROWS_AS(cache.truncate(-1), std::invalid_argument);
  CHECK(cache.size() == 60);

  // Copies are independent; moves keep the contents.
  KvCache<float> copy = cache;
  copy.truncate(10);
  CHECK(cache.size() == 60);
  CHECK(attend_last(cache) == attend_last(fresh));
  KvCache<float> moved = std::move(copy);
  CHECK(moved.size() == 10);

  // A non-growable cache refuses, unchanged; reserve makes room and keeps every token.
  KvCache<float> fixed(layout, 30);
  fixed.append(p.k.data(), p.v.data(), 30);
  CHECK_THROWS_AS(fixed.append(p.k.data() + 30 * width, p.v.data() + 30 * width, 30), std::length_error);
  CHECK(fixed.size() == 30);
  fixed.reserve(60);
  CHECK(fixed.capacity() == 60);
  fixed.append(p.k.data() + 30 * width, p.v.data() + 30 * width, 30);
  CHECK(attend_last(fixed) == attend_last(fresh));

  // A growable cache grows on append.
  kvheads::CacheOptions growable;
  growable.growable = true;
  KvCache<float> growing(layout, 7, growable);
  for (int t = 0; t < 60; t += 5) growing.append(p.k.data() + t * width, p.v.data() + t * width, 5);
  CHECK(growing.size() == 60);
  CHECK(growing.capacity() >= 60);
  CHECK(attend_last(growing) == attend_last(fresh));
  // Rings cannot be resized or made growable.
  KvCache<float> ring = KvCache<float>::ring(layout, 8);
  CHECK_THROWS_AS(ring.reserve(100), std::invalid_argument);
  kvheads::CacheOptions bad;
  bad.window = 4;
  bad.growable = true;
  CHECK_THROWS_WITH((KvCache<float>(layout, 8, bad)), Catch::Contains("cannot be growable"));
  bad.growable = false;
  bad.window = 9;
  CHECK_THROWS_WITH((KvCache<float>(layout, 8, bad)), Catch::Contains("cache window (9) must not exceed its capacity (8)"));
}

TEMPLATE_LIST_TEST_CASE("attention sinks join the softmax denominator on every ISA", "[attend][sinks][isa]",
                        kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  for (const HeadLayout& layout : {HeadLayout{4, 4, 17}, HeadLayout{8, 2, 64}, HeadLayout{16, 1, 32}}) {
    std::vector<float> sinks = random_vector(std::size_t(layout.q_heads), 12, 2.f);
    sinks[0] = 30.f;  // a sink that dominates its head
    for (auto [q_len, kv_len] : {std::pair{1, 1}, std::pair{1, 3000}, std::pair{17, 17}, std::pair{5, 200}})
      for (AttentionOptions options : {AttentionOptions{}, option_sets()[2], option_sets().back()}) {
        options.sinks = sinks.data();
        const Problem p(layout, q_len, kv_len, 4);
        std::vector<float> expected_lse;
        const std::vector<float> expected = p.reference(options, &expected_lse);  // once for both thread counts
        for (int threads : {1, 2}) {
          options.threads = threads;
          INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name);
          std::vector<float> out(p.out_size()), lse(std::size_t(q_len * layout.q_heads));
          kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), out.data(), q_len, kv_len, layout, options, lse.data());
          CHECK(relative_error(out, expected) <= tolerance);
          CHECK(relative_error(lse, expected_lse, 1.0) <= tolerance);
        }
      }
  }
}

TEST_CASE("attending to two halves of the keys and merging equals attending to all", "[attend][lse]") {
  for (const HeadLayout& layout : {HeadLayout{4, 4, 16}, HeadLayout{8, 2, 33}, HeadLayout{8, 1, 64}}) {
    const int q_len = 5, kv_len = 1500, half = 600;
    const Problem p(layout, q_len, kv_len, 31);
    AttentionOptions options;
    options.softcap = 20.f;
    std::vector<float> full(p.out_size()), full_lse(std::size_t(q_len * layout.q_heads));
    kvheads::attend(p.q.data(), p.k.data(), p.v.data(), full.data(), q_len, kv_len, layout, options, full_lse.data());
    std::vector<float> a(full.size()), b(full.size()), lse_a(full_lse.size()), lse_b(full_lse.size());
    kvheads::attend(p.q.data(), p.k.data(), p.v.data(), a.data(), q_len, half, layout, options, lse_a.data());
    const std::ptrdiff_t offset = std::ptrdiff_t(half) * layout.kv_width();
    kvheads::attend(p.q.data(), p.k.data() + offset, p.v.data() + offset, b.data(), q_len, kv_len - half, layout,
                    options, lse_b.data());
    std::vector<float> merged(full.size()), merged_lse(full_lse.size());
    kvheads::merge(a.data(), lse_a.data(), b.data(), lse_b.data(), merged.data(), merged_lse.data(), q_len, layout);
    CHECK(relative_error(merged, full) <= 3e-6);  // exact but for fp32 rounding
    CHECK(relative_error(merged_lse, full_lse, 1.0) <= 3e-6);
    // In place, into the first part.
    kvheads::merge(a.data(), lse_a.data(), b.data(), lse_b.data(), a.data(), lse_a.data(), q_len, layout);
    CHECK(a == merged);
  }
  std::vector<float> x(8);
  CHECK_THROWS_WITH(kvheads::merge(x.data(), nullptr, x.data(), x.data(), x.data(), x.data(), 1, HeadLayout{1, 1, 4}),
                    Catch::Contains("lse_a is null"));
}
