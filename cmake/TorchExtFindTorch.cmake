# Finds LibTorch (through the installed torch's CMake prefix) and decides whether CUDA kernels are
# built. Sets TORCH_EXT_WITH_CUDA and TORCH_EXT_TORCH_VERSION.
#
# A CUDA build of torch makes its own CMake config enable the CUDA language and look for cuDNN.
# The cuDNN that torch's pip wheels use lives in site-packages/nvidia/cudnn; point CMake at it
# when the caller did not, so configuring against a pip-installed CUDA torch needs no extra flags.

include(CheckLanguage)

if(NOT TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  # Keeps torch's CMake from guessing architectures (it detects a GPU, or lists them all);
  # the architectures we compile are the target property set from TORCH_EXT_CUDA_ARCHITECTURES.
  set(TORCH_CUDA_ARCH_LIST "9.0")
endif()

# The CUDA toolkit's root. torch's CMake (FindCUDA) derives it from nvcc's location, which is
# wrong when nvcc on PATH is a wrapper script (/usr/local/bin/nvcc); look for the real root.
if(NOT TORCH_EXT_CUDA STREQUAL "OFF" AND NOT CUDA_TOOLKIT_ROOT_DIR)
  find_program(_torch_ext_nvcc_on_path nvcc)
  set(_candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}")
  if(_torch_ext_nvcc_on_path)
    get_filename_component(_nvcc_real "${_torch_ext_nvcc_on_path}" REALPATH)
    get_filename_component(_nvcc_root "${_nvcc_real}/../.." ABSOLUTE)
    list(APPEND _candidates "${_nvcc_root}")
  endif()
  list(APPEND _candidates "/usr/local/cuda")
  foreach(_root IN LISTS _candidates)
    if(_root AND EXISTS "${_root}/include/cuda_runtime.h" AND EXISTS "${_root}/bin/nvcc")
      set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit root")
      break()
    endif()
  endforeach()
endif()
# On every configure, not only the first (the root is cached): without the hint, a re-configure
# finds the wrapper nvcc on PATH, CMake sees another CUDA compiler and discards the cache.
if(NOT TORCH_EXT_CUDA STREQUAL "OFF" AND CUDA_TOOLKIT_ROOT_DIR)
  set(CUDAToolkit_ROOT "${CUDA_TOOLKIT_ROOT_DIR}")
  if(NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER "${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc")
  endif()
endif()

set(_torch_ext_nvcc_found OFF)
if(NOT TORCH_EXT_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(_torch_ext_nvcc_found ON)
  endif()
endif()

# Where does torch live? Used to find the pip wheels' cuDNN next to it.
foreach(_prefix IN LISTS CMAKE_PREFIX_PATH)
  if(EXISTS "${_prefix}/Torch/TorchConfig.cmake")
    get_filename_component(_torch_site "${_prefix}/../../.." ABSOLUTE)
  endif()
endforeach()
if(_torch_site AND EXISTS "${_torch_site}/nvidia/cudnn/include/cudnn.h")
  if(NOT CUDNN_INCLUDE_PATH)
    set(CUDNN_INCLUDE_PATH "${_torch_site}/nvidia/cudnn/include" CACHE PATH "cuDNN headers")
  endif()
  if(NOT CUDNN_LIBRARY_PATH)
    file(GLOB _cudnn_libs "${_torch_site}/nvidia/cudnn/lib/libcudnn.so*")
    if(_cudnn_libs)
      list(GET _cudnn_libs 0 _cudnn_lib)
      set(CUDNN_LIBRARY_PATH "${_cudnn_lib}" CACHE FILEPATH "cuDNN library")
    endif()
  endif()
endif()

# The version of torch we build against, recorded in the library (see build_info.h.in).
if(_torch_site AND EXISTS "${_torch_site}/torch/version.py")
  file(STRINGS "${_torch_site}/torch/version.py" _ver_line REGEX "^__version__")
  string(REGEX REPLACE "^__version__ *= *['\"]([^'\"]+)['\"].*" "\\1" TORCH_EXT_TORCH_VERSION
         "${_ver_line}")
endif()

# torch >= 2.14 headers need C++20; older ones are compiled as C++17, which also spares CUDA
# builds the CUDA20 dialect that CMake learned only in 3.28 (pip install cmake when needed).
# Set before find_package(Torch): its CMake copies the C++ standard into CMAKE_CUDA_STANDARD.
if(NOT CMAKE_CXX_STANDARD)
  string(REGEX REPLACE "[+].*" "" _torch_base_version "${TORCH_EXT_TORCH_VERSION}")
  if(_torch_base_version AND _torch_base_version VERSION_LESS "2.14")
    set(CMAKE_CXX_STANDARD 17)
  else()
    set(CMAKE_CXX_STANDARD 20)
  endif()
endif()
set(CMAKE_CXX_STANDARD_REQUIRED ON)

# torch links NVRTC; a minimal toolkit may lack it, while torch's own wheels ship it.
if(_torch_site AND NOT CUDA_nvrtc_LIBRARY)
  file(GLOB _nvrtc_libs "${_torch_site}/nvidia/*/lib/libnvrtc.so*")
  list(FILTER _nvrtc_libs EXCLUDE REGEX "builtins|alt")
  if(_nvrtc_libs AND NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64/libnvrtc.so")
    list(GET _nvrtc_libs 0 _nvrtc_lib)
    set(CUDA_nvrtc_LIBRARY "${_nvrtc_lib}" CACHE FILEPATH "NVRTC library")
  endif()
endif()

find_package(Torch REQUIRED)

# torch's config enables CUDA only when torch itself is a CUDA build.
set(TORCH_EXT_WITH_CUDA OFF)
if(TORCH_CUDA_LIBRARIES AND _torch_ext_nvcc_found AND CMAKE_CUDA_COMPILER)
  set(TORCH_EXT_WITH_CUDA ON)
endif()
if(TORCH_EXT_CUDA STREQUAL "ON" AND NOT TORCH_EXT_WITH_CUDA)
  message(FATAL_ERROR "TORCH_EXT_CUDA=ON but CUDA kernels cannot be built: "
                      "torch CUDA build: ${TORCH_CUDA_LIBRARIES}; nvcc: ${CMAKE_CUDA_COMPILER}")
endif()

if(NOT TORCH_EXT_TORCH_VERSION)
  set(TORCH_EXT_TORCH_VERSION "${Torch_VERSION}")
endif()
