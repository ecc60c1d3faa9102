// Attention<float, QHeads, KvHeads, HeadDim> with every size fixed at compile time runs a
// kernel instantiated for exactly its shape (detail::dispatch_fused_static), which the
// other test binaries never compile: they link the kernels compiled once
// (KVHEADS_EXTERN_KERNELS), where fixed sizes go through the run-time dispatch. This
// binary is header-only, as a project that includes <kvheads/kvheads.hpp> and nothing
// else is, and holds each fixed-size layer to the double-precision reference.
#include <catch2/catch.hpp>

#include <vector>

#include "../layer_reference.hpp"
#include "../test_support.hpp"

using kvheads::AttentionOptions;
using namespace kvheads_test;

#if defined(KVHEADS_EXTERN_KERNELS)
#error "tests/static_shapes must compile its own kernels: build it without KVHEADS_EXTERN_KERNELS"
#endif

namespace {

// Prefill of `tokens` (causal), then three decode steps, against the reference over the
// whole sequence: both row layouts of the fixed-shape kernel, plain options and combined.
template <class Layer>
void check_layer(Layer& layer, int tokens) {
  randomise(layer, std::uint32_t(layer.layout().q_heads * 7 + layer.layout().head_dim));
  const int total = tokens + 3;
  const std::vector<float> x = random_vector(std::size_t(total) * std::size_t(layer.d_model()), 11);
  for (AttentionOptions options : {AttentionOptions{}, option_sets().back()}) {
    options.causal = true;
    for (int threads : {1, 2}) {
      options.threads = threads;
      INFO(describe(layer.layout(), tokens, tokens, options) << " threads " << threads);
      auto cache = layer.make_cache(total);
      std::vector<float> out(x.size());
      layer.forward(x.data(), tokens, cache, out.data(), options);
      for (int t = tokens; t < total; ++t)
        layer.forward(x.data() + std::ptrdiff_t(t) * layer.d_model(), 1, cache,
                      out.data() + std::ptrdiff_t(t) * layer.d_model(), options);
      CHECK(relative_error(out, reference_layer(layer, x, total, options)) <= 1e-5);
    }
  }
}

}  // namespace

TEST_CASE("fixed-size layers run their own kernels and match the reference", "[attention][static]") {
  // A dispatched shape (head_dim 64, group 4), shapes outside the dispatched set with head
  // dims below and between vector widths (3: group 3; 17: MQA, group 5), and an MHA one.
  kvheads::GQA<8, 2, 64> gqa(32);
  check_layer(gqa, 40);
  kvheads::Attention<float, 6, 2, 3> tiny(12);
  check_layer(tiny, 19);
  kvheads::Attention<float, 5, 1, 17> mqa(20);
  check_layer(mqa, 70);
  kvheads::MHA<3, 20> mha(24);
  check_layer(mha, 33);
}
