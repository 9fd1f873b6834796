#!/usr/bin/env bash
# The runs behind BENCHMARKS.md, one after the other (never two benchmarks at once on a
# shared machine). LLAMA_SERVER, GGUF_BF16 and GGUF_F32 point at a llama.cpp build and the
# demo checkpoint converted with its convert_hf_to_gguf.py (see BENCHMARKS.md); without
# them the llama.cpp column is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench}
YUN=${YUN:-.venv/bin/yun}
peers() {  # peers for a GGUF file (or none)
  if [ -n "${LLAMA_SERVER:-}" ] && [ -n "${1:-}" ]; then
    echo "--compare transformers,llama.cpp --llama-server $LLAMA_SERVER --gguf $1"
  else
    echo "--compare transformers"
  fi
}
run() { echo "### yun bench throughput $*"; "$YUN" bench throughput --no-progress --output-dir "$OUT" "$@"; }

# shellcheck disable=SC2046
run --workload single --dtype bfloat16 $(peers "${GGUF_BF16:-}")
# shellcheck disable=SC2046
run --workload single --dtype float32 $(peers "${GGUF_F32:-}")
# transformers: static batches of 16 (its faster batched mode here; --transformers-mode
# best also runs its continuous batching, about 3x slower on this workload)
# shellcheck disable=SC2046
run --workload mixed --dtype bfloat16 --transformers-mode static $(peers "${GGUF_BF16:-}")
run --workload shared-prefix --dtype bfloat16
run --workload shared-prefix --dtype bfloat16 --no-prefix-caching
run --workload sweep --dtype bfloat16 --scale 0.5
