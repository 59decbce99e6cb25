# CTest install_consumer (tests/CMakeLists.txt): stage `cmake --install` of this build into a folder of the build
# tree, then configure, build and run tests/install/consumer (an outside project: find_package(switchyard)) against
# it, with the build's generator, compiler and prefix path. Everything happens in this one test, in its own folder,
# so it cannot race with the other tests under ctest -j.
#   cmake -DSETTINGS=<build>/tests/install_consumer/settings.cmake -DCONFIG=<config> -P run_consumer.cmake
cmake_minimum_required(VERSION 3.24)
if(NOT SETTINGS OR NOT EXISTS "${SETTINGS}")
  message(FATAL_ERROR "run_consumer.cmake: pass -DSETTINGS=<settings.cmake written by tests/CMakeLists.txt>")
endif()
include("${SETTINGS}")  # SY_BUILD_DIR SY_WORK_DIR SY_CONSUMER_DIR SY_GENERATOR SY_MAKE_PROGRAM SY_CXX_COMPILER
                        # SY_CXX_FLAGS SY_EXE_LINKER_FLAGS SY_INSTALL_LIBDIR SY_INSTALL_INCLUDEDIR SY_PREFIX_PATH
                        # SY_WITH_CUDA SY_CUDA_ROOT
if(NOT CONFIG)
  set(CONFIG Release)
endif()

set(prefix "${SY_WORK_DIR}/prefix")
set(cbuild "${SY_WORK_DIR}/consumer-build")
file(REMOVE_RECURSE "${prefix}" "${cbuild}")

function(step what)
  message(STATUS "install_consumer: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc COMMAND_ECHO STDOUT)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: ${what} failed (${rc})")
  endif()
endfunction()

# 1. The install, staged.
step("install the build into ${prefix}"
     "${CMAKE_COMMAND}" --install "${SY_BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}")
foreach(f ${SY_INSTALL_INCLUDEDIR}/switchyard/switchyard.h ${SY_INSTALL_LIBDIR}/cmake/switchyard/switchyardConfig.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    file(GLOB_RECURSE _all RELATIVE "${prefix}" "${prefix}/*")
    message(FATAL_ERROR "install_consumer: ${f} not installed; the prefix holds: ${_all}")
  endif()
endforeach()
file(GLOB_RECURSE _cli_support "${prefix}/*switchyard_cli_support*")
if(_cli_support)
  message(FATAL_ERROR "install_consumer: the CLI's support library must not be installed: ${_cli_support}")
endif()

# 2. The outside project, configured against the staged prefix (plus where the build found its dependencies), with
# the build's compiler flags (a sanitizer build needs them at link time too). Lists and flags go through an
# initial-cache file, not a command line.
set(init "${SY_WORK_DIR}/consumer-init.cmake")
file(WRITE "${init}" "set(CMAKE_PREFIX_PATH [==[${prefix};${SY_PREFIX_PATH}]==] CACHE STRING \"\")
set(CMAKE_CXX_FLAGS [==[${SY_CXX_FLAGS}]==] CACHE STRING \"\")
set(CMAKE_EXE_LINKER_FLAGS [==[${SY_EXE_LINKER_FLAGS}]==] CACHE STRING \"\")
")
set(args -C "${init}" -S "${SY_CONSUMER_DIR}" -B "${cbuild}" -G "${SY_GENERATOR}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
         "-DCMAKE_CXX_COMPILER=${SY_CXX_COMPILER}" "-DSWITCHYARD_EXPECT_CUDA=${SY_WITH_CUDA}")
if(SY_MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${SY_MAKE_PROGRAM}")
endif()
if(SY_WITH_CUDA AND SY_CUDA_ROOT)
  list(APPEND args "-DCUDAToolkit_ROOT=${SY_CUDA_ROOT}")
endif()
step("configure the consumer" "${CMAKE_COMMAND}" ${args})
file(STRINGS "${cbuild}/CMakeCache.txt" _dir REGEX "^switchyard_DIR:")
string(REGEX REPLACE "^[^=]*=" "" _dir "${_dir}")
file(REAL_PATH "${_dir}" _dir)
file(REAL_PATH "${prefix}" _real_prefix)
string(FIND "${_dir}/" "${_real_prefix}/" _at)
if(NOT _at EQUAL 0)
  message(FATAL_ERROR "install_consumer: the consumer found switchyard in ${_dir}, not in the staged ${prefix}")
endif()

# 3. Build, 4. run (one CPU forward).
step("build the consumer" "${CMAKE_COMMAND}" --build "${cbuild}" --config "${CONFIG}")
set(exe "${cbuild}/consumer")
if(NOT EXISTS "${exe}")
  set(exe "${cbuild}/${CONFIG}/consumer")  # multi-config generators
endif()
step("run the consumer" "${exe}")
message(STATUS "install_consumer: passed")
