// reference_attend() loses a NaN logit when every key after it has logit -inf.
//
// q = (+inf, +inf): key 0 = (1, -1) gives inf - inf = NaN, key 1 = (-1, -1) gives -inf.
// The max loop `if (!(s <= max)) max = s` takes the NaN, then key 1 replaces it with -inf;
// max == -inf then reads as "no key has weight", so the reference outputs zeros and lse
// -inf. Every fp32 kernel outputs NaN (as the contract says for a NaN logit), and so does
// the reference once the keys come in the other order.
//
//   g++ -std=c++17 -O1 -march=native -I/tmp/fzinf/include reference_nan_logit_then_minus_inf.cpp -o repro && ./repro
#include <cmath>
#include <cstdio>
#include <limits>

#include "kvheads/attend.hpp"
#include "kvheads/core/reference.hpp"

int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const kvheads::HeadLayout layout{1, 1, 2};
  const float q[2] = {inf, inf};
  float k[4] = {1.f, -1.f, -1.f, -1.f};  // key 0: logit NaN, key 1: logit -inf
  const float v[4] = {1.f, 2.f, 3.f, 4.f};
  int failures = 0;
  for (int order = 0; order < 2; ++order) {
    if (order == 1) {  // the same keys the other way round
      const float swapped[4] = {-1.f, -1.f, 1.f, -1.f};
      for (int i = 0; i < 4; ++i) k[i] = swapped[i];
    }
    float want[2], want_lse, got[2], got_lse;
    kvheads::reference_attend(q, k, v, want, 1, 2, layout, {}, &want_lse);
    kvheads::attend(q, k, v, got, 1, 2, layout, {}, &got_lse);
    std::printf("%s: reference out (%g, %g) lse %g | attend out (%g, %g) lse %g\n",
                order == 0 ? "NaN key first" : "NaN key last ", want[0], want[1], want_lse, got[0], got[1], got_lse);
    failures += !std::isnan(want[0]) || !std::isnan(want_lse);
  }
  std::printf(failures ? "BUG: the reference drops the NaN logit\n" : "ok: NaN in both orders\n");
  return failures ? 1 : 0;
}
