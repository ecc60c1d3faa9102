// Smoke test for an installed kvheads: the umbrella header is found, the usage
// requirements (C++17, Eigen, threads) propagate, layout validation rejects a bad
// GQA grouping, and one attend() call gives the answer known without arithmetic.
#include <kvheads/kvheads.hpp>

#include <cstdio>
#include <stdexcept>
#include <vector>

int main() {
  const kvheads::HeadLayout gqa = kvheads::make_layout(4, 2, 8);
  if (gqa.group_size() != 2 || gqa.kv_head_of(3) != 1) {
    std::fprintf(stderr, "unexpected derived sizes\n");
    return 1;
  }
  try {
    kvheads::make_layout(12, 5, 64);
    std::fprintf(stderr, "12 query heads over 5 KV heads was accepted\n");
    return 1;
  } catch (const std::invalid_argument& e) {
    std::printf("rejected as expected: %s\n", e.what());
  }

  // One query, one key: softmax over a single key is 1, so query head h must return
  // exactly the value row of KV head h / group_size.
  std::vector<float> q(gqa.q_width(), 0.5f), k(gqa.kv_width(), 0.25f), v(gqa.kv_width());
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  std::vector<float> out(gqa.q_width(), -1.f);
  kvheads::AttentionOptions options;
  options.threads = 2;
  kvheads::attend(q.data(), k.data(), v.data(), out.data(), 1, 1, gqa, options);
  for (int h = 0; h < gqa.q_heads; ++h)
    for (int d = 0; d < gqa.head_dim; ++d)
      if (out[h * gqa.head_dim + d] != v[gqa.kv_head_of(h) * gqa.head_dim + d]) {
        std::fprintf(stderr, "attend: head %d dim %d is wrong\n", h, d);
        return 1;
      }

  std::printf("find_package consumer: ok\n");
  return 0;
}
