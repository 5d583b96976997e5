#!/usr/bin/env bash
# README command 2: set up (idempotent) and run the test suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/lib/usage.sh
help_if_asked "$0" "bash scripts/test.sh [pytest arguments, e.g. tests/test_report.py -k plot]" "$@"
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then . .venv/bin/activate; fi
python -m pytest -q "$@"
