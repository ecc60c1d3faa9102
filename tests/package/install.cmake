# cmake -DBUILD_DIR=<build> -DPREFIX=<prefix> -DINCLUDEDIR=<rel> -DCMAKEDIR=<rel>
#       [-DCONFIG=<config>] -P install.cmake
#
# Installs the kvheads build tree into a fresh prefix, so the find_package consumer
# sees exactly what `cmake --install` ships and no leftovers from an earlier run.
foreach(var BUILD_DIR PREFIX INCLUDEDIR CMAKEDIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install.cmake: pass -D${var}=...")
  endif()
endforeach()

file(REMOVE_RECURSE "${PREFIX}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} failed (${result})")
endif()

foreach(file
    "${INCLUDEDIR}/kvheads/head_layout.hpp"
    "${CMAKEDIR}/kvheadsConfig.cmake"
    "${CMAKEDIR}/kvheadsConfigVersion.cmake"
    "${CMAKEDIR}/kvheadsTargets.cmake")
  if(NOT EXISTS "${PREFIX}/${file}")
    message(FATAL_ERROR "install.cmake: ${PREFIX}/${file} was not installed")
  endif()
endforeach()
