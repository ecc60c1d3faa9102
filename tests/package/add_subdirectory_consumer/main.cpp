// Smoke test for kvheads used through add_subdirectory: the umbrella header, layout
// validation, and one MQA attend() call whose answer is known without arithmetic.
#include <kvheads/kvheads.hpp>

#include <cstdio>
#include <stdexcept>
#include <vector>

int main() {
  const kvheads::HeadLayout mqa = kvheads::make_layout(4, 1, 16);
  if (!mqa.is_mqa() || mqa.group_size() != 4 || mqa.kv_width() != 16) {
    std::fprintf(stderr, "unexpected derived sizes\n");
    return 1;
  }
  try {
    kvheads::make_layout(8, 8, 0);
    std::fprintf(stderr, "head_dim 0 was accepted\n");
    return 1;
  } catch (const std::invalid_argument& e) {
    std::printf("rejected as expected: %s\n", e.what());
  }

  // Two keys with equal logits (all-zero queries), so every head gets the mean of
  // the two value rows of the single KV head: (d + 3d) / 2 = 2d, exact in fp32.
  std::vector<float> q(mqa.q_width(), 0.f), k(2 * mqa.kv_width(), 1.f), v(2 * mqa.kv_width());
  for (int d = 0; d < mqa.head_dim; ++d) {
    v[d] = float(d);
    v[mqa.head_dim + d] = float(3 * d);
  }
  std::vector<float> out(mqa.q_width(), -1.f);
  kvheads::attend(q.data(), k.data(), v.data(), out.data(), 1, 2, mqa);
  for (int h = 0; h < mqa.q_heads; ++h)
    for (int d = 0; d < mqa.head_dim; ++d)
      if (out[h * mqa.head_dim + d] != float(2 * d)) {
        std::fprintf(stderr, "attend: head %d dim %d is %g, expected %d\n", h, d,
                     double(out[h * mqa.head_dim + d]), 2 * d);
        return 1;
      }

  std::printf("add_subdirectory consumer: ok\n");
  return 0;
}
