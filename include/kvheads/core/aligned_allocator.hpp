#pragma once
// Aligned storage for the buffers the kernels stream: KV cache planes and the per-thread
// scratch.
//
// Cache-line alignment: std::vector's default allocator gives 16-byte alignment (glibc
// puts large blocks 16 bytes into a page), so every 64-byte vector load of a K or V row
// spans two cache lines. GQA-8 decode of 16384 keys from a KvCache<float>, 1 thread:
// 5.7-6.5 ms aligned against 7.3-8.0 ms as before (alternating processes, noisy host).
//
// Huge pages: blocks of at least huge_page bytes are aligned to it and, on Linux, marked
// MADV_HUGEPAGE before anything touches them, so the kernel backs them with 2 MiB pages
// where transparent huge pages are enabled in "madvise" mode (Debian's default) or
// "always". Decode streams each KV head's plane from DRAM; with 4 KiB pages the
// hardware prefetchers restart at every page boundary and every 4 KiB costs a TLB
// entry. Reading 256 MiB on one core of our CI machine: 28.5-29.0 GB/s against
// 26.2-26.5 with 4 KiB pages (medians of 15 passes, alternating processes). Decode of
// 16384 keys from a KvCache<float>, 1 thread, medians of 5-15 alternating pinned runs
// in seven sessions: MHA (one row per KV head, bound by the stream) 34.3 -> 31.1,
// 25.7 -> 20.0, 26.6 -> 21.4, 25.5 -> 24.1 ms; GQA-8 mixed: 10.02 -> 8.47, 8.37 ->
// 7.08, 9.12 -> 7.83 ms when other tenants loaded the memory, 5.99 -> 6.59, 4.92 ->
// 5.00, 7.07 -> 7.36 ms at other times; MQA (in L3) unchanged. The advice is only a
// hint: where it is refused or unsupported, the memory is used as it comes.
#include <cstddef>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvheads::detail {

/// Cache line size the kernels assume (also a whole number of vectors on every ISA).
inline constexpr std::size_t cache_line = 64;

/// The transparent huge page size of x86-64 and AArch64 Linux (4 KiB base pages).
inline constexpr std::size_t huge_page = std::size_t(2) << 20;

/// The alignment AlignedAllocator gives a block of `bytes`.
constexpr std::size_t block_alignment(std::size_t bytes) { return bytes >= huge_page ? huge_page : cache_line; }

template <class T>
struct AlignedAllocator {
  using value_type = T;

  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    void* block = ::operator new(bytes, std::align_val_t{block_alignment(bytes)});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= huge_page) (void)::madvise(block, bytes / huge_page * huge_page, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(block);
  }
  void deallocate(T* p, std::size_t n) noexcept { ::operator delete(p, std::align_val_t{block_alignment(n * sizeof(T))}); }

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
