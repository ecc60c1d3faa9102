// compare_layouts: the few lines it takes to time two head configurations on your
// own shapes. decode_ms() builds a layer with random weights for a layout, fills its cache
// with `context` tokens and times single-token decode steps of the whole layer; main()
// compares two layouts with it. For the full sweep (every kv_heads, several contexts,
// prefill, cache sizes and the quality cost of pooling KV heads) run bench/compare_heads.
//
// Run: ./build/examples/compare_layouts [d_model=1024] [q_heads=16] [head_dim=64] [kv_a=16]
//                                       [kv_b=4] [context=2048]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

/// Mean milliseconds of one decode step (Attention::forward of 1 token: projections, cache
/// append, attention over context + 1 tokens, output projection) for a random layer.
double decode_ms(kvheads::HeadLayout layout, int d_model, int context, int steps = 20) {
  kvheads::Attention<float> layer(d_model, layout);  // checks the layout; run-time sizes
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (kvheads::RowMatrix* w : {&layer.wq(), &layer.wk(), &layer.wv(), &layer.wo()})
    for (Eigen::Index i = 0; i < w->size(); ++i) w->data()[i] = 0.05f * uniform(rng);

  // The context: random keys and values appended directly, no prefill needed.
  auto cache = layer.make_cache(context + steps + 1);
  std::vector<float> k(std::size_t(context) * std::size_t(layout.kv_width())), v(k.size());
  for (float& value : k) value = uniform(rng);
  for (float& value : v) value = uniform(rng);
  cache.append(k.data(), v.data(), context);

  std::vector<float> x(static_cast<std::size_t>(d_model)), out(x.size());
  for (float& value : x) value = uniform(rng);
  layer.forward(x.data(), 1, cache, out.data());  // warm-up: thread pool, scratch, pages
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) layer.forward(x.data(), 1, cache, out.data());
  return 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / steps;
}

namespace {

int arg(int argc, char** argv, int index, int fallback) {
  if (argc <= index) return fallback;
  const int value = std::atoi(argv[index]);
  if (value <= 0) throw std::invalid_argument(std::string("argument ") + argv[index] + " must be a positive integer");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int d_model = arg(argc, argv, 1, 1024), q_heads = arg(argc, argv, 2, 16), head_dim = arg(argc, argv, 3, 64);
    const int kv_a = arg(argc, argv, 4, 16), kv_b = arg(argc, argv, 5, 4), context = arg(argc, argv, 6, 2048);

    // The five lines:
    const double a = decode_ms(kvheads::make_layout(q_heads, kv_a, head_dim), d_model, context);
    const double b = decode_ms(kvheads::make_layout(q_heads, kv_b, head_dim), d_model, context);
    std::printf("d_model %d, %d query heads x %d, context %d:\n", d_model, q_heads, head_dim, context);
    std::printf("  kv_heads %2d: %.3f ms/token\n  kv_heads %2d: %.3f ms/token (%.2fx)\n", kv_a, a, kv_b, b, a / b);
    std::printf("  KV cache per token: %d vs %d bytes\n", 2 * kv_a * head_dim * 4, 2 * kv_b * head_dim * 4);
    return 0;
  } catch (const std::exception& error) {  // e.g. q_heads not a multiple of kv_heads
    std::fprintf(stderr, "compare_layouts: %s\n", error.what());
    std::fprintf(stderr, "usage: compare_layouts [d_model] [q_heads] [head_dim] [kv_a] [kv_b] [context]\n");
    return 1;
  }
}
