#pragma once
// Widening loads from the KV storage types (bf16, fp16, int8) to one fp32 vector, written
// once: an ISA that has a conversion instruction provides load_bf16 / load_fp16 / load_i8
// (raw 16- or 8-bit lanes in, floats out) and is used; any other ISA converts lane by lane.
#include <cstdint>
#include <type_traits>

#include "kvheads/simd/register_hint.hpp"
#include "kvheads/storage_types.hpp"

namespace kvheads::simd {

namespace detail {
// Detected through a void expression: naming a vector type with attributes (__m256) as
// a template argument would warn.
template <class Isa, class = void>
struct has_load_bf16 : std::false_type {};
template <class Isa>
struct has_load_bf16<Isa, std::void_t<decltype(static_cast<void>(Isa::load_bf16(static_cast<const std::uint16_t*>(nullptr))))>>
    : std::true_type {};
template <class Isa, class = void>
struct has_load_fp16 : std::false_type {};
template <class Isa>
struct has_load_fp16<Isa, std::void_t<decltype(static_cast<void>(Isa::load_fp16(static_cast<const std::uint16_t*>(nullptr))))>>
    : std::true_type {};
template <class Isa, class = void>
struct has_load_i8 : std::false_type {};
template <class Isa>
struct has_load_i8<Isa, std::void_t<decltype(static_cast<void>(Isa::load_i8(static_cast<const std::int8_t*>(nullptr))))>>
    : std::true_type {};

template <class Isa, class T, class Convert>
typename Isa::vec widen_lanes(const T* p, Convert convert) {
  float lanes[Isa::width];
  KVHEADS_UNROLL for (int i = 0; i < Isa::width; ++i) lanes[i] = convert(p[i]);
  return Isa::load(lanes);
}
}  // namespace detail

/// Isa::width stored elements starting at p, as floats (exact for every storage type).
template <class Isa>
typename Isa::vec widen(const float* p) {
  return Isa::load(p);
}

template <class Isa>
typename Isa::vec widen(const bf16* p) {
  if constexpr (detail::has_load_bf16<Isa>::value)
    return Isa::load_bf16(reinterpret_cast<const std::uint16_t*>(p));
  else
    return detail::widen_lanes<Isa>(p, [](bf16 x) { return x.to_float(); });
}

template <class Isa>
typename Isa::vec widen(const fp16* p) {
  if constexpr (detail::has_load_fp16<Isa>::value)
    return Isa::load_fp16(reinterpret_cast<const std::uint16_t*>(p));
  else
    return detail::widen_lanes<Isa>(p, [](fp16 x) { return x.to_float(); });
}

template <class Isa>
typename Isa::vec widen(const std::int8_t* p) {
  if constexpr (detail::has_load_i8<Isa>::value)
    return Isa::load_i8(p);
  else
    return detail::widen_lanes<Isa>(p, [](std::int8_t x) { return float(x); });
}

}  // namespace kvheads::simd
