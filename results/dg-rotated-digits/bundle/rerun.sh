#!/bin/sh
# Re-run study 'dg-rotated-digits' from this bundle: `harness run` on the bundled study file,
# against the storage the results came from.
#
# Re-running with the same storage resumes: completed trials are reused (nothing is searched
# again once the trial budget is spent), and only the final seeded runs that are missing are
# trained; then the leaderboard files are rewritten from the storage.
# To repeat everything, search included, point HARNESS_STORAGE at a new, empty storage and
# pass another --results-dir, e.g.
#   HARNESS_STORAGE=journal:////tmp/rerun.journal sh rerun.sh --results-dir /tmp/rerun
# Extra arguments are passed on to `harness run`; HARNESS names the harness executable.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
STORAGE=${HARNESS_STORAGE:-"journal:///$HERE/../optuna.journal"}
exec "${HARNESS:-harness}" run --study "$HERE/dg-rotated-digits.toml" --storage "$STORAGE" --results-dir "$HERE/../.." "$@"
