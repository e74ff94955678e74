#!/usr/bin/env bash
# Every test: set up (if needed), then the Python tests (pytest) and the C++ tests (GoogleTest
# through ctest, no Python in those processes). CUDA cases run where a GPU is present.
source "$(dirname "$0")/env.sh"
cd "$REPO"

echo "[test] pytest"
"$PY" -m pytest -q tests/python "$@"

echo "[test] C++ tests (ctest)"
BUILD="$REPO/build/cpp-tests"
cmake -S "$REPO" -B "$BUILD" -G Ninja -DTORCH_EXT_BUILD_TESTS=ON -DTORCH_EXT_CUDA=OFF \
  -DTORCH_EXT_PYTHON="$PY" \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$BUILD" --output-on-failure
