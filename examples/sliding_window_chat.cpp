// sliding_window_chat: the cache features a serving engine uses, on a toy "chat" of
// several conversations decoded together.
//  - each conversation keeps a sliding-window ring cache (window 256): memory stays flat
//    however long the chat runs, and attention keeps absolute positions;
//  - caches store bf16 or int8 to halve or quarter the KV bytes;
//  - attention sinks (one learned logit per head, as in gpt-oss) absorb probability mass;
//  - all conversations are attended in one batched call that splits work across threads;
//  - a speculative draft of 4 tokens is appended, verified in one call of 4 queries, and
//    the 3 rejected tokens are dropped before decoding goes on.
// Every 100th step, the last one and the draft are checked against the reference on the
// tokens the cache holds.
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

// Attention of the cache's newest q_len positions over what it holds, recomputed by the
// reference (window and sinks included).
template <class T>
double check(const kvheads::KvCache<T>& cache, const float* q, int q_len, const float* out,
             const kvheads::AttentionOptions& options) {
  const kvheads::HeadLayout& layout = cache.layout();
  std::vector<float> k(std::size_t(cache.size()) * std::size_t(layout.kv_width())), v(k.size());
  for (int t = 0; t < cache.size(); ++t)
    for (int h = 0; h < layout.kv_heads; ++h) {
      const std::size_t offset = (std::size_t(t) * std::size_t(layout.kv_heads) + std::size_t(h)) * std::size_t(layout.head_dim);
      cache.read_token(cache.first_position() + t, h, k.data() + offset, v.data() + offset);
    }
  // The ring holds positions [first_position, position); the queries are the newest ones.
  std::vector<float> expected(std::size_t(q_len) * std::size_t(layout.q_width()));
  kvheads::AttentionOptions windowed = options;
  windowed.window = cache.window();
  kvheads::reference_attend(q, k.data(), v.data(), expected.data(), q_len, cache.size(), layout, windowed);
  double worst = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) worst = std::fmax(worst, std::fabs(double(out[i]) - expected[i]));
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 600;
  if (steps <= 0) {
    std::fprintf(stderr, "usage: %s [steps > 0]\n", argv[0]);
    return 2;
  }
  const kvheads::HeadLayout layout{16, 2, 64};  // GQA: 16 query heads share 2 KV heads
  const int window = 256, conversations = 3, draft_tokens = 4;
  std::mt19937 rng(7);

  // Room for draft_tokens queries per call: verifying a draft attends all of its tokens at
  // once, and after the rejected ones are dropped the ring must still hold every key of the
  // next query's window. A ring made for one query per call would refuse both.
  std::vector<kvheads::KvCache<kvheads::bf16>> caches;
  for (int c = 0; c < conversations; ++c)
    caches.push_back(kvheads::KvCache<kvheads::bf16>::ring(layout, window, draft_tokens));
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
        worst = std::fmax(worst, check(caches[std::size_t(c)], queries[std::size_t(c)].data(), 1,
                                       outputs[std::size_t(c)].data(), options));
  }
  std::printf("%d steps x %d conversations: each ring holds %d of %lld tokens in %zu bytes (bf16)\n", steps,
              conversations, caches[0].size(), static_cast<long long>(caches[0].position()), caches[0].bytes());

  // int8 storage: a quarter of fp32 (plus a scale per token and head), checked the same way.
  std::vector<float> out(std::size_t(layout.q_width()));
  kvheads::attend(queries[0].data(), 1, quantised, out.data(), options);
  std::printf("int8 ring: %zu bytes, max |kernel - reference| %.2e\n", quantised.bytes(),
              check(quantised, queries[0].data(), 1, out.data(), options));

  // Speculative decoding: append a draft's K/V, verify its tokens in one call of
  // draft_tokens queries, keep the first and drop the rejected rest, then decode on.
  kvheads::KvCache<kvheads::bf16>& chat = caches[0];
  const std::size_t draft_kv = std::size_t(draft_tokens) * std::size_t(layout.kv_width());
  const std::vector<float> draft_k = random_rows(rng, draft_kv), draft_v = random_rows(rng, draft_kv);
  const std::vector<float> draft_q = random_rows(rng, std::size_t(draft_tokens) * std::size_t(layout.q_width()));
  std::vector<float> draft_out(draft_q.size());
  const std::int64_t before = chat.position();
  chat.append(draft_k.data(), draft_v.data(), draft_tokens);
  kvheads::attend(draft_q.data(), draft_tokens, chat, draft_out.data(), options);
  worst = std::fmax(worst, check(chat, draft_q.data(), draft_tokens, draft_out.data(), options));
  chat.drop_last(draft_tokens - 1);
  const std::vector<float> next_k = random_rows(rng, std::size_t(layout.kv_width()));
  const std::vector<float> next_v = random_rows(rng, std::size_t(layout.kv_width()));
  chat.append(next_k.data(), next_v.data(), 1);
  kvheads::attend(queries[0].data(), 1, chat, out.data(), options);
  worst = std::fmax(worst, check(chat, queries[0].data(), 1, out.data(), options));
  std::printf("speculative draft: position %lld -> %lld after keeping 1 of %d tokens and decoding 1 more\n",
              static_cast<long long>(before), static_cast<long long>(chat.position()), draft_tokens);

  std::printf("max |kernel - reference| over the chat: %.2e (%s)\n", worst, worst < 1e-4 ? "ok" : "MISMATCH");
  return worst < 1e-4 ? 0 : 1;
}
