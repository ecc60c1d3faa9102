#pragma once
// Attention<T, QHeads, KvHeads, HeadDim>: a whole attention layer (projections, the fused
// kernel and its KV cache). Sizes are template ints with a Dynamic sentinel, like Eigen's
// Matrix; MHA, MQA and GQA are aliases of the one class.
#include <cstddef>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "kvheads/attend.hpp"
#include "kvheads/core/check.hpp"
#include "kvheads/core/projection.hpp"
#include "kvheads/core/rope.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/options.hpp"

namespace kvheads {

/// One attention layer: x [tokens][d_model] -> out [tokens][d_model]. T is the KV cache's
/// storage type; weights and accumulation are fp32. Not safe to call concurrently on the
/// same cache; distinct caches may be used from distinct threads.
template <class T, int QHeads = Dynamic, int KvHeads = Dynamic, int HeadDim = Dynamic>
class Attention {
  static_assert(QHeads == Dynamic || (QHeads > 0 && QHeads <= kMaxHeads), "QHeads out of range");
  static_assert(KvHeads == Dynamic || KvHeads > 0, "KvHeads must be positive or Dynamic");
  static_assert(HeadDim == Dynamic || (HeadDim > 0 && HeadDim <= kMaxHeadDim), "HeadDim out of range");
  static_assert(QHeads == Dynamic || KvHeads == Dynamic || QHeads % KvHeads == 0,
                "QHeads must be a multiple of KvHeads");

 public:
  using Cache = KvCache<T>;
  static constexpr bool fully_static = QHeads != Dynamic && KvHeads != Dynamic && HeadDim != Dynamic;
  static constexpr int GroupSize = (QHeads != Dynamic && KvHeads != Dynamic) ? QHeads / KvHeads : Dynamic;

  /// Zero weights for a layout fixed at compile time.
  explicit Attention(int d_model) : Attention(d_model, HeadLayout{QHeads, KvHeads, HeadDim}) {
    static_assert(fully_static, "Attention(d_model) needs every size at compile time; pass a HeadLayout");
  }

  /// Zero weights; compile-time sizes must agree with the layout.
  Attention(int d_model, HeadLayout layout) : layout_(checked(layout)), d_model_(d_model) {
    if (d_model <= 0) detail::throw_invalid("d_model (", d_model, ") must be positive");
    wq_ = RowMatrix::Zero(d_model, layout_.q_width());
    wk_ = RowMatrix::Zero(d_model, layout_.kv_width());
    wv_ = RowMatrix::Zero(d_model, layout_.kv_width());
    wo_ = RowMatrix::Zero(layout_.q_width(), d_model);
  }

  /// Copies the four weights, each checked against the layout: wq [d_model][q_heads *
  /// head_dim], wk and wv [d_model][kv_heads * head_dim], wo [q_heads * head_dim][d_model]
  /// (row-major, x * W: the transpose of PyTorch's nn.Linear weight). d_model is wq's row count.
  Attention(HeadLayout layout, const Eigen::Ref<const RowMatrix>& wq, const Eigen::Ref<const RowMatrix>& wk,
            const Eigen::Ref<const RowMatrix>& wv, const Eigen::Ref<const RowMatrix>& wo)
      : Attention(d_model_of(wq), layout) {
    set_weights(wq, wk, wv, wo);
  }

  /// Replaces the weights, checking every shape first (nothing changes on error).
  void set_weights(const Eigen::Ref<const RowMatrix>& wq, const Eigen::Ref<const RowMatrix>& wk,
                   const Eigen::Ref<const RowMatrix>& wv, const Eigen::Ref<const RowMatrix>& wo) {
    check_shape("wq", wq, d_model_, layout_.q_width());
    check_shape("wk", wk, d_model_, layout_.kv_width());
    check_shape("wv", wv, d_model_, layout_.kv_width());
    check_shape("wo", wo, layout_.q_width(), d_model_);
    wq_ = wq;
    wk_ = wk;
    wv_ = wv;
    wo_ = wo;
  }

