// Rotary position embedding: the rotation against a per-element double reference written
// here from the formulas, its defining properties (identity at 0, norm-preserving,
// relative), the Attention layer with RoPE against projections + reference RoPE + the
// reference kernel, prefill/decode equivalence, and the checks on RopeOptions.
#include <catch2/catch.hpp>

#include <cstdint>
#include <functional>
#include <limits>

#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::RopeLayout;
using kvheads::RopeOptions;
using kvheads::RowMatrix;
using namespace kvheads_test;

namespace {

RopeOptions rope_with(RopeLayout layout, int rotary_dim = 0, float base = 10000.f) {
  RopeOptions rope;
  rope.enabled = true;
  rope.layout = layout;
  rope.rotary_dim = rotary_dim;
  rope.base = base;
  return rope;
}

const char* name_of(RopeLayout layout) { return layout == RopeLayout::half_split ? "half_split" : "interleaved"; }

// Index of the other member of the pair that dimension d (< rotary_dim) belongs to, its pair
// number i, and whether d is the pair's first member.
struct PairMember {
  int partner;
  int pair;
  bool first;
};
PairMember pair_member(int d, int rotary_dim, RopeLayout layout) {
  const int half = rotary_dim / 2;
  if (layout == RopeLayout::half_split) return d < half ? PairMember{d + half, d, true} : PairMember{d - half, d - half, false};
  return d % 2 == 0 ? PairMember{d + 1, d / 2, true} : PairMember{d - 1, d / 2, false};
}

// RoPE one output element at a time, in double, straight from the definition:
// pair i of a token at position p turns by p * base^(-2i/rotary_dim); (a, b) -> (a c - b s, a s + b c).
std::vector<double> reference_rope(const std::vector<double>& x, int tokens, int heads, int head_dim,
                                   std::int64_t first_position, const RopeOptions& rope) {
  const int rotary_dim = rope.rotary_dim == 0 ? head_dim : rope.rotary_dim;
  std::vector<double> out(x.size());
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h)
      for (int d = 0; d < head_dim; ++d) {
        const std::size_t row = (std::size_t(t) * std::size_t(heads) + std::size_t(h)) * std::size_t(head_dim);
        if (d >= rotary_dim) {
          out[row + std::size_t(d)] = x[row + std::size_t(d)];
          continue;
        }
        const PairMember m = pair_member(d, rotary_dim, rope.layout);
        const double theta =
            double(first_position + t) * std::pow(double(rope.base), -2.0 * double(m.pair) / double(rotary_dim));
        const double self = x[row + std::size_t(d)], other = x[row + std::size_t(m.partner)];
        out[row + std::size_t(d)] = m.first ? self * std::cos(theta) - other * std::sin(theta)
                                            : other * std::sin(theta) + self * std::cos(theta);
      }
  return out;
}

