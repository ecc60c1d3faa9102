#pragma once
// AttentionOptions: every logit transform and mask the kernels apply, and the thread count.
#include <cmath>

#include "kvheads/core/check.hpp"

namespace kvheads {

class ThreadPool;  // core/parallel.hpp

/// Options shared by every attend() entry point. Logits are
/// s = scale * q.k, then softcap * tanh(s / softcap), then + ALiBi bias, then masks.
struct AttentionOptions {
  bool causal = false;
  /// A window W > 0: the row at position pos sees keys pos - W < j <= pos, so it hides
  /// future keys too, with or without `causal`.
  int window = 0;       // sliding window in tokens, 0 = unlimited
  float softcap = 0.f;  // 0 = off
  bool alibi = false;
  float scale = 0.f;    // 0 = 1/sqrt(head_dim)
  /// Most workers a call uses, the caller included; capped at the pool's size. 0: the
  /// whole pool (the global one has a worker per CPU the process may run on).
  int threads = 0;      // 0 = hardware concurrency
  /// Optional per-query-head sink logits [q_heads] (gpt-oss, ONNX Runtime's head_sink):
  /// each joins its head's softmax denominator without a value. Not owned.
  const float* sinks = nullptr;
  /// Optional pool to run on instead of the process-wide one (ThreadPool::global()).
  /// Not owned; threads = 0 then means the pool's size.
  ThreadPool* pool = nullptr;

  /// Throws std::invalid_argument naming the bad option.
  void validate() const {
    if (window < 0) detail::throw_invalid("window (", window, ") must be >= 0 (0 = unlimited)");
    if (!std::isfinite(softcap) || softcap < 0.f)
      detail::throw_invalid("softcap (", softcap, ") must be finite and >= 0 (0 = off)");
    if (!std::isfinite(scale) || scale < 0.f)
      detail::throw_invalid("scale (", scale, ") must be finite and >= 0 (0 = 1/sqrt(head_dim))");
    if (threads < 0) detail::throw_invalid("threads (", threads, ") must be >= 0 (0 = hardware concurrency)");
  }

  /// The scale actually used for a given head_dim.
  float effective_scale(int head_dim) const {
    return scale > 0.f ? scale : float(1.0 / std::sqrt(double(head_dim)));
  }
};

}  // namespace kvheads
