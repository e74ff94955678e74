#!/usr/bin/env bash
# The main job: set up (if needed), then the tour of every op family: correctness against the
# references and speed against the baselines, with a table and a chart (tour-out/).
#   bash scripts/tour.sh [--quick] [--device cpu|cuda|all]
source "$(dirname "$0")/env.sh"
cd "$REPO"
exec "$PY" -m torch_ext --out "${TOUR_OUT:-$REPO/tour-out}" "$@"