std::vector<float> to_float(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }
std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// The library's rotation on a copy of x [tokens][heads][head_dim].
std::vector<float> rotated(std::vector<float> x, int tokens, int heads, int head_dim, std::int64_t first_position,
                           const RopeOptions& rope) {
  kvheads::detail::apply_rope(x.data(), tokens, heads, head_dim, first_position, rope);
  return x;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (std::size_t i = 0; i < a.size(); ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

template <class Layer>
void randomise(Layer& layer, std::uint32_t seed) {
  const float scale = 1.f / std::sqrt(float(layer.d_model()));
  for (RowMatrix* w : {&layer.wq(), &layer.wk(), &layer.wv(), &layer.wo()}) {
    const std::vector<float> values = random_vector(std::size_t(w->size()), seed++, scale);
    *w = Eigen::Map<const RowMatrix>(values.data(), w->rows(), w->cols());
  }
}

// The layer the slow way: double projections, the reference RoPE above on Q and K when
// enabled (the tokens at positions 0..tokens-1), the reference kernel, the double output
// projection.
template <class Layer>
std::vector<float> reference_layer(const Layer& layer, const std::vector<float>& x, int tokens,
                                   const AttentionOptions& options, const RopeOptions& rope) {
  const HeadLayout& l = layer.layout();
  const Eigen::MatrixXd input = Eigen::Map<const RowMatrix>(x.data(), tokens, layer.d_model()).template cast<double>();
  auto project = [&](const RowMatrix& w) {
    const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> product = input * w.cast<double>();
    return std::vector<double>(product.data(), product.data() + product.size());
  };
  auto rotate = [&](const std::vector<double>& x, int heads) {
    return rope.enabled ? reference_rope(x, tokens, heads, l.head_dim, 0, rope) : x;
  };
  const std::vector<float> q = to_float(rotate(project(layer.wq()), l.q_heads));
  const std::vector<float> k = to_float(rotate(project(layer.wk()), l.kv_heads));
  const std::vector<float> v = to_float(project(layer.wv()));
  std::vector<float> attended(q.size());
  kvheads::reference_attend(q.data(), k.data(), v.data(), attended.data(), tokens, tokens, l, options);
  const Eigen::MatrixXd out = Eigen::Map<const RowMatrix>(attended.data(), tokens, l.q_width()).cast<double>() *
                              layer.wo().template cast<double>();
  RowMatrix result = out.cast<float>();
  return std::vector<float>(result.data(), result.data() + result.size());
}

template <class Exception>
void expect_error(const std::function<void()>& call, const std::string& must_contain) {
  INFO("expected message containing: " << must_contain);
  try {
    call();
    FAIL("no exception");
  } catch (const Exception& e) {
    const std::string message = e.what();
    INFO("message: " << message);
    CHECK(message.rfind("kvheads: ", 0) == 0);
    CHECK(message.find(must_contain) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("RoPE matches a per-element double reference in both layouts, full and partial", "[rope]") {
  const int tokens = 4, heads = 3;
  for (const int head_dim : {16, 12}) {
    for (const RopeLayout layout : {RopeLayout::half_split, RopeLayout::interleaved}) {
      for (const int rotary_dim : {0, 8, 2}) {
        for (const float base : {10000.f, 500000.f}) {
          for (const std::int64_t first_position : {std::int64_t{0}, std::int64_t{1}, std::int64_t{17},
                                                    std::int64_t{100000}}) {
            const RopeOptions rope = rope_with(layout, rotary_dim, base);
            INFO(name_of(layout) << " head_dim " << head_dim << " rotary_dim " << rotary_dim << " base " << base
                                 << " first position " << first_position);
            const std::vector<float> x =
                random_vector(std::size_t(tokens * heads * head_dim), std::uint32_t(head_dim + rotary_dim));
            const std::vector<float> actual = rotated(x, tokens, heads, head_dim, first_position, rope);
            const std::vector<double> expected =
                reference_rope(to_double(x), tokens, heads, head_dim, first_position, rope);
            // Within float rounding of the exact result (a float angle would miss by ~1e-3 at 100000).
            CHECK(relative_error(actual, to_float(expected)) <= 1e-6);
            // Dimensions past rotary_dim pass through bit for bit.
            const int rotated_dims = rotary_dim == 0 ? head_dim : rotary_dim;
            bool untouched = true;
            for (std::size_t row = 0; row < std::size_t(tokens * heads); ++row)
              for (int d = rotated_dims; d < head_dim; ++d)
                untouched = untouched && actual[row * std::size_t(head_dim) + std::size_t(d)] ==
                                             x[row * std::size_t(head_dim) + std::size_t(d)];
            CHECK(untouched);
          }
        }
      }
    }
  }
}

TEST_CASE("RoPE at position 0 is the identity", "[rope]") {
  const int heads = 2, head_dim = 10;
  const std::vector<float> x = random_vector(std::size_t(heads * head_dim), 4);
  for (const RopeLayout layout : {RopeLayout::half_split, RopeLayout::interleaved})
    for (const int rotary_dim : {0, 6}) {
      INFO(name_of(layout) << " rotary_dim " << rotary_dim);
      CHECK(rotated(x, 1, heads, head_dim, 0, rope_with(layout, rotary_dim)) == x);
    }
}

TEST_CASE("RoPE preserves the norm of every rotated pair", "[rope]") {
  const int tokens = 3, heads = 2, head_dim = 16;
  const std::vector<float> x = random_vector(std::size_t(tokens * heads * head_dim), 12);
  for (const RopeLayout layout : {RopeLayout::half_split, RopeLayout::interleaved})
    for (const int rotary_dim : {0, 10})
      for (const std::int64_t first_position : {std::int64_t{1}, std::int64_t{17}, std::int64_t{100000}}) {
        INFO(name_of(layout) << " rotary_dim " << rotary_dim << " first position " << first_position);
        const int rotated_dims = rotary_dim == 0 ? head_dim : rotary_dim;
        const std::vector<float> y = rotated(x, tokens, heads, head_dim, first_position, rope_with(layout, rotary_dim));
        double worst = 0;
        for (std::size_t row = 0; row < std::size_t(tokens * heads); ++row)
          for (int d = 0; d < rotated_dims; ++d) {
            const PairMember m = pair_member(d, rotated_dims, layout);
            if (!m.first) continue;
            const std::size_t a = row * std::size_t(head_dim) + std::size_t(d);
            const std::size_t b = row * std::size_t(head_dim) + std::size_t(m.partner);
            const double before = std::hypot(double(x[a]), double(x[b]));
            const double after = std::hypot(double(y[a]), double(y[b]));
            worst = std::max(worst, std::fabs(after - before) / before);
          }
        CHECK(worst <= 1e-6);
      }
}

TEST_CASE("rotated q.k depends only on the distance between the two positions", "[rope]") {
  const int head_dim = 32;
  const std::vector<float> q = random_vector(std::size_t(head_dim), 21), k = random_vector(std::size_t(head_dim), 22);
  const double bound = std::sqrt(dot(q, q) * dot(k, k));
  for (const RopeLayout layout : {RopeLayout::half_split, RopeLayout::interleaved})
    for (const int rotary_dim : {0, 16}) {
      const RopeOptions rope = rope_with(layout, rotary_dim);
      auto score = [&](std::int64_t m, std::int64_t n) {
        return dot(rotated(q, 1, 1, head_dim, m, rope), rotated(k, 1, 1, head_dim, n, rope));
      };
      for (const std::int64_t distance : {std::int64_t{0}, std::int64_t{3}, std::int64_t{-5}, std::int64_t{40}}) {
        const std::int64_t m = 50, n = m - distance;
        const double at_origin = score(m, n);
        for (const std::int64_t shift : {std::int64_t{1}, std::int64_t{17}, std::int64_t{1000}, std::int64_t{100000}}) {
          INFO(name_of(layout) << " rotary_dim " << rotary_dim << " m " << m + shift << " n " << n + shift);
          CHECK(std::fabs(score(m + shift, n + shift) - at_origin) <= 1e-5 * bound);
        }
      }
      // ...and it does depend on the distance (the check above is not vacuous).
      CHECK(std::fabs(score(50, 47) - score(50, 45)) > 1e-3 * bound);
    }
}

TEST_CASE("an Attention layer with RoPE equals projections, reference RoPE and the reference kernel",
          "[rope][attention]") {
  const int d_model = 48, tokens = 37;
  const std::vector<float> x = random_vector(std::size_t(tokens * d_model), 9);
  for (const HeadLayout& layout : {HeadLayout{4, 4, 12}, HeadLayout{4, 2, 12}, HeadLayout{4, 1, 12}}) {
    kvheads::Attention<float> layer(d_model, layout);
    randomise(layer, 3);
    for (const RopeOptions& rope : {rope_with(RopeLayout::half_split), rope_with(RopeLayout::interleaved, 8, 500000.f)}) {
      layer.set_rope(rope);
      for (const AttentionOptions& options : option_sets()) {
        INFO(describe(layout, tokens, tokens, options) << " rope " << name_of(rope.layout) << " rotary_dim "
                                                       << rope.rotary_dim);
        auto cache = layer.make_cache(64);
        std::vector<float> out(x.size());
        layer.forward(x.data(), tokens, cache, out.data(), options);
        CHECK(relative_error(out, reference_layer(layer, x, tokens, options, rope)) <= 1e-5);
        // RoPE made a difference: the same layer without it gives another answer.
        CHECK(relative_error(out, reference_layer(layer, x, tokens, options, RopeOptions{})) > 1e-3);
      }
    }
  }
}

TEST_CASE("with RoPE, prefill then single-token decode equals one forward over the whole sequence",
          "[rope][attention]") {
  const int d_model = 64, tokens = 40, prefill = 23;
  const std::vector<float> x = random_vector(std::size_t(tokens * d_model), 5);
  for (const HeadLayout& layout : {HeadLayout{8, 8, 8}, HeadLayout{8, 2, 8}, HeadLayout{8, 1, 8}}) {
    kvheads::Attention<float> layer(d_model, layout);
    randomise(layer, 17);
    for (const RopeOptions& rope : {rope_with(RopeLayout::half_split), rope_with(RopeLayout::interleaved, 6)}) {
      layer.set_rope(rope);
      for (AttentionOptions options : option_sets()) {
        options.causal = true;  // decoding is causal by nature; one forward must match it
        INFO(describe(layout, tokens, tokens, options) << " rope " << name_of(rope.layout));
        auto whole_cache = layer.make_cache(tokens);
        std::vector<float> whole(x.size()), stepped(x.size());
        layer.forward(x.data(), tokens, whole_cache, whole.data(), options);
        auto cache = layer.make_cache(tokens);
        layer.forward(x.data(), prefill, cache, stepped.data(), options);
        for (int t = prefill; t < tokens; ++t)
          layer.forward(x.data() + t * d_model, 1, cache, stepped.data() + t * d_model, options);
        CHECK(relative_error(stepped, whole) <= 1e-5);
      }
    }
  }
}

TEST_CASE("RoPE is off by default and a disabled setting changes nothing", "[rope][attention]") {
  const int d_model = 16, tokens = 6;
  kvheads::Attention<float> plain(d_model, HeadLayout{4, 2, 4});
  randomise(plain, 8);
  CHECK_FALSE(plain.rope().enabled);
  kvheads::Attention<float> disabled = plain;
  RopeOptions off = rope_with(RopeLayout::interleaved, 2, 3.f);
  off.enabled = false;
  disabled.set_rope(off);
  CHECK(disabled.rope().layout == RopeLayout::interleaved);
  const std::vector<float> x = random_vector(std::size_t(tokens * d_model), 1);
  std::vector<float> a(x.size()), b(x.size());
  auto cache_a = plain.make_cache(tokens), cache_b = disabled.make_cache(tokens);
  plain.forward(x.data(), tokens, cache_a, a.data());
  disabled.forward(x.data(), tokens, cache_b, b.data());
  CHECK(a == b);
  // The default setting suits an odd head_dim; an even rotary_dim below it rotates.
  kvheads::Attention<float, 6, 2, 3> odd(12);
  CHECK_NOTHROW(odd.set_rope(RopeOptions{}));
  CHECK_NOTHROW(odd.set_rope(rope_with(RopeLayout::half_split, 2)));
}

TEST_CASE("a forward that throws leaves the cache and the next positions as they were", "[rope][attention]") {
  const int d_model = 16;
  kvheads::Attention<float> layer(d_model, HeadLayout{4, 1, 8});
  randomise(layer, 2);
  layer.set_rope(rope_with(RopeLayout::half_split));
  const std::vector<float> x = random_vector(std::size_t(5 * d_model), 6);
  std::vector<float> failed(x.size()), clean(x.size());
  auto cache = layer.make_cache(5), reference_cache = layer.make_cache(5);
  layer.forward(x.data(), 3, cache, failed.data());
  layer.forward(x.data(), 3, reference_cache, clean.data());
  CHECK_THROWS_AS(layer.forward(x.data() + 3 * d_model, 3, cache, failed.data() + 3 * d_model), std::length_error);
  CHECK(cache.size() == 3);
  CHECK(cache.position() == 3);
  layer.forward(x.data() + 3 * d_model, 2, cache, failed.data() + 3 * d_model);
  layer.forward(x.data() + 3 * d_model, 2, reference_cache, clean.data() + 3 * d_model);
  CHECK(failed == clean);
}

TEST_CASE("invalid RopeOptions are rejected with the value, leaving the setting unchanged", "[rope][errors]") {
  kvheads::Attention<float> layer(16, HeadLayout{2, 1, 12});
  const RopeOptions good = rope_with(RopeLayout::interleaved, 4, 500000.f);
  layer.set_rope(good);
  auto with = [](std::function<void(RopeOptions&)> edit) {
    RopeOptions rope = rope_with(RopeLayout::half_split);
    edit(rope);
    return rope;
  };
  const std::vector<std::pair<RopeOptions, std::string>> cases = {
      {with([](RopeOptions& r) { r.base = 0.f; }), "rope base (0) must be finite and > 0"},
      {with([](RopeOptions& r) { r.base = -2.f; }), "rope base (-2) must be finite and > 0"},
      {with([](RopeOptions& r) { r.base = std::numeric_limits<float>::infinity(); }), "rope base (inf) must be finite"},
      {with([](RopeOptions& r) { r.base = std::numeric_limits<float>::quiet_NaN(); }), "must be finite and > 0"},
      {with([](RopeOptions& r) { r.rotary_dim = -2; }), "rope rotary_dim (-2) must be >= 0 (0 = head_dim)"},
      {with([](RopeOptions& r) { r.rotary_dim = 7; }), "rope rotary_dim (7) must be even"},
      {with([](RopeOptions& r) { r.rotary_dim = 14; }), "rope rotary_dim (14) must be at most head_dim (12)"},
      // Explicit fields are checked even while disabled.
      {with([](RopeOptions& r) { r.enabled = false;
                  r.rotary_dim = 5; }), "rope rotary_dim (5) must be even"},
  };
  for (const auto& entry : cases) {
    const RopeOptions& rope = entry.first;  // a named variable: lambdas cannot capture bindings in C++17
    const std::string& message = entry.second;
    expect_error<std::invalid_argument>([&] { layer.set_rope(rope); }, message);
    expect_error<std::invalid_argument>([&] { rope.validate(12); }, message);
    CHECK(layer.rope().layout == good.layout);
    CHECK(layer.rope().rotary_dim == good.rotary_dim);
    CHECK(layer.rope().base == good.base);
  }
  // rotary_dim 0 means head_dim, which must then be even.
  kvheads::Attention<float> odd(16, HeadLayout{2, 1, 5});
  expect_error<std::invalid_argument>([&] { odd.set_rope(rope_with(RopeLayout::half_split)); },
                                      "rope rotary_dim (0 = head_dim = 5) must be even");
}
