#pragma once
// Error reporting for the public boundary: every message names the bad value
// and what was expected, e.g. "kvheads: q_heads (12) must be a multiple of kv_heads (5)".
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

}  // namespace kvheads::detail