  const HeadLayout& layout() const { return layout_; }
  int d_model() const { return d_model_; }
  // The weights may be changed in place; a shape other than the one given here makes
  // forward() throw, naming the weight.
  /// Wq [d_model][q_heads*head_dim].
  RowMatrix& wq() { return wq_; }
  const RowMatrix& wq() const { return wq_; }
  /// Wk [d_model][kv_heads*head_dim].
  RowMatrix& wk() { return wk_; }
  const RowMatrix& wk() const { return wk_; }
  /// Wv [d_model][kv_heads*head_dim].
  RowMatrix& wv() { return wv_; }
  const RowMatrix& wv() const { return wv_; }
  /// Wo [q_heads*head_dim][d_model].
  RowMatrix& wo() { return wo_; }
  const RowMatrix& wo() const { return wo_; }

  /// Sets the rotary position embedding applied to Q and K in forward(); checked against
  /// head_dim first (std::invalid_argument, setting unchanged). Default: disabled.
  void set_rope(const RopeOptions& rope) {
    rope.validate(layout_.head_dim);
    rope_ = rope;
  }
  /// The rotary position embedding setting.
  const RopeOptions& rope() const { return rope_; }

  /// A cache with this layer's layout.
  Cache make_cache(int capacity) const { return Cache(layout_, capacity); }

  /// Runs the layer on n_tokens new tokens: projects x [n_tokens][d_model], appends their
  /// K/V to the cache, attends (the new tokens sit at the cache's last positions) and applies
  /// the output projection into out [n_tokens][d_model]. With RoPE enabled, Q and K are rotated
  /// after projection, token t at absolute position cache.position() + t (before the append).
  /// Throws (cache unchanged) on a layout mismatch, a full cache, more tokens than a ring
  /// cache can take as queries, or a weight whose shape was changed through its accessor;
  /// an exception from the attention or projections after the append (std::bad_alloc,
  /// std::system_error) also leaves the cache's tokens as they were.
  void forward(const float* x, int n_tokens, Cache& cache, float* out, const AttentionOptions& options = {}) const {
    if (n_tokens < 0) detail::throw_invalid("n_tokens (", n_tokens, ") must be >= 0");
    detail::require_pointer(x, n_tokens, "x");
    detail::require_pointer(out, n_tokens, "out");
    // The accessors hand out the weights themselves, so their shapes are checked again here:
    // the projections read and write by these shapes.
    check_shape("wq", wq_, d_model_, layout_.q_width());
    check_shape("wk", wk_, d_model_, layout_.kv_width());
    check_shape("wv", wv_, d_model_, layout_.kv_width());
    check_shape("wo", wo_, layout_.q_width(), d_model_);
    if (cache.layout() != layout_)
      detail::throw_invalid("cache layout (q_heads ", cache.layout().q_heads, ", kv_heads ", cache.layout().kv_heads,
                            ", head_dim ", cache.layout().head_dim, ") does not match the attention layout (q_heads ",
                            layout_.q_heads, ", kv_heads ", layout_.kv_heads, ", head_dim ", layout_.head_dim, ")");
    options.validate();
    const bool fixed_capacity = !cache.is_ring() && !cache.options().growable;  // rings and growable caches never refuse
    if (fixed_capacity && n_tokens > cache.capacity() - cache.size())
      detail::throw_length("cannot append ", n_tokens, " tokens to a cache holding ", cache.size(), " of ",
                           cache.capacity(), " (capacity exceeded)");
    detail::require_ring_can_attend_new(cache, n_tokens, options);
    if (n_tokens == 0) return;
    const std::size_t n = std::size_t(n_tokens);
    std::vector<float> q(n * std::size_t(layout_.q_width()));
    std::vector<float> k(n * std::size_t(layout_.kv_width()));
    std::vector<float> v(n * std::size_t(layout_.kv_width()));
    detail::project(x, n_tokens, wq_, q.data());
    detail::project(x, n_tokens, wk_, k.data());
    detail::project(x, n_tokens, wv_, v.data());
    // Every check is done: rotate with the positions the new tokens get in the cache.
    if (rope_.enabled)
      detail::apply_rope(q.data(), layout_.q_heads, k.data(), layout_.kv_heads, n_tokens, layout_.head_dim,
                         cache.position(), rope_);
    // What the append overwrites, saved first: the attention and the output projection
    // after it can still throw (std::bad_alloc for per-thread scratch or Eigen's blocks,
    // std::system_error when the thread pool is first created), and then the append is
    // undone, so the cache is left as it was.
    const typename Cache::AppendUndo undo = cache.save_for_append(n_tokens);
    cache.append(k.data(), v.data(), n_tokens);
    try {
      // In place: attend() writes each output row only after the last read of its own
      // query row (tests/test_attend.cpp, "every ISA attends in place ..."), so q needs no
      // second buffer.
      detail::dispatch_fused_static<simd::default_isa, HeadDim, GroupSize>(
          detail::cache_args(q.data(), n_tokens, cache, q.data(), options, nullptr));
      detail::project(q.data(), n_tokens, wo_, out);
    } catch (...) {
      cache.undo_append(undo);
      throw;
    }
  }

