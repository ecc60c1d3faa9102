# Cross-compiles for 64-bit Arm Linux with Debian's g++-aarch64-linux-gnu and runs the
# resulting binaries (ctest, try_run) under qemu-user, so the NEON path is built and
# tested on an x86 machine:
#   apt-get install -y g++-aarch64-linux-gnu qemu-user
#   cmake -S . -B build-arm -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64.cmake
#   cmake --build build-arm && ctest --test-dir build-arm
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(KVHEADS_AARCH64_TRIPLE aarch64-linux-gnu CACHE STRING "GNU triple of the aarch64 cross toolchain")
set(CMAKE_C_COMPILER ${KVHEADS_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${KVHEADS_AARCH64_TRIPLE}-g++)

# The target's libraries and headers (libc, libstdc++) live under this sysroot-like prefix.
set(KVHEADS_AARCH64_PREFIX /usr/${KVHEADS_AARCH64_TRIPLE} CACHE PATH "Prefix of the aarch64 target libraries")
set(CMAKE_FIND_ROOT_PATH ${KVHEADS_AARCH64_PREFIX})
# Programs (qemu, code generators) come from the build machine and compiled libraries
# only from the target prefix. Headers and package configs are looked for in the
# target prefix first, then on the build machine: the header-only dependencies
# (Eigen3, Catch2) are architecture-independent and installed only there.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# qemu-user runs the test binaries; -L points its dynamic loader at the target libraries.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;${KVHEADS_AARCH64_PREFIX})
