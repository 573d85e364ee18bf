#!/usr/bin/env bash
# Set up if needed, lint, then run the whole test suite (CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
lint-imports
python -m pytest -q "$@"
