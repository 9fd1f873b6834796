#!/usr/bin/env bash
# The runs behind BENCHMARKS.md, one after the other (never two benchmarks at once on a
# shared machine). LLAMA_SERVER and GGUF_BF16 point at a llama.cpp build and the demo
# checkpoint converted with its convert_hf_to_gguf.py (see BENCHMARKS.md); without them
# the llama.cpp column is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
YUN=${YUN:-.venv/bin/yun}
LLAMA=()
if [ -n "${LLAMA_SERVER:-}" ] && [ -n "${GGUF_BF16:-}" ]; then
  LLAMA=(--llama-server "$LLAMA_SERVER" --gguf "$GGUF_BF16")
  PEERS=transformers,llama.cpp
else
  PEERS=transformers
fi
run() { echo "### $*"; "$YUN" bench throughput --no-progress --output-dir "$OUT" "$@"; }

run --workload single --dtype bfloat16 --compare "$PEERS" "${LLAMA[@]}"
run --workload single --dtype float32 --compare transformers
run --workload mixed --num-requests 16 --dtype bfloat16 --compare "$PEERS" "${LLAMA[@]}"
run --workload shared-prefix --num-requests 16 --dtype bfloat16
run --workload shared-prefix --num-requests 16 --dtype bfloat16 --no-prefix-caching
run --workload sweep --num-requests 16 --concurrency-levels 1,2,4,8,16 --scale 0.5 --dtype bfloat16
