#pragma once
// The plain reference: one query row and one head at a time, double accumulation, every
// logit materialised. Obviously correct and slow; tests and users check the fast paths
// against it.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "kvheads/core/logits.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/options.hpp"
#include "kvheads/tensor_view.hpp"

namespace kvheads {

/// Reference attention over strided views (double accumulation). Same semantics as attend():
/// q/out rows addressed by (query, q_head), k/v rows by (key, kv_head); query row i sits at
/// absolute position first_query_pos + i, key j at position j. lse (optional) receives
/// [q_len][q_heads] log-sum-exp values (-inf for a row that sees no key).
/// No argument checking beyond what attend() does: this is a test oracle.
template <class KvT = const float>
void reference_attend(HeadsView<const float> q, HeadsView<KvT> k, HeadsView<KvT> v, HeadsView<float> out,
                      std::ptrdiff_t q_len, std::ptrdiff_t kv_len, std::ptrdiff_t first_query_pos,
                      HeadLayout layout, const AttentionOptions& options = {}, float* lse = nullptr) {
  const int head_dim = layout.head_dim;
  const double scale = options.effective_scale(head_dim);
  const std::vector<double> slopes = detail::alibi_slopes(layout.q_heads);
  std::vector<double> logits(std::size_t(kv_len > 0 ? kv_len : 1));
  std::vector<double> acc(static_cast<std::size_t>(head_dim));
  for (std::ptrdiff_t i = 0; i < q_len; ++i) {
    const std::ptrdiff_t position = first_query_pos + i;
    // The masks straight from the contract (not shared with the kernel's range helper):
    // causal sees j <= position; a window W sees position - W < j <= position.
    std::ptrdiff_t first = 0, last = kv_len - 1;
    if (options.causal || options.window > 0) last = std::min(last, position);
    if (options.window > 0) first = std::max<std::ptrdiff_t>(first, position - options.window + 1);
    const struct { std::ptrdiff_t first, last; } range{first, last};
    for (int h = 0; h < layout.q_heads; ++h) {
      const int kv_head = layout.kv_head_of(h);
      const float* q_row = q.row(i, h);
      double max = -std::numeric_limits<double>::infinity();
      for (std::ptrdiff_t j = range.first; j <= range.last; ++j) {
        const auto* k_row = k.row(j, kv_head);
        // Four partial sums: one chain of dependent adds made this dot product most of the
        // tests' run time (a reference over the per-ISA tail shapes: 0.89 -> 0.64 s).
        double part[4] = {0, 0, 0, 0};
        int d = 0;
        for (; d + 4 <= head_dim; d += 4)
          for (int lane = 0; lane < 4; ++lane) part[lane] += double(q_row[d + lane]) * double(k_row[d + lane]);
        for (; d < head_dim; ++d) part[0] += double(q_row[d]) * double(k_row[d]);
        const double dot = (part[0] + part[1]) + (part[2] + part[3]);
        double s = scale * dot;
        if (options.softcap > 0.f) s = options.softcap * std::tanh(s / options.softcap);
        if (options.alibi) s += slopes[std::size_t(h)] * double(j - position);
        logits[std::size_t(j)] = s;
        // Takes a NaN and keeps it: a later key of logit -inf must not replace it, or the
        // row would read as having no weight (zeros) instead of NaN.
        if (!(s <= max) && !std::isnan(max)) max = s;
      }
      // A sink logit joins the denominator without a value.
      const bool has_sink = options.sinks != nullptr;
      const double sink = has_sink ? double(options.sinks[h]) : 0.0;
      if (has_sink && !(sink <= max) && !std::isnan(max)) max = sink;
      // Every visible logit -inf (and no sink): nothing carries weight, as when every key
      // is masked; the contract's answer is zeros (and lse -inf), not exp(-inf + inf).
      const bool no_weight = max == -std::numeric_limits<double>::infinity();
      for (double& a : acc) a = 0;
      double sum = has_sink ? std::exp(sink - max) : 0.0;
      for (std::ptrdiff_t j = range.first; !no_weight && j <= range.last; ++j) {
        const double p = std::exp(logits[std::size_t(j)] - max);
        sum += p;
        const auto* v_row = v.row(j, kv_head);
        for (int d = 0; d < head_dim; ++d) acc[std::size_t(d)] += p * double(v_row[d]);
      }
      float* out_row = out.row(i, h);
      const bool none_visible = range.first > range.last || no_weight;
      for (int d = 0; d < head_dim; ++d) out_row[d] = none_visible ? 0.f : float(acc[std::size_t(d)] / sum);
      if (lse)
        lse[i * layout.q_heads + h] = none_visible && !has_sink ? -std::numeric_limits<float>::infinity()
                                                                : float(max + std::log(sum));
    }
  }
}

/// Reference on plain memory, with the stable attend() signature: q [q_len][q_heads][head_dim],
/// k, v [kv_len][kv_heads][head_dim], out like q; bottom-right aligned positions.
inline void reference_attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                             HeadLayout layout, const AttentionOptions& options = {}, float* lse = nullptr) {
  reference_attend<const float>(HeadsView<const float>::token_major(q, layout.q_heads, layout.head_dim),
                                HeadsView<const float>::token_major(k, layout.kv_heads, layout.head_dim),
                                HeadsView<const float>::token_major(v, layout.kv_heads, layout.head_dim),
                                HeadsView<float>::token_major(out, layout.q_heads, layout.head_dim), q_len, kv_len,
                                std::ptrdiff_t(kv_len) - q_len, layout, options, lse);
}

}  // namespace kvheads
