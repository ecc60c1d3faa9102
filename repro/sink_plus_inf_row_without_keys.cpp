// attend() outputs NaN for a row that sees no key when its sink logit is +inf.
//
// The README's contract: "A row that sees no key outputs zeros", and reference_attend()
// does so (its lse is NaN: +inf + log(e^(inf - inf))). The kernel's add_sink() computes the
// keys' share as 0 / (0 + e^(inf - inf)) = NaN and multiplies the row by it: 0 * NaN = NaN.
// With a finite sink, or with visible keys (where the reference is NaN too), they agree.
// Here kv_len = 0 (plain memory) and, on a cache, a causal window that excludes every key.
//
//   g++ -std=c++17 -O1 -march=native -I/tmp/fzinf/include sink_plus_inf_row_without_keys.cpp -o repro && ./repro
#include <cmath>
#include <cstdio>
#include <limits>

#include "kvheads/attend.hpp"
#include "kvheads/core/reference.hpp"

int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const kvheads::HeadLayout layout{1, 1, 2};
  const float q[2] = {0.5f, -0.25f};
  const float k[2] = {1.f, 2.f}, v[2] = {3.f, 4.f};
  int failures = 0;
  for (float sink : {0.f, inf}) {
    const float sinks[1] = {sink};
    kvheads::AttentionOptions options;
    options.sinks = sinks;
    float want[2], want_lse, got[2], got_lse;
    kvheads::reference_attend(q, k, v, want, 1, 0, layout, options, &want_lse);  // kv_len 0: no key
    kvheads::attend(q, k, v, got, 1, 0, layout, options, &got_lse);
    std::printf("sink %g, no key: reference out (%g, %g) lse %g | attend out (%g, %g) lse %g\n", sink, want[0], want[1],
                want_lse, got[0], got[1], got_lse);
    failures += std::isnan(got[0]) != std::isnan(want[0]);
  }
  std::printf(failures ? "BUG: a row without keys is NaN next to a +inf sink, not zeros\n" : "ok\n");
  return failures ? 1 : 0;
}
