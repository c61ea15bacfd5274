#!/usr/bin/env bash
# Prints the commit a run measures, for FASTRES_COMMIT: the checkout's sha, "+dirty" when tracked
# files have changes; "unknown" outside a git checkout. Results name it (the package reads no
# repository itself).
cd "$(dirname "$0")/.." || exit 0
sha=$(git rev-parse HEAD 2>/dev/null) || { echo unknown; exit 0; }
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  sha="$sha+dirty"
fi
echo "$sha"
