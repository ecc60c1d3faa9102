# kvheads_target_options(<target>)
#
# The build settings shared by our own tests, benchmarks and examples: warnings,
# and, per the KVHEADS_WERROR, KVHEADS_NATIVE and KVHEADS_SANITIZE options,
# -Werror, -march=native and sanitizers. Never applied to the kvheads library
# target itself: consumers pick their own flags.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

if(KVHEADS_NATIVE)
  if(CMAKE_CROSSCOMPILING)
    message(WARNING "kvheads: KVHEADS_NATIVE is ignored when cross-compiling "
      "(-march=native would describe the build machine, not the target)")
    set(_kvheads_use_native OFF)
  else()
    check_cxx_compiler_flag(-march=native KVHEADS_HAVE_MARCH_NATIVE)
    if(NOT KVHEADS_HAVE_MARCH_NATIVE)
      message(WARNING "kvheads: ${CMAKE_CXX_COMPILER_ID} does not accept -march=native; "
        "KVHEADS_NATIVE is ignored")
    endif()
    set(_kvheads_use_native ${KVHEADS_HAVE_MARCH_NATIVE})
  endif()
else()
  set(_kvheads_use_native OFF)
endif()

function(kvheads_target_options target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-)
    if(KVHEADS_WERROR)
      target_compile_options(${target} PRIVATE /WX)
    endif()
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(KVHEADS_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(_kvheads_use_native)
      target_compile_options(${target} PRIVATE -march=native)
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 12.3
         AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12)
        # GCC 12.0-12.2 (Debian 12's compiler) warns about its own AVX-512 intrinsics:
        # _mm512_undefined_*() is `__m512 __Y = __Y;` by design, and once inlined (e.g.
        # in Eigen's GEMM) -Wall reports "'__Y' may be used uninitialized".
        # https://gcc.gnu.org/bugzilla/show_bug.cgi?id=105593, fixed in 12.3.
        target_compile_options(${target} PRIVATE
          -Wno-maybe-uninitialized -Wno-error=uninitialized)
      endif()
    endif()
    if(KVHEADS_SANITIZE)
      # -fno-sanitize-recover makes every UBSan report fatal, so a finding fails
      # the test even without UBSAN_OPTIONS=halt_on_error=1.
      set(_flags -fsanitize=${KVHEADS_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
      target_compile_options(${target} PRIVATE ${_flags})
      target_link_options(${target} PRIVATE ${_flags})
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
        # GCC's flow analysis reports false "may be used uninitialized" inside
        # instrumented libstdc++ code (std::regex in Catch2's main), which would
        # break KVHEADS_WERROR builds for no fault of ours.
        target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized)
      endif()
    endif()
  endif()
endfunction()
