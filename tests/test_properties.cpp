// Properties that hold whatever the numbers: GQA/MQA with duplicated KV heads equal MHA,
// key order does not matter without masks, masked rows are zeros, and the softmax
// building blocks (online state, log-sum-exp merge, ALiBi slopes) behave as specified.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>

#include <kvheads/core/logits.hpp>
#include <kvheads/core/softmax.hpp>

#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using namespace kvheads_test;

namespace {
// Expands [tokens][kv_heads][d] to [tokens][q_heads][d] by repeating each KV head for its group.
std::vector<float> repeat_heads(const std::vector<float>& x, int tokens, HeadLayout layout) {
  std::vector<float> out(std::size_t(tokens) * std::size_t(layout.q_width()));
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < layout.q_heads; ++h)
      std::copy_n(x.begin() + (std::ptrdiff_t(t) * layout.kv_heads + layout.kv_head_of(h)) * layout.head_dim,
                  layout.head_dim, out.begin() + (std::ptrdiff_t(t) * layout.q_heads + h) * layout.head_dim);
  return out;
}
}  // namespace

TEST_CASE("GQA and MQA equal MHA whose KV heads repeat within each group", "[properties]") {
  for (const HeadLayout& grouped : {HeadLayout{8, 2, 16}, HeadLayout{8, 1, 16}, HeadLayout{12, 4, 5}}) {
    const HeadLayout mha{grouped.q_heads, grouped.q_heads, grouped.head_dim};
    const Problem p(grouped, 9, 130, 5);
    const std::vector<float> k = repeat_heads(p.k, p.kv_len, grouped), v = repeat_heads(p.v, p.kv_len, grouped);
    for (const AttentionOptions& options : option_sets()) {
      INFO(describe(grouped, p.q_len, p.kv_len, options));
      std::vector<float> out_grouped(p.out_size()), out_mha(p.out_size());
      kvheads::attend(p.q.data(), p.k.data(), p.v.data(), out_grouped.data(), p.q_len, p.kv_len, grouped, options);
      kvheads::attend(p.q.data(), k.data(), v.data(), out_mha.data(), p.q_len, p.kv_len, mha, options);
      CHECK(relative_error(out_grouped, out_mha) <= 1e-6);
    }
  }
}

TEST_CASE("permuting keys together with their values leaves non-causal output unchanged", "[properties]") {
  for (const HeadLayout& layout : {HeadLayout{4, 4, 8}, HeadLayout{8, 2, 33}, HeadLayout{8, 1, 64}}) {
    const Problem p(layout, 3, 257, 11);
    std::vector<int> order(std::size_t(p.kv_len));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(3));
    Problem shuffled = p;
    const std::ptrdiff_t width = layout.kv_width();
    for (int j = 0; j < p.kv_len; ++j) {
      std::copy_n(p.k.begin() + order[std::size_t(j)] * width, width, shuffled.k.begin() + j * width);
      std::copy_n(p.v.begin() + order[std::size_t(j)] * width, width, shuffled.v.begin() + j * width);
    }
    AttentionOptions options;
    options.softcap = 3.f;  // position-free transforms only
    std::vector<float> a(p.out_size()), b(p.out_size());
    kvheads::attend(p.q.data(), p.k.data(), p.v.data(), a.data(), p.q_len, p.kv_len, layout, options);
    kvheads::attend(shuffled.q.data(), shuffled.k.data(), shuffled.v.data(), b.data(), p.q_len, p.kv_len, layout, options);
    CHECK(relative_error(a, b) <= 1e-5);
  }
}

TEST_CASE("a query row that sees no key outputs zeros, never NaN", "[properties]") {
  // More queries than keys with a causal mask: the first q_len - kv_len rows sit at
  // negative positions and see nothing.
  const HeadLayout layout{8, 2, 16};
  const Problem p(layout, 10, 4, 3);
  AttentionOptions options;
  options.causal = true;
  std::vector<float> out(p.out_size(), 7.f), lse(std::size_t(p.q_len * layout.q_heads));
  kvheads::attend<kvheads::simd::default_isa>(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len,
                                              layout, options, lse.data());
  for (int i = 0; i < 6; ++i)
    for (std::ptrdiff_t x = 0; x < layout.q_width(); ++x) REQUIRE(out[std::size_t(i * layout.q_width() + x)] == 0.f);
  for (int i = 0; i < 6 * layout.q_heads; ++i) REQUIRE(lse[std::size_t(i)] == -INFINITY);
  CHECK(relative_error(out, p.reference(options)) <= tolerance);
  // kv_len 0: everything masked.
  std::vector<float> empty_out(p.out_size(), 7.f);
  kvheads::attend(p.q.data(), nullptr, nullptr, empty_out.data(), p.q_len, 0, layout, options);
  CHECK(std::all_of(empty_out.begin(), empty_out.end(), [](float x) { return x == 0.f; }));
}

