#pragma once
// Narrowing stores into the KV storage types, the other direction of simd/widen.hpp,
// written once: an ISA with a conversion instruction provides store_fp16 (Isa::width
// floats in, raw fp16 lanes out, nearest-even with the results of fp16::from_float
// bit for bit) and is used for whole vectors; any other ISA, and a row's tail, converts
// lane by lane. Lane-by-lane fp16 conversion is branchy integer code that the compiler
// does not vectorise: it took 16-55x the vector pass's time (bench/bench_append, Zen 5),
// and made an fp16 append 12-15x a bf16 one.
//
// Unlike the integer code of fp16::from_float, the instructions use the floating-point
// environment: they set its status flags (inexact, overflow, underflow, invalid for sNaN),
// which trap only where the program unmasked them (feenableexcept); and on NEON, FCVTN
// rounds and treats NaN as FPCR says. Every program starts with nearest-even and default
// NaNs off, and then the results are from_float's; a program that changes FPCR's rounding
// mode, or sets its DN or AHP bits, changes what an fp16 cache stores on NEON.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvheads/storage_types.hpp"

namespace kvheads::simd {

namespace detail {
// Detected through a void expression, as widen.hpp's loads.
template <class Isa, class = void>
struct has_store_fp16 : std::false_type {};
template <class Isa>
struct has_store_fp16<Isa, std::void_t<decltype(Isa::store_fp16(static_cast<std::uint16_t*>(nullptr),
                                                                Isa::load(static_cast<const float*>(nullptr))))>>
    : std::true_type {};
}  // namespace detail

/// dst[i] = fp16::from_float(src[i]) for i < n, bit for bit.
template <class Isa>
void narrow(const float* src, fp16* dst, std::ptrdiff_t n) {
  std::ptrdiff_t i = 0;
  if constexpr (detail::has_store_fp16<Isa>::value)
    for (; i + Isa::width <= n; i += Isa::width)
      Isa::store_fp16(reinterpret_cast<std::uint16_t*>(dst + i), Isa::load(src + i));
  for (; i < n; ++i) dst[i] = fp16::from_float(src[i]);
}

}  // namespace kvheads::simd
