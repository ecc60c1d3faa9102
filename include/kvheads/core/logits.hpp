#pragma once
// The logit transforms shared by the reference and the fused kernel: ALiBi slopes and
// the visible key range of a query row under causal and sliding-window masks.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace kvheads::detail {

/// ALiBi slopes for `heads` heads (Press et al., "Train Short, Test Long"): for a power
/// of two n, slope_i = 2^(-8 i / n), i = 1..n; otherwise the slopes of the largest power
/// of two m < n, followed by every other slope of 2m for the remaining n - m heads.
/// The ALiBi slope of head `head` (0-based) among `heads`, by the rule below.
inline double alibi_slope(int head, int heads) {
  int power = 1;
  while (power <= heads / 2) power *= 2;  // not power * 2 <= heads: that overflows past 2^30
  if (head < power) return std::exp2(-8.0 * (head + 1) / power);
  return std::exp2(-8.0 * (2 * (head - power) + 1) / (2 * power));
}

inline std::vector<double> alibi_slopes(int heads) {
  std::vector<double> slopes;
  slopes.reserve(std::size_t(heads));
  int power = 1;
  while (power <= heads / 2) power *= 2;  // not power * 2 <= heads: that overflows past 2^30
  for (int i = 1; i <= power; ++i) slopes.push_back(std::exp2(-8.0 * i / power));
  for (int i = 1; int(slopes.size()) < heads; i += 2) slopes.push_back(std::exp2(-8.0 * i / (2 * power)));
  return slopes;
}

/// Keys [first, last] (absolute positions, inclusive) a query at `position` may see
/// among kv_len keys; empty when first > last.
struct KeyRange {
  std::ptrdiff_t first;
  std::ptrdiff_t last;
};

inline KeyRange visible_keys(std::ptrdiff_t position, std::ptrdiff_t kv_len, bool causal, std::ptrdiff_t window) {
  std::ptrdiff_t last = kv_len - 1;
  if (causal || window > 0) last = std::min(last, position);  // a window looks back only
  std::ptrdiff_t first = 0;
  if (window > 0) first = std::max<std::ptrdiff_t>(0, position - window + 1);
  return {first, last};
}

}  // namespace kvheads::detail
