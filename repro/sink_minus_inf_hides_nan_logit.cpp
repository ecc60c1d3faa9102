// attend() with a sink of -inf outputs zeros for a row whose softmax sum is NaN.
//
// q = (+inf, +inf): key 0 = (1, -1) has logit NaN (inf - inf), key 1 = (-1, -1) logit -inf.
// The keys' softmax sum is NaN, and its max -inf (the vector max drops the NaN). add_sink()
// takes max(-inf, sink -inf) = -inf as "no weight anywhere" and writes zeros, while the
// log-sum-exp it returns is NaN: out and lse disagree, and the row should be NaN (as it is
// with any other sink, or none).
//
//   g++ -std=c++17 -O1 -march=native -I/tmp/fzinf/include sink_minus_inf_hides_nan_logit.cpp -o repro && ./repro
#include <cmath>
#include <cstdio>
#include <limits>

#include "kvheads/attend.hpp"

int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const kvheads::HeadLayout layout{1, 1, 2};
  const float q[2] = {inf, inf};
  const float k[4] = {1.f, -1.f, -1.f, -1.f};
  const float v[4] = {1.f, 2.f, 3.f, 4.f};
  int failures = 0;
  for (float sink : {0.f, -inf}) {
    const float sinks[1] = {sink};
    kvheads::AttentionOptions options;
    options.sinks = sinks;
    float out[2], lse;
    kvheads::attend(q, k, v, out, 1, 2, layout, options, &lse);
    std::printf("sink %g: attend out (%g, %g) lse %g\n", sink, out[0], out[1], lse);
    failures += !std::isnan(out[0]) || !std::isnan(lse);
  }
  std::printf(failures ? "BUG: the NaN row comes out zeros next to a sink of -inf\n" : "ok: NaN with either sink\n");
  return failures ? 1 : 0;
}
