#pragma once
// Includes every ISA the compiler can target and names the default one.
// KVHEADS_SIMD=scalar|avx2|avx512|neon (a preprocessor token) forces the default.
#include <tuple>
#include <utility>

#include "kvheads/simd/avx2.hpp"
#include "kvheads/simd/avx512.hpp"
#include "kvheads/simd/neon.hpp"
#include "kvheads/simd/scalar.hpp"
#include "kvheads/simd/narrow.hpp"
#include "kvheads/simd/vector_math.hpp"

// Which ISA tags exist in this translation unit (the same conditions as the ISA files).
#if defined(__AVX2__) && defined(__FMA__)
#define KVHEADS_SIMD_HAS_AVX2 1
#else
#define KVHEADS_SIMD_HAS_AVX2 0
#endif
#if defined(__AVX512F__)
#define KVHEADS_SIMD_HAS_AVX512 1
#else
#define KVHEADS_SIMD_HAS_AVX512 0
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#define KVHEADS_SIMD_HAS_NEON 1
#else
#define KVHEADS_SIMD_HAS_NEON 0
#endif

// Maps the KVHEADS_SIMD token to a number the preprocessor can compare
// (an unknown token maps to an undefined identifier, which #if reads as 0).
#define KVHEADS_SIMD_ID_scalar 1
#define KVHEADS_SIMD_ID_avx2 2
#define KVHEADS_SIMD_ID_avx512 3
#define KVHEADS_SIMD_ID_neon 4
#define KVHEADS_SIMD_ID_CAT(a, b) a##b
#define KVHEADS_SIMD_ID(token) KVHEADS_SIMD_ID_CAT(KVHEADS_SIMD_ID_, token)

namespace kvheads::simd {

#if defined(KVHEADS_SIMD)
#if KVHEADS_SIMD_ID(KVHEADS_SIMD) == 1
#elif KVHEADS_SIMD_ID(KVHEADS_SIMD) == 2
#if !KVHEADS_SIMD_HAS_AVX2
#error "KVHEADS_SIMD=avx2 needs AVX2 and FMA enabled by the compiler flags (e.g. -mavx2 -mfma or -march=native)"
#endif
#elif KVHEADS_SIMD_ID(KVHEADS_SIMD) == 3
#if !KVHEADS_SIMD_HAS_AVX512
#error "KVHEADS_SIMD=avx512 needs AVX-512F enabled by the compiler flags (e.g. -mavx512f or -march=native)"
#endif
#elif KVHEADS_SIMD_ID(KVHEADS_SIMD) == 4
#if !KVHEADS_SIMD_HAS_NEON
#error "KVHEADS_SIMD=neon needs an AArch64 target with NEON"
#endif
#else
#error "KVHEADS_SIMD must be one of the tokens scalar, avx2, avx512, neon"
#endif
/// The ISA kernels use when the caller names none (forced by KVHEADS_SIMD).
using default_isa = KVHEADS_SIMD;
#elif KVHEADS_SIMD_HAS_AVX512
/// The ISA kernels use when the caller names none: the widest one enabled.
using default_isa = avx512;
#elif KVHEADS_SIMD_HAS_AVX2
/// The ISA kernels use when the caller names none: the widest one enabled.
using default_isa = avx2;
#elif KVHEADS_SIMD_HAS_NEON
/// The ISA kernels use when the caller names none: the widest one enabled.
using default_isa = neon;
#else
/// The ISA kernels use when the caller names none: the widest one enabled.
using default_isa = scalar;
#endif

/// Every ISA tag compiled into this translation unit, narrowest first.
using enabled_isas = std::tuple<scalar
#if KVHEADS_SIMD_HAS_AVX2
                                ,
                                avx2
#endif
#if KVHEADS_SIMD_HAS_AVX512
                                ,
                                avx512
#endif
#if KVHEADS_SIMD_HAS_NEON
                                ,
                                neon
#endif
                                >;

/// True when the CPU running the program can execute Isa (compiled-in is not enough:
/// a binary built with -march=native may be moved to an older machine).
template <class Isa>
bool cpu_supports();

template <>
inline bool cpu_supports<scalar>() {
  return true;
}
#if KVHEADS_SIMD_HAS_AVX2
template <>
inline bool cpu_supports<avx2>() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
#if KVHEADS_SIMD_HAS_AVX512
template <>
inline bool cpu_supports<avx512>() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
#endif
#if KVHEADS_SIMD_HAS_NEON
template <>
inline bool cpu_supports<neon>() {
  return true;  // NEON is mandatory on AArch64
}
#endif

/// A hint to start loading the cache line holding p (towards L2; never faults, a no-op
/// where the compiler has no prefetch builtin).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
  // A prefetch is no side effect to the optimiser, so g++ deletes a loop whose body only
  // prefetches when its trip count is a run-time value (-ffinite-loops); this empty
  // volatile asm is one, and keeps the loop.
  __asm__ volatile("");
#else
  (void)p;
#endif
}

/// A hint to fetch the cache line holding p for writing (towards L1), as `prefetch`.
inline void prefetch_for_write(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1, 3);
  __asm__ volatile("");  // keeps prefetch-only loops (see prefetch)
#else
  (void)p;
#endif
}

}  // namespace kvheads::simd

namespace kvheads::detail {
template <class F, class... Isas>
void for_each_isa_in(F& f, std::tuple<Isas...>*) {
  (f(Isas{}), ...);
}
}  // namespace kvheads::detail

namespace kvheads::simd {
/// Calls f(Isa{}) for every tag in enabled_isas, in order (whether or not the CPU
/// running the program supports it: check cpu_supports<Isa>() before running code).
template <class F>
void for_each_enabled_isa(F&& f) {
  ::kvheads::detail::for_each_isa_in(f, static_cast<enabled_isas*>(nullptr));
}
}  // namespace kvheads::simd
