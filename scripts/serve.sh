#!/usr/bin/env bash
# Set up if needed, then start the server (default: embedded SmolLM2-135M-Instruct on 127.0.0.1:8000).
# Extra arguments go to `actserve serve`, e.g. scripts/serve.sh --model /path/to/hf-folder --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/actserve serve "$@"
