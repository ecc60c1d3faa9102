#pragma once
// keep_in_register: the one definition behind every ISA's `hold` (simd/avx512.hpp etc.).

namespace kvheads::simd::detail {

/// Pins a loaded operand to a vector register. GCC and clang otherwise fold the load into
/// every FMA that uses it (one load per use instead of one per vector), and the
/// micro-kernels become load-port-bound: P.V at 4 rows x 4 vectors ran at 35% of the
/// AVX-512 FMA peak that way. An empty asm that "modifies" the register costs nothing.
template <class Vec>
inline void keep_in_register(Vec& v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(v));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  (void)v;
#endif
}

}  // namespace kvheads::simd::detail
