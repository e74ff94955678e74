#!/usr/bin/env bash
# Compiles and links the CUDA kernels against a CUDA build of torch in its own environment; no
# GPU needed. Then loads the CUDA-enabled library into that torch, checks that the CUDA kernels
# registered, and runs the Python tests with it (the CPU cases; CUDA ones skip without a GPU).
#   bash scripts/build_cuda.sh [TORCH_VERSION [ARCHITECTURES]]
# TORCH_VERSION (or $TORCH_CUDA_VERSION): default 2.11.0, the oldest torch supported and exactly
# the GPU machine's (2.11.0+cu130 from PyPI), so the library built here loads there:
#   bash scripts/build_cuda.sh 2.11.0 90   ->  build/cuda-2.11.0/libtorch_ext.so (sm_90)
# ARCHITECTURES (or $TORCH_EXT_CUDA_ARCHITECTURES): CMake syntax, default "80;90".
# TORCH_EXT_CUDA_PYTEST=0: build and check the registration only. CI runs 2.11.0 in full for
# sm_90 and 2.14.1 (the other end of the supported range) for sm_80 without the tests.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_CUDA_VERSION="${1:-${TORCH_CUDA_VERSION:-2.11.0}}"
TORCH_EXT_CUDA_ARCHITECTURES="${2:-${TORCH_EXT_CUDA_ARCHITECTURES:-}}"
VENV="${TORCH_EXT_CUDA_VENV:-$REPO/.venv-cuda-$TORCH_CUDA_VERSION}"
if ! command -v nvcc >/dev/null; then
  echo "[cuda] nvcc not found: cannot compile the CUDA kernels here" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys, numpy, pytest, expecttest, torchmetrics, transformers; sys.exit(not (torch.__version__.startswith('$TORCH_CUDA_VERSION') and torch.version.cuda))" 2>/dev/null; then
  echo "[cuda] installing torch==$TORCH_CUDA_VERSION (CUDA build) and cmake"
  "$VENV/bin/pip" install -q "torch==$TORCH_CUDA_VERSION" numpy pytest expecttest torchmetrics \
    transformers==5.24.0 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
# CMake >= 3.28 knows nvcc's C++20 dialect, which torch >= 2.14 needs.
[ -x "$VENV/bin/cmake" ] || "$VENV/bin/pip" install -q "cmake>=3.28" 2>&1 | { grep -v "^WARNING: Location" || true; }
BUILD="$REPO/build/cuda-$TORCH_CUDA_VERSION"
"$VENV/bin/cmake" -S "$REPO" -B "$BUILD" -G Ninja -DTORCH_EXT_CUDA=ON -DTORCH_EXT_BUILD_TESTS=OFF \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  ${TORCH_EXT_CUDA_ARCHITECTURES:+-DTORCH_EXT_CUDA_ARCHITECTURES=$TORCH_EXT_CUDA_ARCHITECTURES} | grep "torch_ext"
"$VENV/bin/cmake" --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
TORCH_EXT_LIBRARY="$BUILD/libtorch_ext.so" PYTHONPATH="$REPO" "$PY" - <<'PY'
import torch, torch_ext
info = torch_ext.build_info()
assert "CUDA" in info["backends"], info
# The dispatcher is the list: every op with a CPU kernel of its own has a CUDA kernel too
# (composite ops have neither; tests/python/test_dispatcher.py checks the rest).
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torch_ext::")]
missing = [n for n in ops if has(n, "CPU") and not has(n, "CUDA")]
assert ops and not missing, f"ops without a CUDA kernel: {missing}"
print(f"[cuda] linked and loaded: {info['path']}: torch {info['torch']}, CUDA {info['cuda']}, "
      f"architectures {info['cuda_architectures']}; CUDA kernels registered")
PY
# The same library's CPU paths under this torch (CUDA cases skip: no GPU here);
# TORCH_EXT_CUDA_PYTEST=0 stops after the build and the registration check.
if [ "${TORCH_EXT_CUDA_PYTEST:-1}" = 0 ]; then
  exit 0
fi
echo "[cuda] pytest with the CUDA-enabled library under torch $("$PY" -c 'import torch; print(torch.__version__)')"
TORCH_EXT_LIBRARY="$BUILD/libtorch_ext.so" PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/python"
# A C++ consumer of this CUDA build (torch 2.14.1) that finds another torch (the CPU venv's) must
# get a clear configure error, not a link failure or a crash.
CPU_VENV="${TORCH_EXT_CPU_VENV:-$REPO/.venv}"
if [ -x "$CPU_VENV/bin/python" ]; then
  other_prefix="$("$CPU_VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  scratch="$BUILD/torch-mismatch"
  rm -rf "$scratch"
  "$VENV/bin/cmake" --install "$BUILD" --prefix "$scratch/prefix" >/dev/null
  if CMAKE_PREFIX_PATH="$scratch/prefix:$other_prefix" "$VENV/bin/cmake" -S "$REPO/tests/cpp/consumer" \
      -B "$scratch/build" -G Ninja >"$scratch/log" 2>&1; then
    echo "[cuda] FAILED: a consumer finding another torch configured without error" >&2
    exit 1
  fi
  # CMake wraps the message: join the lines before looking for it.
  tr -s ' \n' ' ' <"$scratch/log" | grep -q "was built against torch" \
    || { cat "$scratch/log" >&2; exit 1; }
  echo "[cuda] find_package(TorchExt) refuses another torch (built against $TORCH_CUDA_VERSION, found the CPU venv's): ok"
else
  echo "[cuda] note: no CPU venv at $CPU_VENV; the torch-mismatch check of find_package(TorchExt) is skipped"
fi
