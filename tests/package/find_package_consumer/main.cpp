// Smoke test for an installed kvheads: the headers are found, the usage
// requirements (C++17, Eigen, threads) propagate, and layout validation works.
// TODO: include <kvheads/kvheads.hpp> once the umbrella header exists.
#include <kvheads/head_layout.hpp>

#include <cstdio>
#include <stdexcept>

int main() {
  const kvheads::HeadLayout gqa = kvheads::make_layout(32, 8, 128);
  if (gqa.group_size() != 4 || gqa.kv_head_of(31) != 7) {
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
  std::printf("find_package consumer: ok\n");
  return 0;
}
