#!/usr/bin/env bash
# Compiles and links the CUDA kernels against a CUDA build of torch (2.14.1+cu130 by default) in
# its own environment; no GPU needed. Then loads the CUDA-enabled library into that torch and
# checks that the CUDA kernels registered. Used by CI; a GPU machine uses scripts/gpu_check.sh.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${TORCH_EXT_CUDA_VENV:-$REPO/.venv-cuda}"
TORCH_CUDA_VERSION="${TORCH_CUDA_VERSION:-2.14.1}"
if ! command -v nvcc >/dev/null; then
  echo "[cuda] nvcc not found: cannot compile the CUDA kernels here" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys, numpy, pytest, expecttest, torchmetrics, transformers; sys.exit(not (torch.__version__.startswith('$TORCH_CUDA_VERSION') and torch.version.cuda))" 2>/dev/null; then
  echo "[cuda] installing torch==$TORCH_CUDA_VERSION (CUDA build) and cmake"
  "$VENV/bin/pip" install -q "torch==$TORCH_CUDA_VERSION" numpy pytest expecttest torchmetrics \
    transformers 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
# CMake >= 3.28 knows nvcc's C++20 dialect, which torch >= 2.14 needs.
[ -x "$VENV/bin/cmake" ] || "$VENV/bin/pip" install -q "cmake>=3.28" 2>&1 | { grep -v "^WARNING: Location" || true; }
BUILD="$REPO/build/cuda"
"$VENV/bin/cmake" -S "$REPO" -B "$BUILD" -G Ninja -DTORCH_EXT_CUDA=ON -DTORCH_EXT_BUILD_TESTS=OFF \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  ${TORCH_EXT_CUDA_ARCHITECTURES:+-DTORCH_EXT_CUDA_ARCHITECTURES=$TORCH_EXT_CUDA_ARCHITECTURES} | grep "torch_ext"
"$VENV/bin/cmake" --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
TORCH_EXT_LIBRARY="$BUILD/libtorch_ext.so" PYTHONPATH="$REPO" "$PY" - <<'PY'
import torch, torch_ext
info = torch_ext.build_info()
assert "CUDA" in info["backends"], info
for op in ("_spp_forward", "_spp_backward", "sppf", "_sppf_backward", "confusion_matrix",
           "_confusion_matrix_accumulate", "_dilated_conv2d_forward", "_dilated_conv2d_backward",
           "_dilated_conv2d_route", "_unpad_plan", "index_first_axis", "index_put_first_axis",
           "cu_seqlens_from_position_ids"):
    assert torch_ext.has_kernel(op, "CUDA"), op
print(f"[cuda] linked and loaded: {info['path']}: torch {info['torch']}, CUDA {info['cuda']}, "
      f"architectures {info['cuda_architectures']}; CUDA kernels registered")
PY
# The same library's CPU paths under this torch (CUDA cases skip: no GPU here).
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
