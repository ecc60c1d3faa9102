// Smoke test for kvheads used through add_subdirectory: same checks as the
// find_package consumer, against the source tree.
// TODO: include <kvheads/kvheads.hpp> once the umbrella header exists.
#include <kvheads/head_layout.hpp>

#include <cstdio>
#include <stdexcept>

int main() {
  const kvheads::HeadLayout mqa = kvheads::make_layout(16, 1, 64);
  if (!mqa.is_mqa() || mqa.group_size() != 16 || mqa.kv_width() != 64) {
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
  std::printf("add_subdirectory consumer: ok\n");
  return 0;
}
