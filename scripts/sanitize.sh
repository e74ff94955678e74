#!/usr/bin/env bash
# The library and the C++ tests built with AddressSanitizer + UndefinedBehaviorSanitizer, the
# C++ tests run, then the Python tests run against that library (the sanitizer runtime preloaded
# into the interpreter, leak detection off: the interpreter and torch keep memory until exit).
# Any report aborts the process that made it, so the run fails. Used by CI; CPU code only (the
# CUDA kernels go through compute-sanitizer in scripts/gpu_check.sh).
#   bash scripts/sanitize.sh [pytest arguments]
source "$(dirname "$0")/env.sh"
cd "$REPO"

BUILD="$REPO/build/sanitize"
cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTORCH_EXT_SANITIZE="address;undefined" -DTORCH_EXT_CUDA=OFF -DTORCH_EXT_BUILD_TESTS=ON \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
echo "[sanitize] building the library and the C++ tests with -fsanitize=address,undefined"
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"

# allocator_may_return_null: a request too large to serve is a clean allocation error in torch
# (as without ASan), not an ASan abort; the tests ask for such sizes on purpose.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

echo "[sanitize] C++ tests (the out-of-tree consumers build without sanitizers: not run here)"
ctest --test-dir "$BUILD" --output-on-failure -E "InstalledPackageConsumer|ExamplesOutOfTree"

echo "[sanitize] Python tests against $BUILD/libtorch_ext.so"
# libstdc++ preloaded too: the interpreter does not link it, and ASan's interceptor of C++ throws
# must find it when the runtime starts (else every exception is "CHECK failed ... cxa_throw").
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" TORCH_EXT_LIBRARY="$BUILD/libtorch_ext.so" \
  "$PY" -m pytest -q -p no:cacheprovider tests/python "$@"
