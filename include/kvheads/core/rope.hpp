#pragma once
// Rotary position embedding (RoPE, Su et al. 2021): each pair of a query's or key's
// dimensions is rotated by an angle proportional to the token's absolute position, so that
// q·k after rotation depends on the positions only through their difference.
//
// Pair i in [0, rotary_dim/2) of a token at position p turns by theta_i = p * base^(-2i/rotary_dim).
// Two conventions pick which dimensions form pair i:
//   half_split  (GPT-NeoX, Llama in Hugging Face transformers): (x[i], x[i + rotary_dim/2])
//   interleaved (GPT-J, the original Meta Llama code):           (x[2i], x[2i + 1])
// Dimensions from rotary_dim to head_dim pass through unchanged (partial rotary).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvheads/core/check.hpp"

namespace kvheads {

/// Which dimensions of a head form the rotated pairs.
enum class RopeLayout {
  half_split,   ///< pair i = (x[i], x[i + rotary_dim/2]): GPT-NeoX, Llama (Hugging Face)
  interleaved,  ///< pair i = (x[2i], x[2i + 1]): GPT-J, Llama (original Meta code)
};

/// Rotary position embedding settings of a layer (off by default).
struct RopeOptions {
  bool enabled = false;
  RopeLayout layout = RopeLayout::half_split;
  float base = 10000.f;  // theta_i = position * base^(-2i/rotary_dim)
  int rotary_dim = 0;    // leading dimensions rotated; 0 = head_dim; even and <= head_dim

  /// The number of rotated dimensions for a given head_dim.
  int effective_rotary_dim(int head_dim) const { return rotary_dim == 0 ? head_dim : rotary_dim; }

  /// Throws std::invalid_argument naming the bad field. Explicit fields are always checked;
  /// rotary_dim 0 (= head_dim) needs an even head_dim only when enabled, so the default
  /// (disabled) options suit every layout.
  void validate(int head_dim) const {
    // An enum holds any value of its underlying type (a cast, a config read as an int);
    // the rotation would silently treat an unknown one as interleaved.
    if (layout != RopeLayout::half_split && layout != RopeLayout::interleaved)
      detail::throw_invalid("rope layout (", static_cast<int>(layout), ") must be RopeLayout::half_split (",
                            static_cast<int>(RopeLayout::half_split), ") or RopeLayout::interleaved (",
                            static_cast<int>(RopeLayout::interleaved), ")");
    if (!std::isfinite(base) || !(base > 0.f)) detail::throw_invalid("rope base (", base, ") must be finite and > 0");
    if (rotary_dim < 0) detail::throw_invalid("rope rotary_dim (", rotary_dim, ") must be >= 0 (0 = head_dim)");
    if (rotary_dim > head_dim)
      detail::throw_invalid("rope rotary_dim (", rotary_dim, ") must be at most head_dim (", head_dim, ")");
    if (rotary_dim % 2 != 0) detail::throw_invalid("rope rotary_dim (", rotary_dim, ") must be even");
    if (enabled && rotary_dim == 0 && head_dim % 2 != 0)
      detail::throw_invalid("rope rotary_dim (0 = head_dim = ", head_dim,
                            ") must be even: set an even rotary_dim below head_dim");
  }
};

namespace detail {

/// base^(-2i/rotary_dim) for every pair i in [0, rotary_dim/2), in double.
inline std::vector<double> rope_inverse_frequencies(double base, int rotary_dim) {
  std::vector<double> inverse(static_cast<std::size_t>(rotary_dim / 2));
  for (int i = 0; i < rotary_dim / 2; ++i) inverse[std::size_t(i)] = std::pow(base, -double(2 * i) / rotary_dim);
  return inverse;
}

/// Rotates `heads` consecutive rows [heads][head_dim] of one token by the per-pair angles
/// whose cosines and sines are given. The products run in double and round to float once,
/// on store, so the result is as close to the exact rotation as float allows.
inline void rope_rotate_token(float* x, int heads, int head_dim, int rotary_dim, RopeLayout layout,
                              const double* cosines, const double* sines) {
  const int half = rotary_dim / 2;
  // half_split pairs (i, i + half); interleaved pairs (2i, 2i + 1).
  const int first_step = layout == RopeLayout::half_split ? 1 : 2;
  const int partner = layout == RopeLayout::half_split ? half : 1;
  for (int h = 0; h < heads; ++h) {
    float* row = x + std::ptrdiff_t(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      float& a = row[i * first_step];
      float& b = row[i * first_step + partner];
      const double x0 = a, x1 = b;
      a = float(x0 * cosines[i] - x1 * sines[i]);
      b = float(x0 * sines[i] + x1 * cosines[i]);
    }
  }
}

/// Applies RoPE in place to q [tokens][q_heads][head_dim] and, if k is not null, to
/// k [tokens][kv_heads][head_dim]; token t sits at absolute position first_position + t.
/// Q and K share one angle table per token. Applies regardless of options.enabled; the
/// options must have been validated against head_dim (no checks here).
inline void apply_rope(float* q, int q_heads, float* k, int kv_heads, std::ptrdiff_t tokens, int head_dim,
                       std::int64_t first_position, const RopeOptions& options) {
  const int rotary_dim = options.effective_rotary_dim(head_dim);
  const int half = rotary_dim / 2;
  if (half == 0 || tokens == 0) return;
  const std::vector<double> inverse = rope_inverse_frequencies(double(options.base), rotary_dim);
  std::vector<double> cosines(static_cast<std::size_t>(half)), sines(static_cast<std::size_t>(half));
  for (std::ptrdiff_t t = 0; t < tokens; ++t) {
    // The angle is formed in double from the exact integer position: in float, position
    // 100000 times an inverse frequency near 1 could already be off by ~4e-3 rad.
    const double position = double(first_position + t);
    for (int i = 0; i < half; ++i) {
      const double angle = position * inverse[std::size_t(i)];
      cosines[std::size_t(i)] = std::cos(angle);
      sines[std::size_t(i)] = std::sin(angle);
    }
    rope_rotate_token(q + t * q_heads * std::ptrdiff_t(head_dim), q_heads, head_dim, rotary_dim, options.layout,
                      cosines.data(), sines.data());
    if (k != nullptr)
      rope_rotate_token(k + t * kv_heads * std::ptrdiff_t(head_dim), kv_heads, head_dim, rotary_dim, options.layout,
                        cosines.data(), sines.data());
  }
}

/// Applies RoPE in place to x [tokens][heads][head_dim]; token t sits at absolute position
/// first_position + t (see the two-tensor overload).
inline void apply_rope(float* x, std::ptrdiff_t tokens, int heads, int head_dim, std::int64_t first_position,
                       const RopeOptions& options) {
  apply_rope(x, heads, nullptr, 0, tokens, head_dim, first_position, options);
}

}  // namespace detail
}  // namespace kvheads
