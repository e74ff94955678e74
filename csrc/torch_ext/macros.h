#pragma once

// Symbols of libtorch_ext.so that C++ users call.
#if defined(_WIN32)
#if defined(TORCH_EXT_BUILDING_LIBRARY)
#define TORCH_EXT_API __declspec(dllexport)
#else
#define TORCH_EXT_API __declspec(dllimport)
#endif
#else
#define TORCH_EXT_API __attribute__((visibility("default")))
#endif
