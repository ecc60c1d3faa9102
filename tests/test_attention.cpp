// Attention<...>: a whole layer (projections + kernel + cache) against a plain
// projection-then-reference computation; prefill followed by decode steps equals one
// forward over the whole sequence; compile-time and Dynamic sizes agree.
#include <catch2/catch.hpp>

#include "layer_reference.hpp"
#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::RowMatrix;
using namespace kvheads_test;

TEST_CASE("an Attention layer equals projections plus the reference kernel", "[attention]") {
  const int d_model = 48;
  for (const HeadLayout& layout : {HeadLayout{4, 4, 12}, HeadLayout{4, 2, 12}, HeadLayout{4, 1, 12}}) {
    kvheads::Attention<float> layer(d_model, layout);
    randomise(layer, 3);
    const int tokens = 37;
    const std::vector<float> x = random_vector(std::size_t(tokens * d_model), 9);
    for (const AttentionOptions& options : option_sets()) {
      INFO(describe(layout, tokens, tokens, options));
      auto cache = layer.make_cache(64);
      std::vector<float> out(x.size());
      layer.forward(x.data(), tokens, cache, out.data(), options);
      CHECK(cache.size() == tokens);
      CHECK(relative_error(out, reference_layer(layer, x, tokens, options)) <= 1e-5);
    }
  }
}

TEST_CASE("prefill then single-token decode equals one forward over the whole sequence", "[attention]") {
  const int d_model = 64, tokens = 40, prefill = 23;
  for (const HeadLayout& layout : {HeadLayout{8, 8, 8}, HeadLayout{8, 2, 8}, HeadLayout{8, 1, 8}}) {
    kvheads::Attention<float> layer(d_model, layout);
    randomise(layer, 17);
    const std::vector<float> x = random_vector(std::size_t(tokens * d_model), 5);
    for (AttentionOptions options : option_sets()) {
      options.causal = true;  // decoding is causal by nature; one forward must match it
      INFO(describe(layout, tokens, tokens, options));
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

TEST_CASE("compile-time sizes and Dynamic sizes give the same results", "[attention]") {
  const int d_model = 32;
  kvheads::GQA<8, 2, 64> fixed(d_model);
  kvheads::Attention<float> dynamic(d_model, HeadLayout{8, 2, 64});
  kvheads::Attention<float, 8, kvheads::Dynamic, 64> mixed(d_model, HeadLayout{8, 2, 64});
  randomise(fixed, 1);
  dynamic.set_weights(fixed.wq(), fixed.wk(), fixed.wv(), fixed.wo());
  mixed.set_weights(fixed.wq(), fixed.wk(), fixed.wv(), fixed.wo());
  const std::vector<float> x = random_vector(std::size_t(9 * d_model), 2);
  AttentionOptions options;
  options.causal = true;
  std::vector<float> a(x.size()), b(x.size()), c(x.size());
  auto cache_a = fixed.make_cache(9), cache_b = dynamic.make_cache(9), cache_c = mixed.make_cache(9);
  fixed.forward(x.data(), 9, cache_a, a.data(), options);
  dynamic.forward(x.data(), 9, cache_b, b.data(), options);
  mixed.forward(x.data(), 9, cache_c, c.data(), options);
  // Built with KVHEADS_EXTERN_KERNELS (as every test here is), all three layers run the
  // dispatch switch, so the equalities alone could not fail: each is also held to the
  // reference. The compile-time-shape kernels themselves, which a header-only build runs,
  // are tested in tests/static_shapes.
  CHECK(relative_error(a, reference_layer(fixed, x, 9, options)) <= 1e-5);
  CHECK(a == b);
  CHECK(a == c);
  // A shape outside the dispatched set (head_dim 3, group 3) runs the generic path.
  kvheads::Attention<float, 6, 2, 3> odd(12);
  kvheads::Attention<float> odd_dynamic(12, HeadLayout{6, 2, 3});
  randomise(odd, 4);
  odd_dynamic.set_weights(odd.wq(), odd.wk(), odd.wv(), odd.wo());
  const std::vector<float> y = random_vector(5 * 12, 8);
  std::vector<float> d(y.size()), e(y.size());
  auto cache_d = odd.make_cache(5), cache_e = odd_dynamic.make_cache(5);
  odd.forward(y.data(), 5, cache_d, d.data());
  odd_dynamic.forward(y.data(), 5, cache_e, e.data());
  CHECK(relative_error(d, reference_layer(odd, y, 5, AttentionOptions{})) <= 1e-5);
  CHECK(d == e);
  STATIC_REQUIRE(kvheads::MHA<8, 64>::GroupSize == 1);
  STATIC_REQUIRE(kvheads::MQA<8, 64>::GroupSize == 8);
  STATIC_REQUIRE(kvheads::GQA<32, 8, 128>::GroupSize == 4);
}

TEST_CASE("the Eigen forward overload takes a block of columns of a wider matrix", "[attention]") {
  // An Eigen::Ref binds such a block in place, its rows further apart than d_model.
  const int d_model = 16;
  for (const HeadLayout& layout : {HeadLayout{4, 4, 4}, HeadLayout{4, 2, 4}, HeadLayout{4, 1, 4}})
    for (int tokens : {1, 2, 17}) {
      INFO(describe(layout, tokens, tokens, AttentionOptions{}));
      kvheads::Attention<float> layer(d_model, layout);
      randomise(layer, 8);
      const RowMatrix wide = Eigen::Map<const RowMatrix>(random_vector(std::size_t(tokens) * 3 * d_model, 4).data(),
                                                         tokens, 3 * d_model);
      const RowMatrix x = wide.middleCols(d_model, d_model);
      auto cache_block = layer.make_cache(tokens), cache_copy = layer.make_cache(tokens);
      const RowMatrix via_block = layer.forward(wide.middleCols(d_model, d_model), cache_block);
      const RowMatrix via_copy = layer.forward(x, cache_copy);
      CHECK(via_block == via_copy);
      const std::vector<float> expected =
          reference_layer(layer, std::vector<float>(x.data(), x.data() + x.size()), tokens, AttentionOptions{});
      CHECK(relative_error(std::vector<float>(via_block.data(), via_block.data() + via_block.size()), expected) <= 1e-5);
    }
}

TEST_CASE("the Eigen forward overload maps its input without copies and matches the pointer one", "[attention]") {
  kvheads::Attention<float> layer(16, HeadLayout{4, 2, 4});
  randomise(layer, 6);
  RowMatrix x = Eigen::Map<const RowMatrix>(random_vector(5 * 16, 3).data(), 5, 16);
  auto cache_a = layer.make_cache(5), cache_b = layer.make_cache(5);
  const RowMatrix via_eigen = layer.forward(x, cache_a);
  std::vector<float> via_pointer(5 * 16);
  layer.forward(x.data(), 5, cache_b, via_pointer.data());
  CHECK(std::equal(via_pointer.begin(), via_pointer.end(), via_eigen.data()));
}
