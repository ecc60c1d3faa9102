// decode_loop: token-by-token generation through a small stack of attention layers, one
// KvCache per layer, for three head configurations side by side: MHA (16 KV heads), GQA
// with 2 KV heads (groups of 8 query heads) and MQA (1 KV head). The stack is a toy
// transformer without MLPs or a vocabulary: each layer adds its attention output to the
// residual stream, and each new token's input is the normalised last hidden state. It
// prints decode tokens/s and the KV-cache bytes of each configuration.
//
// Run: ./build/examples/decode_loop [layers=4] [d_model=512] [tokens=256] [prompt=64]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct Sizes {
  int layers = 4;
  int d_model = 512;
  int tokens = 256;  // generated one at a time
  int prompt = 64;   // prefilled in one call per layer
};

struct Result {
  double decode_tokens_per_s = 0;
  double prefill_ms = 0;
  std::size_t cache_bytes = 0;     // every layer's cache, as allocated
  std::size_t bytes_per_token = 0; // all layers
};

// x [n][d] /= rms(x) per row: keeps the toy stack's activations at unit scale.
void rms_normalise(float* x, int n, int d) {
  for (int t = 0; t < n; ++t) {
    float* row = x + std::size_t(t) * std::size_t(d);
    double sum = 0;
    for (int i = 0; i < d; ++i) sum += double(row[i]) * row[i];
    const float inverse = float(1.0 / std::sqrt(sum / d + 1e-6));
    for (int i = 0; i < d; ++i) row[i] *= inverse;
  }
}

// Runs n tokens through every layer: h += attention(rms(h)); each layer appends to its cache.
template <class Layer>
void run_stack(const std::vector<Layer>& stack, std::vector<typename Layer::Cache>& caches, std::vector<float>& h,
               int n, const kvheads::AttentionOptions& options) {
  const int d = stack.front().d_model();
  std::vector<float> normed(h.size()), out(h.size());
  for (std::size_t l = 0; l < stack.size(); ++l) {
    normed = h;
    rms_normalise(normed.data(), n, d);
    stack[l].forward(normed.data(), n, caches[l], out.data(), options);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += out[i];
  }
}

template <class Layer>
Result generate(const Sizes& sizes) {
  // One layer type per configuration: kvheads::MHA/GQA/MQA<...> are all Attention<float, ...>.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<Layer> stack;
  std::vector<typename Layer::Cache> caches;
  for (int l = 0; l < sizes.layers; ++l) {
    stack.emplace_back(sizes.d_model);
    Layer& layer = stack.back();
    for (kvheads::RowMatrix* w : {&layer.wq(), &layer.wk(), &layer.wv(), &layer.wo()}) {
      const float scale = 1.f / std::sqrt(float(w->rows()));
      for (Eigen::Index i = 0; i < w->size(); ++i) w->data()[i] = scale * normal(rng);
    }
    caches.push_back(layer.make_cache(sizes.prompt + sizes.tokens));  // one cache per layer
  }
  kvheads::AttentionOptions options;
  options.causal = true;

  Result result;
  std::vector<float> h(std::size_t(sizes.prompt) * std::size_t(sizes.d_model));
  for (float& value : h) value = normal(rng);
  Clock::time_point start = Clock::now();
  run_stack(stack, caches, h, sizes.prompt, options);
  result.prefill_ms = 1e3 * std::chrono::duration<double>(Clock::now() - start).count();

  // Generation: the next input is the last hidden state, normalised.
  std::vector<float> token(h.end() - sizes.d_model, h.end());
  start = Clock::now();
  for (int step = 0; step < sizes.tokens; ++step) {
    rms_normalise(token.data(), 1, sizes.d_model);
    run_stack(stack, caches, token, 1, options);
  }
  result.decode_tokens_per_s = sizes.tokens / std::chrono::duration<double>(Clock::now() - start).count();
  for (const auto& cache : caches) {
    result.cache_bytes += cache.bytes();
    result.bytes_per_token += cache.bytes_per_token();
  }
  return result;
}

int parse_arg(int argc, char** argv, int index, int fallback) {
  if (argc <= index) return fallback;
  const int value = std::atoi(argv[index]);
  if (value <= 0) throw std::invalid_argument(std::string("argument ") + argv[index] + " must be a positive integer");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Sizes sizes;
    sizes.layers = parse_arg(argc, argv, 1, sizes.layers);
    sizes.d_model = parse_arg(argc, argv, 2, sizes.d_model);
    sizes.tokens = parse_arg(argc, argv, 3, sizes.tokens);
    sizes.prompt = parse_arg(argc, argv, 4, sizes.prompt);

    // 16 query heads of width 32; only the number of KV heads differs.
    const Result mha = generate<kvheads::MHA<16, 32>>(sizes);
    const Result gqa = generate<kvheads::GQA<16, 2, 32>>(sizes);
    const Result mqa = generate<kvheads::MQA<16, 32>>(sizes);

    std::printf("%d layers, d_model %d, 16 query heads x 32; prompt %d tokens, then %d generated one by one\n",
                sizes.layers, sizes.d_model, sizes.prompt, sizes.tokens);
    std::printf("%-30s %12s %8s %11s %14s %9s\n", "configuration", "decode tok/s", "speedup", "prefill ms",
                "KV B/token", "KV cache");
    const auto row = [&](const char* name, const Result& r) {
      std::printf("%-30s %12.0f %7.2fx %11.2f %14zu %6.2f MiB\n", name, r.decode_tokens_per_s,
                  r.decode_tokens_per_s / mha.decode_tokens_per_s, r.prefill_ms, r.bytes_per_token,
                  double(r.cache_bytes) / (1 << 20));
    };
    row("MHA (16 KV heads)", mha);
    row("GQA (2 KV heads, groups of 8)", gqa);
    row("MQA (1 KV head)", mqa);
    std::printf("KV B/token covers every layer (K and V, fp32); KV cache is the capacity allocated for\n"
                "prompt + generated tokens. Small shapes and one short run: speeds are indicative only.\n");
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "decode_loop: %s\nusage: decode_loop [layers] [d_model] [tokens] [prompt]\n", error.what());
    return 1;
  }
}
