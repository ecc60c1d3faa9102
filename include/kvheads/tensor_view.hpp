#pragma once
// Non-owning strided views over user memory: the reference (core/reference.hpp) reads
// the plain [tokens][heads][head_dim] layout and the cache's [heads][capacity][head_dim]
// layout through them. The fused kernel takes the same two layouts by their strides
// (detail::AttendArgs); the public attend() overloads take dense memory or a KvCache.
#include <cstddef>

namespace kvheads {

/// Rows of head_dim contiguous elements addressed by (token, head):
/// element (token, head, i) lives at data[token * token_stride + head * head_stride + i].
template <class T>
struct HeadsView {
  T* data = nullptr;
  std::ptrdiff_t token_stride = 0;
  std::ptrdiff_t head_stride = 0;

  T* row(std::ptrdiff_t token, std::ptrdiff_t head) const {
    return data + token * token_stride + head * head_stride;
  }

  /// The plain activation layout [tokens][heads][head_dim].
  static HeadsView token_major(T* data, int heads, int head_dim) {
    return {data, std::ptrdiff_t(heads) * head_dim, head_dim};
  }
  /// The cache layout [heads][capacity][head_dim].
  static HeadsView head_major(T* data, std::ptrdiff_t capacity, int head_dim) {
    return {data, head_dim, capacity * head_dim};
  }
};

}  // namespace kvheads
