#pragma once
// The compiler hints the kernels rely on, defined once: keep_in_register (behind every
// ISA's `hold`, simd/avx512.hpp etc.), KVHEADS_NOINLINE, KVHEADS_ALWAYS_INLINE and
// KVHEADS_UNROLL.

/// Keeps a register-tile micro-kernel a function of its own. Each call runs a thousand or
/// more FMAs, so the call is free; inlined into the large kernel driver, the tile's
/// accumulators competed with the driver's values for registers (MQA decode of 16384
/// keys: 1.74 against 1.53 ms, causal GQA-8 prefill of 2048: 222 against 207 ms, best
/// of alternating runs), and which tiles g++ inlined changed with unrelated edits.
#if defined(__GNUC__) || defined(__clang__)
#define KVHEADS_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define KVHEADS_NOINLINE __declspec(noinline)
#else
#define KVHEADS_NOINLINE
#endif

/// Inlines a vector-math step into its caller however large the compiler judges it:
/// called out of line, exp_mantissa_each passed its vectors through memory (the
/// softmax's exponentials of four vectors at a time, 120 keys x 32 rows, Zen 2, AVX2:
/// 38.5 TSC cycles per key against 28.9 inlined).
#if defined(__GNUC__) || defined(__clang__)
#define KVHEADS_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define KVHEADS_ALWAYS_INLINE __forceinline
#else
#define KVHEADS_ALWAYS_INLINE inline
#endif

/// Unrolls the loop that follows completely (its trip count is a template constant: a
/// register tile's rows, keys or vectors). The tiles keep their accumulators in arrays,
/// which become registers only once every loop over them is unrolled. g++ -O3 does that
/// on its own, g++ -O2 (CMake's RelWithDebInfo, Debian's packaging default) did not, and
/// left the accumulators on the stack. bench_attend at -O2 without and with it, Zen 2
/// (AVX2): decode of 16384 keys took MQA 1.87-1.95x the time, GQA-8 1.21-1.37x, MHA
/// 1.16-1.18x, causal GQA-8 prefill of 512 and 2048 1.85-1.96x; with it, -O2 runs as fast
/// as -O3. clang++ unrolls these loops at -O2 already (bench/PERFORMANCE_LOG.md, 2026-12-05
/// midday).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define KVHEADS_UNROLL _Pragma("GCC unroll 32")
#else
#define KVHEADS_UNROLL
#endif

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
