#pragma once
// Cache-line-aligned storage for the buffers the kernels stream: KV cache planes and the
// per-thread scratch. std::vector's default allocator gives 16-byte alignment (glibc puts
// large blocks 16 bytes into a page), so every 64-byte vector load of a K or V row spans
// two cache lines. GQA-8 decode of 16384 keys from a KvCache<float>, 1 thread: 5.7-6.5 ms
// aligned against 7.3-8.0 ms as before (alternating processes, noisy shared host).
#include <cstddef>
#include <new>

namespace kvheads::detail {

/// Cache line size the kernels assume (also a whole number of vectors on every ISA).
inline constexpr std::size_t cache_line = 64;

template <class T>
struct AlignedAllocator {
  using value_type = T;

  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{cache_line}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{cache_line}); }

  template <class U>
  bool operator==(const AlignedAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace kvheads::detail