  /// Eigen overload: x [n_tokens][d_model] -> returns [n_tokens][d_model]. x may be any
  /// row-major expression, e.g. a block of columns of a wider matrix.
  RowMatrix forward(const Eigen::Ref<const RowMatrix>& x, Cache& cache, const AttentionOptions& options = {}) const {
    if (x.cols() != d_model_) detail::throw_invalid("x has ", x.cols(), " columns (expected d_model = ", d_model_, ")");
    if (x.rows() > std::numeric_limits<int>::max())
      detail::throw_invalid("x has ", x.rows(), " rows (expected at most ", std::numeric_limits<int>::max(), ")");
    // A Ref binds a block of a wider matrix in place, rows further apart than d_model;
    // the pointer overload takes rows d_model apart, so such an x is copied first.
    if (x.rows() > 1 && x.outerStride() != d_model_) {
      const RowMatrix contiguous = x;
      return forward(contiguous, cache, options);
    }
    RowMatrix out(x.rows(), d_model_);
    forward(x.data(), int(x.rows()), cache, out.data(), options);
    return out;
  }

 private:
  static HeadLayout checked(HeadLayout layout) {
    layout.validate();
    if ((QHeads != Dynamic && layout.q_heads != QHeads) || (KvHeads != Dynamic && layout.kv_heads != KvHeads) ||
        (HeadDim != Dynamic && layout.head_dim != HeadDim))
      detail::throw_invalid("layout (q_heads ", layout.q_heads, ", kv_heads ", layout.kv_heads, ", head_dim ",
                            layout.head_dim, ") does not match the compile-time sizes (", QHeads, ", ", KvHeads, ", ",
                            HeadDim, "; -1 = Dynamic)");
    return layout;
  }
  static int d_model_of(const Eigen::Ref<const RowMatrix>& wq) {
    if (wq.rows() <= 0 || wq.rows() > std::numeric_limits<int>::max())
      detail::throw_invalid("wq has ", wq.rows(), " rows (expected d_model, in [1, ", std::numeric_limits<int>::max(),
                            "])");
    return int(wq.rows());
  }
  static void check_shape(const char* name, const Eigen::Ref<const RowMatrix>& w, std::ptrdiff_t rows,
                          std::ptrdiff_t cols) {
    if (w.rows() != rows || w.cols() != cols)
      detail::throw_invalid(name, " is ", w.rows(), "x", w.cols(), " (expected ", rows, "x", cols, ")");
  }

  HeadLayout layout_;
  int d_model_;
  RowMatrix wq_, wk_, wv_, wo_;
  RopeOptions rope_;
};

/// Multi-head attention: every query head has its own KV head.
template <int H, int D>
using MHA = Attention<float, H, H, D>;
/// Multi-query attention: all query heads share one KV head.
template <int H, int D>
using MQA = Attention<float, H, 1, D>;
/// Grouped-query attention: H query heads share KV KV heads in contiguous groups.
template <int H, int KV, int D>
using GQA = Attention<float, H, KV, D>;

}  // namespace kvheads
