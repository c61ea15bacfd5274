#!/usr/bin/env bash
# The main job: set up a fresh machine, then run the parity report on the default device
# (CUDA if present, else CPU). Extra arguments go to `python -m fastres.parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${FASTRES_VENV:-.venv}/bin/activate"
FASTRES_COMMIT=${FASTRES_COMMIT:-$(bash scripts/commit.sh)} python -m fastres.parity "$@"
