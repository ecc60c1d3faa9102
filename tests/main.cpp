// Catch2's main for the kvheads test binary; every tests/test_*.cpp links into it.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
