// sliding_window_chat: the cache features a serving engine uses, on a toy "chat" of
// several conversations decoded together.
//  - each conversation keeps a sliding-window ring cache (window 256): memory stays flat
//    however long the chat runs, and attention keeps absolute positions;
//  - caches store bf16 or int8 to halve or quarter the KV bytes;
//  - attention sinks (one learned logit per head, as in gpt-oss) absorb probability mass;
//  - all conversations are attended in one batched call that splits work across threads;
//  - a speculative draft of 4 tokens is appended, 3 are rejected and dropped.
// Each step is checked against the reference on the tokens the cache holds.
//
// Run: cmake --build build --target sliding_window_chat && ./build/examples/sliding_window_chat [steps]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <kvheads/kvheads.hpp>

namespace {

std::vector<float> random_rows(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

// Attention over what a cache holds, recomputed by the reference (window and sinks included).
template <class T>
double check(const kvheads::KvCache<T>& cache, const float* q, const float* out, const kvheads::AttentionOptions& options) {
  const kvheads::HeadLayout& layout = cache.layout();
  std::vector<float> k(std::size_t(cache.size()) * std::size_t(layout.kv_width())), v(k.size());
  for (int t = 0; t < cache.size(); ++t)
    for (int h = 0; h < layout.kv_heads; ++h) {
      const std::size_t offset = (std::size_t(t) * std::size_t(layout.kv_heads) + std::size_t(h)) * std::size_t(layout.head_dim);
      cache.read_token(cache.first_position() + t, h, k.data() + offset, v.data() + offset);
    }
  // The ring holds positions [first_position, position); the query is the newest one.
  std::vector<float> expected(std::size_t(layout.q_width()));
  kvheads::AttentionOptions windowed = options;
  windowed.window = cache.window();
  kvheads::reference_attend(q, k.data(), v.data(), expected.data(), 1, cache.size(), layout, windowed);
  double worst = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) worst = std::fmax(worst, std::fabs(double(out[i]) - expected[i]));
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 600;
  const kvheads::HeadLayout layout{16, 2, 64};  // GQA: 16 query heads share 2 KV heads
  const int window = 256, conversations = 3;
  std::mt19937 rng(7);

  std::vector<kvheads::KvCache<kvheads::bf16>> caches;
  for (int c = 0; c < conversations; ++c) caches.push_back(kvheads::KvCache<kvheads::bf16>::ring(layout, window));
  auto quantised = kvheads::KvCache<std::int8_t>::ring(layout, window);

  std::vector<float> sinks = random_rows(rng, std::size_t(layout.q_heads));
  kvheads::AttentionOptions options;
  options.sinks = sinks.data();
  options.alibi = true;  // positions stay absolute in a ring, so ALiBi distances are right

  std::vector<std::vector<float>> queries(conversations), outputs(conversations);
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<kvheads::AttendItem<kvheads::bf16>> batch;
    for (int c = 0; c < conversations; ++c) {
      const std::vector<float> k = random_rows(rng, std::size_t(layout.kv_width()));
      const std::vector<float> v = random_rows(rng, std::size_t(layout.kv_width()));
      caches[std::size_t(c)].append(k.data(), v.data(), 1);
      if (c == 0) quantised.append(k.data(), v.data(), 1);
      queries[std::size_t(c)] = random_rows(rng, std::size_t(layout.q_width()));
      outputs[std::size_t(c)].assign(std::size_t(layout.q_width()), 0.f);
      batch.push_back({queries[std::size_t(c)].data(), 1, &caches[std::size_t(c)], outputs[std::size_t(c)].data()});
    }
    kvheads::attend(batch, options);  // one call for every conversation
    if (step % 100 == 0 || step == steps - 1)
      for (int c = 0; c < conversations; ++c)
        worst = std::fmax(worst, check(caches[std::size_t(c)], queries[std::size_t(c)].data(),
                                       outputs[std::size_t(c)].data(), options));
  }
  std::printf("%d steps x %d conversations: each ring holds %d of %lld tokens in %zu bytes (bf16)\n", steps,
              conversations, caches[0].size(), static_cast<long long>(caches[0].position()), caches[0].bytes());

  // int8 storage: a quarter of fp32 (plus a scale per token and head), checked the same way.
  std::vector<float> out(std::size_t(layout.q_width()));
  kvheads::attend(queries[0].data(), 1, quantised, out.data(), options);
  std::printf("int8 ring: %zu bytes, max |kernel - reference| %.2e\n", quantised.bytes(),
              check(quantised, queries[0].data(), out.data(), options));

  // Speculative decoding: append a draft of 4 tokens, keep 1, drop the rejected 3.
  const std::vector<float> draft = random_rows(rng, std::size_t(4 * layout.kv_width()));
  const std::int64_t before = caches[0].position();
  caches[0].append(draft.data(), draft.data(), 4);
  caches[0].drop_last(3);
  std::printf("speculative draft: position %lld -> %lld after keeping 1 of 4 tokens\n", static_cast<long long>(before),
              static_cast<long long>(caches[0].position()));

  std::printf("max |kernel - reference| over the chat: %.2e (%s)\n", worst, worst < 1e-4 ? "ok" : "MISMATCH");
  return worst < 1e-4 ? 0 : 1;
}