TEST_CASE("softmax, the online softmax state and the log-sum-exp merge agree", "[properties][softmax]") {
  std::vector<float> logits = random_vector(1000, 4, 30.f);  // spread wide enough to need the max shift
  logits[10] = 500.f;
  std::vector<float> probabilities = logits;
  kvheads::detail::softmax(probabilities.data(), std::ptrdiff_t(probabilities.size()));
  CHECK(std::accumulate(probabilities.begin(), probabilities.end(), 0.0) == Approx(1.0).epsilon(1e-6));

  // Blocks of 64, rescaling as the max grows, give the same weights and sum.
  kvheads::detail::OnlineSoftmax state;
  std::vector<double> weights(logits.size());
  for (std::size_t block = 0; block < logits.size(); block += 64) {
    const std::size_t end = std::min(logits.size(), block + 64);
    const float factor = state.rescale_to(*std::max_element(logits.begin() + std::ptrdiff_t(block), logits.begin() + std::ptrdiff_t(end)));
    for (std::size_t i = 0; i < block; ++i) weights[i] *= factor;
    for (std::size_t i = block; i < end; ++i) weights[i] = state.weight(logits[i]);
  }
  for (std::size_t i = 0; i < logits.size(); ++i)
    REQUIRE(weights[i] / state.sum == Approx(probabilities[i]).margin(1e-7).epsilon(1e-5));
  double direct = 0;
  for (float x : logits) direct += std::exp(double(x) - 500.0);
  CHECK(state.log_sum_exp() == Approx(500.0 + std::log(direct)).epsilon(1e-6));

  // Merging two partial results weights each by its share of exp(lse).
  const std::vector<float> a = {1.f, 2.f}, b = {3.f, -4.f};
  std::vector<float> merged(2);
  const float lse = kvheads::detail::merge_partial(a.data(), 1000.f, b.data(), 1000.f + std::log(3.f), merged.data(), 2);
  CHECK(merged[0] == Approx(0.25 * 1 + 0.75 * 3));
  CHECK(merged[1] == Approx(0.25 * 2 + 0.75 * -4));
  CHECK(lse == Approx(1000.0 + std::log(4.0)));
  // A side that saw no key contributes nothing.
  const float only_b = kvheads::detail::merge_partial(a.data(), -INFINITY, b.data(), 2.f, merged.data(), 2);
  CHECK(merged[0] == 3.f);
  CHECK(only_b == 2.f);
  CHECK(kvheads::detail::merge_partial(a.data(), -INFINITY, b.data(), -INFINITY, merged.data(), 2) == -INFINITY);
  CHECK(merged[0] == 0.f);

  // Merged as (max, sum), parts keep their weights where an fp32 lse cannot: at max 2^27
  // (ulp 16) log(10) and log(20) both round away, so their lse would merge 1:1, not 1:2.
  using kvheads::detail::SoftmaxMass;
  const SoftmaxMass mass = kvheads::detail::merge_partial(a.data(), SoftmaxMass{0x1p27f, 10.f}, b.data(),
                                                          SoftmaxMass{0x1p27f, 20.f}, merged.data(), 2);
  CHECK(merged[0] == Approx((1.0 * 1 + 2.0 * 3) / 3));
  CHECK(merged[1] == Approx((1.0 * 2 + 2.0 * -4) / 3));
  CHECK(mass.max == 0x1p27f);
  CHECK(mass.sum == 30.f);
  // A part that saw no key takes no part in the max, whatever its max holds.
  const SoftmaxMass one_side = kvheads::detail::merge_partial(a.data(), SoftmaxMass{1e30f, 0.f}, b.data(),
                                                              SoftmaxMass{3.f, 2.f}, merged.data(), 2);
  CHECK(merged[0] == 3.f);
  CHECK(one_side.max == 3.f);
  CHECK(one_side.sum == 2.f);
  CHECK(one_side.log_sum_exp() == Approx(3.0 + std::log(2.0)));
  CHECK(SoftmaxMass{}.log_sum_exp() == -INFINITY);
  CHECK(std::isnan(SoftmaxMass{1.f, NAN}.log_sum_exp()));
}

TEST_CASE("ALiBi slopes follow the paper for any number of heads", "[properties][alibi]") {
  const std::vector<double> eight = kvheads::detail::alibi_slopes(8);
  for (int i = 0; i < 8; ++i) CHECK(eight[std::size_t(i)] == Approx(std::pow(0.5, i + 1)));  // 1/2 .. 1/256
  // 12 heads: the 8 slopes of 8 heads, then 4 odd-indexed slopes of 16 heads.
  const std::vector<double> twelve = kvheads::detail::alibi_slopes(12);
  REQUIRE(twelve.size() == 12);
  for (int i = 0; i < 8; ++i) CHECK(twelve[std::size_t(i)] == eight[std::size_t(i)]);
  for (int i = 0; i < 4; ++i) CHECK(twelve[std::size_t(8 + i)] == Approx(std::exp2(-8.0 * (2 * i + 1) / 16)));
  CHECK(kvheads::detail::alibi_slopes(1)[0] == Approx(std::exp2(-8.0)));
}

TEST_CASE("visible key ranges follow bottom-right causal and window semantics", "[properties][mask]") {
  using kvheads::detail::visible_keys;
  CHECK(visible_keys(5, 10, false, 0).first == 0);
  CHECK(visible_keys(5, 10, false, 0).last == 9);
  CHECK(visible_keys(5, 10, true, 0).last == 5);
  const auto window = visible_keys(5, 10, false, 3);
  CHECK(window.first == 3);  // 5 - 3 < j <= 5: three keys, itself included
  CHECK(window.last == 5);
  const auto none = visible_keys(-1, 10, true, 0);
  CHECK(none.first > none.last);
}
