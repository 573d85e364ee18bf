#!/usr/bin/env bash
# A plain `pip install .` (no extras, so no triton) in a fresh virtualenv must serve a model on the CPU:
# start `actserve serve` on TinyStories-656K, ask for a completion, check the answer, stop the server.
# CI runs this before the test suite; it takes a minute or two (pip's cache makes later runs faster).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv="$(mktemp -d)/venv"
log="$(dirname "$venv")/serve.log"
port="${ACTSERVE_CHECK_PORT:-18765}"
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$(dirname "$venv")"
}
trap cleanup EXIT
"$PY" -m venv "$venv"
# torch 2.13.0 is the CPU build on this project's machines; elsewhere pip's own torch
"$venv/bin/python" -m pip install -q "torch==2.13.0" 2>/dev/null || "$venv/bin/python" -m pip install -q torch
"$venv/bin/python" -m pip install -q .
# xgrammar (structured outputs) depends on triton on Linux x86_64; the CPU path must not import it, so
# remove it before serving (structured outputs included, below)
"$venv/bin/python" -m pip uninstall -q -y triton 2>/dev/null || true
if "$venv/bin/python" -c "import triton" 2>/dev/null; then
  echo "plain install: triton is installed, so this check proves nothing about the CPU path" >&2
  exit 1
fi
"$venv/bin/actserve" serve --model tests/data/tinystories-656k --port "$port" --device cpu >"$log" 2>&1 &
server=$!
"$venv/bin/python" - "$port" <<'PY'
import json, sys, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 120
while True:
    try:
        if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
            break
    except (urllib.error.URLError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit("plain install: server not healthy after 120 s")
    time.sleep(0.5)
body = json.dumps({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
text = reply["choices"][0]["text"]
assert reply["usage"]["completion_tokens"] == 8 and text.strip(), reply
body = json.dumps({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                   "guided_choice": ["yes", "no"]}).encode()
req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
choice = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
assert choice in ("yes", "no"), choice
print(f"plain install serves on the CPU without triton: {text!r}, guided_choice {choice!r}")
PY
