#pragma once
// Numerically stable softmax, the online softmax state the fused kernel keeps per
// query row, and the log-sum-exp merge of two partial attentions over disjoint keys.
#include <cmath>
#include <cstddef>
#include <limits>

namespace kvheads::detail {

/// In-place softmax of x[0..n); subtracts the max so no exp overflows. All -inf -> zeros.
inline void softmax(float* x, std::ptrdiff_t n) {
  float max = -std::numeric_limits<float>::infinity();
  for (std::ptrdiff_t i = 0; i < n; ++i) max = std::fmax(max, x[i]);
  if (max == -std::numeric_limits<float>::infinity()) {
    for (std::ptrdiff_t i = 0; i < n; ++i) x[i] = 0.f;
    return;
  }
  double sum = 0;
  for (std::ptrdiff_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - max));
  const float inv = float(1.0 / sum);
  for (std::ptrdiff_t i = 0; i < n; ++i) x[i] *= inv;
}

/// Running max and running sum of exp(logit - max) over the keys seen so far. Feeding
/// keys block by block gives the same softmax as seeing them all at once: when the max
/// grows, earlier sums (and the caller's accumulated P.V) are rescaled by exp(old - new).
struct OnlineSoftmax {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;

  /// Takes a block's max; returns the factor the caller must scale its accumulators by.
  float rescale_to(float block_max) {
    const float new_max = std::fmax(max, block_max);
    if (new_max == -std::numeric_limits<float>::infinity()) return 1.f;  // nothing visible yet
    const float factor = std::exp(max - new_max);  // exp(-inf) = 0 on the first visible block
    sum *= factor;
    max = new_max;
    return factor;
  }
  /// Weight of one logit after rescale_to(); adds it to the running sum.
  float weight(float logit) {
    const float p = max == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(logit - max);
    sum += p;
    return p;
  }
  /// log(sum of exp(logits)): -inf when no key was visible.
  float log_sum_exp() const {
    return sum > 0.f ? max + std::log(sum) : -std::numeric_limits<float>::infinity();
  }
};

/// Combines two normalised partial attentions over disjoint key sets:
/// out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}), exactly, without
/// overflow. A part with lse = -inf (no visible key) contributes nothing. Returns the merged lse.
/// out may alias out_a or out_b.
inline float merge_partial(const float* out_a, float lse_a, const float* out_b, float lse_b, float* out,
                           std::ptrdiff_t head_dim) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  if (lse_a == neg_inf && lse_b == neg_inf) {
    for (std::ptrdiff_t i = 0; i < head_dim; ++i) out[i] = 0.f;
    return neg_inf;
  }
  const float max = std::fmax(lse_a, lse_b);
  const float weight_a = std::exp(lse_a - max);
  const float weight_b = std::exp(lse_b - max);
  const float total = weight_a + weight_b;
  const float scale_a = weight_a / total;
  const float scale_b = weight_b / total;
  for (std::ptrdiff_t i = 0; i < head_dim; ++i) {
    // Skip only a side that saw no key (its output is not a result). A side whose weight
    // merely underflowed to 0 still adds: a NaN in it makes the row NaN, as in the
    // reference, where that weight is tiny but not 0.
    const float a = lse_a != neg_inf ? scale_a * out_a[i] : 0.f;
    const float b = lse_b != neg_inf ? scale_b * out_b[i] : 0.f;
    out[i] = a + b;
  }
  return max + std::log(total);
}

}  // namespace kvheads::detail
