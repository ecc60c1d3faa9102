#pragma once
// Error reporting for the public boundary: every message names the bad value
// and what was expected, e.g. "kvheads: q_heads (12) must be a multiple of kv_heads (5)".
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvheads::detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  out << "kvheads: ";
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <class... Parts>
[[noreturn]] void throw_invalid(Parts&&... parts) {
  throw std::invalid_argument(concat(std::forward<Parts>(parts)...));
}

template <class... Parts>
[[noreturn]] void throw_length(Parts&&... parts) {
  throw std::length_error(concat(std::forward<Parts>(parts)...));
}

inline void require_pointer(const void* pointer, long long length, const char* name) {
  if (pointer == nullptr && length != 0)
    throw_invalid(name, " is null but its length is ", length, " (expected a valid pointer)");
}

// An array the entry points read or write: `floats` floats from `data`, called `name`.
struct FloatSpan {
  const float* data;
  std::ptrdiff_t floats;
  const char* name;
};

// Compared as integers: the arrays are usually separate objects, which `<` on pointers
// does not order.
inline bool spans_overlap(const FloatSpan& a, const FloatSpan& b) {
  if (a.data == nullptr || b.data == nullptr || a.floats <= 0 || b.floats <= 0) return false;
  const auto a_begin = reinterpret_cast<std::uintptr_t>(a.data), b_begin = reinterpret_cast<std::uintptr_t>(b.data);
  const auto a_end = a_begin + std::uintptr_t(a.floats) * sizeof(float);
  const auto b_end = b_begin + std::uintptr_t(b.floats) * sizeof(float);
  return a_begin < b_end && b_begin < a_end;
}

// Throws when `written` shares memory with `other`. The kernels write an output row while
// other threads still read their inputs (and a row's own inputs, tile by tile), so any
// overlap is a race with a wrong answer, not an error the kernel could notice. With
// `may_be_identical`, `written` may be exactly `other` (out == q: every output row is
// written after the last read of its own query row).
inline void require_disjoint(const FloatSpan& written, const FloatSpan& other, bool may_be_identical = false) {
  if (!spans_overlap(written, other)) return;
  if (may_be_identical && written.data == other.data && written.floats == other.floats) return;
  throw_invalid(written.name, " (", static_cast<const void*>(written.data), ", ", written.floats, " floats) overlaps ",
                other.name, " (", static_cast<const void*>(other.data), ", ", other.floats, " floats): ", written.name,
                " must not share memory with ", other.name, may_be_identical ? " unless it is exactly the same array" : "");
}

}  // namespace kvheads::detail
