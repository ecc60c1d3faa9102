#pragma once
// Compile the attention kernels once instead of in every translation unit.
//
// kvheads is header-only, so every .cpp that calls attend() instantiates the fused kernel
// for each ISA and storage type it uses: dozens of head_dim x group_size specialisations,
// tens of seconds of compile time per file. A project with many such files can compile
// them once:
//
//   1. add KVHEADS_EXTERN_KERNELS to the compile definitions of every file that includes
//      kvheads (the headers then declare the kernels `extern template`), and
//   2. in one .cpp (or one per ISA, to build them in parallel) write
//        #include <kvheads/kernel_instances.hpp>
//        KVHEADS_INSTANTIATE_KERNELS(kvheads::simd::avx512)
//      once per ISA tag the program uses (kvheads::simd::default_isa at least), with
//      the same ISA compile flags as the rest of the program.
//
// KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, Storage) instantiates one storage type only
// (float, kvheads::bf16, kvheads::fp16 or std::int8_t), to spread the work over more files.
// The results are identical to the header-only build; only where the code is compiled changes.
#include <cstddef>
#include <cstdint>

#include "kvheads/core/fused_kernel.hpp"
#include "kvheads/simd/simd.hpp"
#include "kvheads/storage_types.hpp"

#define KVHEADS_DETAIL_KERNEL(prefix, Isa, Storage)                                                       \
  prefix template void ::kvheads::detail::dispatch_fused<Isa, Storage>(                                    \
      const ::kvheads::detail::AttendArgs<Storage>*, std::ptrdiff_t);

/// Explicit instantiation definition of the kernels of one ISA tag for one storage type.
#define KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, Storage) KVHEADS_DETAIL_KERNEL(, Isa, Storage)

/// Explicit instantiation definition of the kernels of one ISA tag, every storage type.
#define KVHEADS_INSTANTIATE_KERNELS(Isa)                  \
  KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, float)             \
  KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, ::kvheads::bf16)   \
  KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, ::kvheads::fp16)   \
  KVHEADS_INSTANTIATE_KERNELS_FOR(Isa, std::int8_t)

#define KVHEADS_DETAIL_EXTERN_KERNELS(Isa)                 \
  KVHEADS_DETAIL_KERNEL(extern, Isa, float)                \
  KVHEADS_DETAIL_KERNEL(extern, Isa, ::kvheads::bf16)      \
  KVHEADS_DETAIL_KERNEL(extern, Isa, ::kvheads::fp16)      \
  KVHEADS_DETAIL_KERNEL(extern, Isa, std::int8_t)

#if defined(KVHEADS_EXTERN_KERNELS)
// Declarations only: the definitions live in the files that use KVHEADS_INSTANTIATE_KERNELS.
KVHEADS_DETAIL_EXTERN_KERNELS(::kvheads::simd::scalar)
#if KVHEADS_SIMD_HAS_AVX2
KVHEADS_DETAIL_EXTERN_KERNELS(::kvheads::simd::avx2)
#endif
#if KVHEADS_SIMD_HAS_AVX512
KVHEADS_DETAIL_EXTERN_KERNELS(::kvheads::simd::avx512)
#endif
#if KVHEADS_SIMD_HAS_NEON
KVHEADS_DETAIL_EXTERN_KERNELS(::kvheads::simd::neon)
#endif
#endif
