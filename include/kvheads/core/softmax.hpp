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

/// A partial softmax's normaliser: its max logit and the sum of exp(logit - max) over
/// its keys (sum 0: it saw no key; NaN stays NaN). Key splits are merged through this
/// pair, not through one fp32 log-sum-exp: at |max| ~ 1e8 an fp32 lse has an ulp of 8 and
/// loses log(sum) entirely, so two halves holding 10 and 20 tied top keys would merge 1:1
/// instead of 1:2 (found by fuzz_attend with exact logits of ~1e8).
struct SoftmaxMass {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;

  /// A partial result known only by its log-sum-exp (the public merge()).
  static SoftmaxMass from_lse(float lse) {
    return lse == -std::numeric_limits<float>::infinity() ? SoftmaxMass{} : SoftmaxMass{lse, 1.f};
  }
  /// As two floats (max, sum), in scratch that holds floats.
  static SoftmaxMass load(const float* from) { return {from[0], from[1]}; }
  void store(float* to) const {
    to[0] = max;
    to[1] = sum;
  }
  /// log(sum of exp(logits)): -inf when no key was seen, NaN when the sum is.
  float log_sum_exp() const {
    return sum > 0.f ? max + std::log(sum) : (sum == 0.f ? -std::numeric_limits<float>::infinity() : sum);
  }
};

/// Combines two normalised partial attentions over disjoint key sets:
/// out = (w_a out_a + w_b out_b) / (w_a + w_b) with w = sum * e^(max - common max),
/// without overflow. A part with sum 0 carries no weight. With `empty_parts_add` it still
/// adds 0 * its output: the kernel's key splits store 0 * (their accumulators) there, so
/// a visible key of weight 0 (logit -inf) with an inf or NaN value leaves NaN, as it
/// does in the reference whenever another key or a sink has weight. Without it such a
/// part is skipped (the public merge(): a caller's row of lse -inf is no result).
/// Returns the merged mass (sum 0 when neither part had weight). out may alias out_a or
/// out_b.
inline SoftmaxMass merge_partial(const float* out_a, SoftmaxMass a, const float* out_b, SoftmaxMass b, float* out,
                                 std::ptrdiff_t head_dim, bool empty_parts_add = false) {
  const bool saw_a = a.sum != 0.f, saw_b = b.sum != 0.f;
  const bool add_a = saw_a || empty_parts_add, add_b = saw_b || empty_parts_add;
  if (!saw_a && !saw_b) {
    for (std::ptrdiff_t i = 0; i < head_dim; ++i)
      out[i] = (add_a ? 0.f * out_a[i] : 0.f) + (add_b ? 0.f * out_b[i] : 0.f);
    return {};
  }
  // A side without weight takes no part in the max (its max may be -inf or stale).
  const float max = !saw_a ? b.max : !saw_b ? a.max : std::fmax(a.max, b.max);
  const float weight_a = saw_a ? a.sum * std::exp(a.max - max) : 0.f;
  const float weight_b = saw_b ? b.sum * std::exp(b.max - max) : 0.f;
  const float total = weight_a + weight_b;
  const float scale_a = weight_a / total;
  const float scale_b = weight_b / total;
  for (std::ptrdiff_t i = 0; i < head_dim; ++i) {
    // A side whose weight merely underflowed to 0 still adds: a NaN in it makes the row
    // NaN, as in the reference, where that weight is tiny but not 0.
    const float from_a = add_a ? scale_a * out_a[i] : 0.f;
    const float from_b = add_b ? scale_b * out_b[i] : 0.f;
    out[i] = from_a + from_b;
  }
  return {max, total};
}

/// The same merge for parts known only by their log-sum-exp (fp32: exact while |lse|
/// stays well below 1 / fp32 epsilon, about 1e7; the kernel's own key splits keep the
/// SoftmaxMass instead). Returns the merged log-sum-exp.
inline float merge_partial(const float* out_a, float lse_a, const float* out_b, float lse_b, float* out,
                           std::ptrdiff_t head_dim) {
  return merge_partial(out_a, SoftmaxMass::from_lse(lse_a), out_b, SoftmaxMass::from_lse(lse_b), out, head_dim)
      .log_sum_exp();
}

}  // namespace kvheads::detail
