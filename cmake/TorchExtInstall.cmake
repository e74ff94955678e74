# `cmake --install` lays out the library, the public headers and a CMake package, so that another
# project does find_package(TorchExt REQUIRED) and links TorchExt::torch_ext (which brings torch).
include(CMakePackageConfigHelpers)

set(TORCH_EXT_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/TorchExt")

install(TARGETS torch_ext EXPORT TorchExtTargets
        LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
        RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
install(DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}/csrc/torch_ext"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}" FILES_MATCHING PATTERN "*.h")
install(EXPORT TorchExtTargets NAMESPACE TorchExt:: DESTINATION "${TORCH_EXT_CMAKE_DIR}")

configure_package_config_file("${CMAKE_CURRENT_SOURCE_DIR}/cmake/TorchExtConfig.cmake.in"
                              "${CMAKE_CURRENT_BINARY_DIR}/TorchExtConfig.cmake"
                              INSTALL_DESTINATION "${TORCH_EXT_CMAKE_DIR}")
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/TorchExtConfigVersion.cmake"
                                 COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/TorchExtConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/TorchExtConfigVersion.cmake"
        DESTINATION "${TORCH_EXT_CMAKE_DIR}")
