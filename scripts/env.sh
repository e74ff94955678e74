# Sourced by the other scripts: a virtual environment with the CPU build of torch and the
# project installed in editable mode (built by setup.py -> CMake). Idempotent and quick when
# nothing changed (ninja + ccache).
#   TORCH_EXT_VENV   where the environment lives (default: .venv in the repository)
#   TORCH_VERSION    the torch to build and test against (default 2.13.0, CPU wheel)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCH_EXT_VENV:-$REPO/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

need_apt=()
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v ccache >/dev/null || need_apt+=(ccache)
command -v cmake >/dev/null || need_apt+=(cmake)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[env] apt-get install ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# transformers pinned: the patches' tests follow its model classes, which change between releases.
TOOLS="numpy pytest expecttest matplotlib setuptools torchmetrics transformers==5.24.0"
if ! "$PY" -c "import torch, sys, numpy, pytest, expecttest, matplotlib, setuptools, torchmetrics, \
transformers; \
sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[env] installing torch==$TORCH_VERSION and the test/benchmark tools ($TOOLS)"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" $TOOLS 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
fi
echo "[env] building torch_ext (pip install --no-build-isolation -e .)"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$REPO" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
"$PY" -c "import torch_ext; print('[env] torch_ext', torch_ext.__version__, 'backends', torch_ext.compiled_backends())"
