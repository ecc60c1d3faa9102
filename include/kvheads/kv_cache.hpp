#pragma once
// KvCache<T>: one cache type for every head configuration. Keys and values live in
// separate planes laid out [kv_heads][capacity][head_dim], so one KV head's keys are
// contiguous and decode streams them front to back.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvheads/core/check.hpp"
#include "kvheads/head_layout.hpp"

namespace kvheads {

/// Cache of the keys and values of the tokens seen so far, for one attention layer.
/// T is the storage type (float here). Accumulation is always fp32.
template <class T>
class KvCache {
 public:
  /// Room for `capacity` tokens of `layout.kv_heads` heads (throws std::invalid_argument
  /// on an invalid layout or capacity <= 0).
  KvCache(HeadLayout layout, int capacity) : layout_(checked(layout, capacity)), capacity_(capacity) {
    const std::size_t elements = std::size_t(layout_.kv_heads) * std::size_t(capacity_) * std::size_t(layout_.head_dim);
    keys_.assign(elements, T{});
    values_.assign(elements, T{});
  }

  /// Appends n_tokens tokens; k, v: [n_tokens][kv_heads][head_dim]. When they do not fit,
  /// throws std::length_error and leaves the cache exactly as it was.
  void append(const float* k, const float* v, int n_tokens) {
    if (n_tokens < 0) detail::throw_invalid("n_tokens (", n_tokens, ") must be >= 0");
    detail::require_pointer(k, n_tokens, "k");
    detail::require_pointer(v, n_tokens, "v");
    if (n_tokens > capacity_ - size_)
      detail::throw_length("cannot append ", n_tokens, " tokens to a cache holding ", size_, " of ", capacity_,
                           " (capacity exceeded)");
    const int head_dim = layout_.head_dim;
    for (int t = 0; t < n_tokens; ++t)
      for (int h = 0; h < layout_.kv_heads; ++h) {
        const std::ptrdiff_t src = (std::ptrdiff_t(t) * layout_.kv_heads + h) * head_dim;
        const std::ptrdiff_t dst = offset(h, size_ + t);
        for (int d = 0; d < head_dim; ++d) {
          keys_[std::size_t(dst + d)] = T(k[src + d]);
          values_[std::size_t(dst + d)] = T(v[src + d]);
        }
      }
    size_ += n_tokens;
  }

  /// Tokens currently cached.
  int size() const { return size_; }
  /// Absolute position the next appended token gets (= tokens appended since the last
  /// clear()); rotary embeddings and ALiBi use it.
  std::int64_t position() const { return size_; }
  /// Tokens the cache can hold.
  int capacity() const { return capacity_; }
  /// Bytes of K and V storage held (both planes, the whole capacity).
  std::size_t bytes() const { return (keys_.size() + values_.size()) * sizeof(T); }
  /// Bytes one cached token occupies: 2 * kv_heads * head_dim * sizeof(T).
  std::size_t bytes_per_token() const { return 2 * std::size_t(layout_.kv_width()) * sizeof(T); }
  /// Forgets every token (capacity and storage stay).
  void clear() { size_ = 0; }
  const HeadLayout& layout() const { return layout_; }

  /// Key plane [kv_heads][capacity][head_dim].
  const T* keys() const { return keys_.data(); }
  /// Value plane [kv_heads][capacity][head_dim].
  const T* values() const { return values_.data(); }
  /// Elements between consecutive tokens of one head, and between heads.
  std::ptrdiff_t token_stride() const { return layout_.head_dim; }
  std::ptrdiff_t head_stride() const { return std::ptrdiff_t(capacity_) * layout_.head_dim; }

 private:
  static HeadLayout checked(HeadLayout layout, int capacity) {
    layout.validate();
    if (capacity <= 0) detail::throw_invalid("cache capacity (", capacity, ") must be positive");
    return layout;
  }
  std::ptrdiff_t offset(int head, int token) const {
    return std::ptrdiff_t(head) * head_stride() + std::ptrdiff_t(token) * token_stride();
  }

  HeadLayout layout_;
  int capacity_ = 0;
  int size_ = 0;
  std::vector<T> keys_;
  std::vector<T> values_;
};

}  // namespace kvheads
