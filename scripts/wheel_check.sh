#!/usr/bin/env bash
# The wheel as pip users get it. Built with `pip wheel --no-build-isolation .` and with
# `python -m build --wheel --no-isolation` against the test environment's torch, it must name
# that torch (a `+torch<major><minor>` version label and an exact `torch==` requirement), pip
# must refuse it beside another torch, and, installed into a fresh virtual environment with the
# same torch (run from outside the source tree), the quick tour must pass. Used by CI.
source "$(dirname "$0")/env.sh"
cd "$REPO"
OUT="$REPO/build/wheel-check"
rm -rf "$OUT"
mkdir -p "$OUT"
fail() { echo "[wheel] FAILED: $*" >&2; exit 1; }

release=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
label="torch$(echo "$release" | cut -d. -f1,2 | tr -d .)"
# The wheel in $1 carries the +torchXY label and requires exactly this torch.
check_wheel() {
  local wheel=$1
  case "$(basename "$wheel")" in
    torch_ext-*+"$label"*) ;;
    *) fail "$(basename "$wheel") does not carry the +$label version label" ;;
  esac
  "$PY" - "$wheel" "$release" <<'PY' || fail "$(basename "$wheel") does not require torch==$release"
import sys, zipfile
wheel, release = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
assert requires == [f"Requires-Dist: torch=={release}"], requires
print(f"[wheel] {wheel.rsplit('/', 1)[-1]}: {requires[0]}")
PY
}

echo "[wheel] pip wheel --no-build-isolation ."
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps \
  -w "$OUT/dist" "$REPO" 2>&1 | { grep -v "^WARNING: Location" || true; }
wheel=$(ls "$OUT"/dist/torch_ext-*.whl)
check_wheel "$wheel"

# The PyPA front end as well (it builds in place too, so ccache and ninja make it quick). Run
# from $OUT: in the repository, `import build` would find the build/ folder instead.
(cd "$OUT" && "$PY" -c "import build.__main__") 2>/dev/null \
  || "$VENV/bin/pip" install -q build 2>&1 | { grep -v "^WARNING: Location" || true; }
echo "[wheel] python -m build --wheel --no-isolation"
(cd "$OUT" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m build --wheel --no-isolation \
  -o "$OUT/dist-build" "$REPO" > "$OUT/build.log" 2>&1) \
  || { tail -30 "$OUT/build.log"; fail "python -m build failed"; }
check_wheel "$(ls "$OUT"/dist-build/torch_ext-*.whl)"

other=2.14.1
[ "$release" = "$other" ] && other=2.13.0
if "$VENV/bin/pip" install --dry-run "$wheel" "torch==$other" >"$OUT/other-torch.log" 2>&1; then
  fail "pip would install the wheel beside torch $other"
fi
grep -q "conflict\|ResolutionImpossible\|Could not find" "$OUT/other-torch.log" \
  || { cat "$OUT/other-torch.log"; fail "pip did not refuse for the expected reason"; }
echo "[wheel] pip refuses it beside torch $other: ok"

echo "[wheel] fresh virtual environment: torch==$release, numpy, the wheel"
python3 -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install -q "torch==$release" numpy "$wheel" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
cd "$OUT"  # not the source tree: the installed package is what runs
"$OUT/venv/bin/python" -m torch_ext --quick --device cpu --no-compile --out "$OUT/tour" \
  > "$OUT/tour.log" 2>&1 || { tail -30 "$OUT/tour.log"; fail "the quick tour failed"; }
"$OUT/venv/bin/python" -c "import torch_ext, pathlib; \
assert pathlib.Path(torch_ext.__file__).is_relative_to('$OUT/venv'), torch_ext.__file__"
echo "[wheel] quick tour from the installed wheel: $(grep -c "checks passed" "$OUT/tour.log") families checked, passed"
