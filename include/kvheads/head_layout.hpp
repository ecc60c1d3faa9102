#pragma once
// HeadLayout: the one number that separates MHA, GQA and MQA (kv_heads) plus the
// sizes every kernel derives from it.
#include <cstddef>

#include "kvheads/core/check.hpp"

namespace kvheads {

/// Sentinel for a size known only at run time (like Eigen::Dynamic).
inline constexpr int Dynamic = -1;

/// Largest head_dim the kernels accept (per-row scratch is sized from it).
inline constexpr int kMaxHeadDim = 512;

/// Most query (and so KV) heads a layout may have: far above any model's, and low enough
/// that every per-call size the kernels derive from a layout (a group's rows times
/// head_dim, ALiBi's slopes, a cache row count) stays well inside an int.
inline constexpr int kMaxHeads = 65536;

/// Query heads, key/value heads and the per-head width. Query head h reads KV head
/// h / group_size() (contiguous grouping, as in Llama and the GQA paper).
struct HeadLayout {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;

  /// Query heads that share one KV head.
  constexpr int group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }
  constexpr bool is_mha() const { return q_heads == kv_heads; }
  constexpr bool is_mqa() const { return kv_heads == 1; }
  /// Floats in one token's queries: q_heads * head_dim.
  constexpr std::ptrdiff_t q_width() const { return std::ptrdiff_t(q_heads) * head_dim; }
  /// Floats in one token's keys (or values): kv_heads * head_dim.
  constexpr std::ptrdiff_t kv_width() const { return std::ptrdiff_t(kv_heads) * head_dim; }
  /// KV head read by query head `q_head` (std::invalid_argument for an invalid layout,
  /// which has no such head, or a q_head outside [0, q_heads)).
  constexpr int kv_head_of(int q_head) const {
    validate();
    if (q_head < 0 || q_head >= q_heads)
      detail::throw_invalid("q_head (", q_head, ") must be in [0, ", q_heads, ")");
    return q_head / group_size();
  }

  /// Throws std::invalid_argument naming the bad field.
  constexpr void validate() const {
    if (q_heads <= 0) detail::throw_invalid("q_heads (", q_heads, ") must be positive");
    if (kv_heads <= 0) detail::throw_invalid("kv_heads (", kv_heads, ") must be positive");
    if (head_dim <= 0) detail::throw_invalid("head_dim (", head_dim, ") must be positive");
    if (head_dim > kMaxHeadDim)
      detail::throw_invalid("head_dim (", head_dim, ") must be at most ", kMaxHeadDim);
    if (q_heads > kMaxHeads) detail::throw_invalid("q_heads (", q_heads, ") must be at most ", kMaxHeads);
    if (q_heads % kv_heads != 0)
      detail::throw_invalid("q_heads (", q_heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  }

  friend constexpr bool operator==(const HeadLayout& a, const HeadLayout& b) {
    return a.q_heads == b.q_heads && a.kv_heads == b.kv_heads && a.head_dim == b.head_dim;
  }
  friend constexpr bool operator!=(const HeadLayout& a, const HeadLayout& b) { return !(a == b); }
};

/// A validated layout; throws std::invalid_argument on bad sizes.
inline HeadLayout make_layout(int q_heads, int kv_heads, int head_dim) {
  HeadLayout layout{q_heads, kv_heads, head_dim};
  layout.validate();
  return layout;
}

}  // namespace kvheads
