#pragma once

// Helpers shared by the C++ tests.

#include <c10/util/Exception.h>

#include <string>

// The message of the c10::Error that f throws, or a marker when it throws none.
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "<no c10::Error thrown>";
}
