#!/usr/bin/env bash
# On a GPU machine (torch with CUDA, nvcc, CMake, ninja, pytest; no network, no GoogleTest):
# run the tests (CUDA cases included), compute-sanitizer over every CUDA kernel, the CUDA
# benchmarks and an Nsight Compute summary of each of our kernels at the benchmark sizes
# (benchmarks/gpu_kernels.py under ncu, tabulated by benchmarks/ncu_table.py); print the short
# tables last and write JSON into OUT_DIR.
#   bash scripts/gpu_check.sh OUT_DIR
# The library: $TORCH_EXT_LIBRARY when it names an existing file (built elsewhere), else built
# here for sm_90 (~55 s). To skip that build, build on the 2-core machine against the GPU
# machine's torch (2.11.0+cu130 = `pip install torch==2.11.0`) and carry the file:
#   bash scripts/build_cuda.sh 2.11.0 90     # -> build/cuda-2.11.0/libtorch_ext.so (~8 MB)
#   device run, carry ["build/cuda-2.11.0"]:
#   TORCH_EXT_LIBRARY=build/cuda-2.11.0/libtorch_ext.so bash scripts/gpu_check.sh "$OUT"
# The tests run in parallel with pytest-xdist when it is installed (GPU_CHECK_JOBS, default 8).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-${OUT:-$REPO/gpu-out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUILD="$REPO/build/gpu"
start=$SECONDS
status=0

if [ -n "${TORCH_EXT_LIBRARY:-}" ] && [ -f "$TORCH_EXT_LIBRARY" ]; then
  LIBRARY="$(cd "$(dirname "$TORCH_EXT_LIBRARY")" && pwd)/$(basename "$TORCH_EXT_LIBRARY")"
  echo "== prebuilt library: $LIBRARY"
else
  echo "== build (sm_${TORCH_EXT_CUDA_ARCHITECTURES:-90})"
  cmake -S "$REPO" -B "$BUILD" -G Ninja -DTORCH_EXT_CUDA=ON -DTORCH_EXT_BUILD_TESTS=OFF \
    -DTORCH_EXT_CUDA_ARCHITECTURES="${TORCH_EXT_CUDA_ARCHITECTURES:-90}" \
    -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  grep "backends compiled" "$OUT/configure.log"
  cmake --build "$BUILD" -j "$(nproc)" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "   built in $((SECONDS - start)) s"
  LIBRARY="$BUILD/libtorch_ext.so"
fi
export TORCH_EXT_LIBRARY="$LIBRARY" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, torch_ext; print('  ', torch_ext.build_info()); \
print('   GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible')"

echo "== tests"
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_CHECK_JOBS:-8}")
"$PY" -m pytest -q -rfEs -p no:cacheprovider "${parallel[@]}" "$REPO/tests/python" \
  --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1 || status=1
tail -5 "$OUT/pytest.log"
echo "   tests done at $((SECONDS - start)) s"

echo "== compute-sanitizer: memcheck, racecheck, initcheck over every CUDA kernel"
# The fuzz test's valid calls on the GPU (tests/python/fuzz_cases.py, ids ending in @cuda): every
# CUDA op forward and backward on small odd shapes, each result checked against its reference.
if command -v compute-sanitizer >/dev/null; then
  mapfile -t cuda_cases < <("$PY" -c "import sys; sys.path.insert(0, '$REPO/tests/python'); \
import fuzz_cases; print('\n'.join(i for i in fuzz_cases.CASES if i.endswith('@cuda')))")
  for tool in memcheck racecheck initcheck; do
    log="$OUT/sanitizer-$tool.log"
    compute-sanitizer --tool "$tool" --error-exitcode 99 "$PY" "$REPO/tests/python/fuzz_cases.py" \
      "${cuda_cases[@]}" > "$log" 2>&1
    code=$?
    total=$(grep -c '"outcome"' "$log" | tr -d ' ')
    bad=$(grep '"outcome"' "$log" | grep -vc '"outcome": "\(ok\|clean-error\)"')
    if [ "$code" -ne 0 ] || [ "$bad" -ne 0 ]; then
      status=1
      echo "   $tool: FAILED (exit $code, $bad of $total cases not ok): $log"
      grep -m 5 "=========\|\"outcome\"" "$log" | grep -v '"outcome": "ok"' | head -5
    else
      echo "   $tool: clean over $total CUDA calls"
    fi
  done
else
  echo "   compute-sanitizer not found: skipped (status set to failure)"
  status=1
fi
echo "   compute-sanitizer done at $((SECONDS - start)) s"

echo "== benchmarks (CUDA)"
"$PY" "$REPO/benchmarks/run.py" --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
echo "   benchmarks done at $((SECONDS - start)) s"

echo "== Nsight Compute: each of our kernels at the benchmark sizes"
# One launch per kernel and case after a warm-up call (benchmarks/gpu_kernels.py runs the
# registry's cases); ncu profiles only kernels of namespace torch_ext, clocks left alone.
if command -v ncu >/dev/null; then
  metrics="gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed"
  metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed"
  metrics+=",sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread"
  timeout "${GPU_CHECK_NCU_TIMEOUT:-240}" ncu --clock-control none --target-processes all \
    --kernel-name-base demangled --kernel-name "regex:torch_ext" --metrics "$metrics" \
    --csv --page raw --log-file "$OUT/ncu.csv" \
    "$PY" "$REPO/benchmarks/gpu_kernels.py" > "$OUT/ncu-driver.log" 2>&1 || status=1
  "$PY" "$REPO/benchmarks/ncu_table.py" "$OUT/ncu.csv" --json "$OUT/ncu.json" > "$OUT/ncu.md" \
    || { status=1; tail -5 "$OUT/ncu-driver.log"; head -5 "$OUT/ncu.csv"; }
else
  echo "   ncu not found: skipped (status set to failure)"
  status=1
fi
echo "   Nsight Compute done at $((SECONDS - start)) s"

echo "== summary"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md" || tail -20 "$OUT/bench.log"
[ -s "$OUT/ncu.md" ] && cat "$OUT/ncu.md"
exit $status
