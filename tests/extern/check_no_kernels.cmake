# cmake -DNM=<nm> -DOBJECTS=<a;b;...> -P check_no_kernels.cmake
# Fails when an object file defines a kernel function: with KVHEADS_EXTERN_KERNELS, files
# that call attend() or run an Attention layer must leave every kernel to the one file
# that instantiates them (include/kvheads/kernel_instances.hpp).
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" --defined-only --demangle "${object}"
                  OUTPUT_VARIABLE symbols RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "kvheads: ${NM} failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]*kvheads::detail::(run_fused_batch|dispatch_fused|dispatch_group|FusedTask|qk_by_|pv_by_)[^\n]*"
         kernels "${symbols}")
  if(kernels)
    list(LENGTH kernels count)
    list(GET kernels 0 first)
    message(FATAL_ERROR "kvheads: ${object} defines ${count} kernel symbols, e.g.\n  ${first}")
  endif()
endforeach()
message(STATUS "kvheads: no kernel symbols in ${OBJECTS}")
