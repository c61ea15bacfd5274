#!/usr/bin/env bash
# The test command: set up a fresh machine (scripts/setup_env.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k blocks -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${FASTRES_VENV:-.venv}/bin/activate"
python -m pytest tests "$@"
