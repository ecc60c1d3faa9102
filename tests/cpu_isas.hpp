#pragma once
// Which ISAs a test runs on this CPU, said out loud: Catch2 counts a test case that makes
// no assertion as passed, so an ISA skipped in silence would look tested. CI also sets
// KVHEADS_REQUIRE_ISAS, which turns a missing ISA into a failure (tests/test_simd.cpp).
#include <catch2/catch.hpp>

#include <kvheads/simd/simd.hpp>

namespace kvheads_test {

/// Whether this CPU runs Isa; warns when it does not, so the skip shows in the log.
template <class Isa>
bool cpu_runs() {
  if (kvheads::simd::cpu_supports<Isa>()) return true;
  WARN("this CPU cannot run " << Isa::name << ": its cases are skipped here");
  return false;
}

}  // namespace kvheads_test
