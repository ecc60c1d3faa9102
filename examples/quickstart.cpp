// quickstart: the first program to read. One grouped-query attention layer (32 query
// heads sharing 8 KV heads, Llama-style), a prefill of a prompt, then a few decode steps;
// the prefill's output and the last step's are checked against the layer recomputed with
// the library's double-precision reference attention.
//
// Run: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVHEADS_NATIVE=ON &&
//      cmake --build build -j2 --target quickstart && ./build/examples/quickstart
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <kvheads/kvheads.hpp>

int main() {
  // 1. Choose a head configuration. GQA<q_heads, kv_heads, head_dim>; MHA and MQA are
  //    the same class with kv_heads = q_heads or 1.
  constexpr int d_model = 1024;
  kvheads::GQA<32, 8, 32> layer(d_model);

  // 2. Give it weights (here random; see convert.hpp for real checkpoints).
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(float(d_model)));
  for (kvheads::RowMatrix* w : {&layer.wq(), &layer.wk(), &layer.wv(), &layer.wo()})
    for (Eigen::Index i = 0; i < w->size(); ++i) w->data()[i] = normal(rng);

  // 3. One KV cache per layer and sequence; it holds only kv_heads heads.
  const int prompt = 512, steps = 16;
  auto cache = layer.make_cache(prompt + steps);
  std::printf("layout: %d query heads, %d KV heads (group size %d), head_dim %d\n", layer.layout().q_heads,
              layer.layout().kv_heads, layer.layout().group_size(), layer.layout().head_dim);
  std::printf("KV cache: %zu bytes per token (MHA would need %zu)\n", cache.bytes_per_token(),
              cache.bytes_per_token() * std::size_t(layer.layout().group_size()));

  kvheads::AttentionOptions options;
  options.causal = true;

  // 4. Prefill the prompt in one call.
  std::normal_distribution<float> unit(0.f, 1.f);
  std::vector<float> x(std::size_t(prompt) * d_model), out(x.size());
  for (float& value : x) value = unit(rng);
  auto start = std::chrono::steady_clock::now();
  layer.forward(x.data(), prompt, cache, out.data(), options);
  const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("prefill: %d tokens in %.2f ms (%.0f tokens/s)\n", prompt, prefill_s * 1e3, prompt / prefill_s);

  // 5. Decode one token at a time; each step attends to everything cached so far.
  std::vector<float> token(d_model), token_out(d_model);
  start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    for (float& value : token) value = unit(rng);
    layer.forward(token.data(), 1, cache, token_out.data(), options);
  }
  const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("decode: %d steps, %.3f ms per token, cache now holds %d tokens\n", steps, decode_s * 1e3 / steps,
              cache.size());

  // 6. Check the layer against the double-precision reference attention: recompute the
  //    outputs of tokens [first, first + n) of the sequence from their inputs and the K/V
  //    the cache holds for positions [0, first + n), and compare.
  const kvheads::HeadLayout layout = layer.layout();
  const auto worst_error = [&](const float* inputs, const float* outputs, int first, int n) {
    const int keys = first + n;
    std::vector<float> k(std::size_t(keys) * std::size_t(layout.kv_width())), v(k.size());
    for (int t = 0; t < keys; ++t)
      for (int h = 0; h < layout.kv_heads; ++h) {
        const std::size_t row = (std::size_t(t) * std::size_t(layout.kv_heads) + std::size_t(h)) * std::size_t(layout.head_dim);
        cache.read_token(t, h, k.data() + row, v.data() + row);
      }
    const Eigen::Map<const kvheads::RowMatrix> x_in(inputs, n, d_model);
    const kvheads::RowMatrix q = x_in * layer.wq();
    kvheads::RowMatrix attended(n, layout.q_width());
    kvheads::reference_attend(q.data(), k.data(), v.data(), attended.data(), n, keys, layout, options);
    const kvheads::RowMatrix expected = attended * layer.wo();
    const Eigen::Map<const kvheads::RowMatrix> got(outputs, n, d_model);
    return double((got - expected).cwiseAbs().maxCoeff());
  };
  const double worst = std::max(worst_error(x.data(), out.data(), 0, prompt),
                                worst_error(token.data(), token_out.data(), prompt + steps - 1, 1));
  std::printf("max |layer - reference| over the prefill and the last decode step = %.2e (%s)\n", worst,
              worst < 1e-4 ? "ok" : "MISMATCH");
  return worst < 1e-4 ? 0 : 1;
}
