#!/usr/bin/env bash
# llama.cpp's tools for the GGUF tests and benchmarks, from llama.cpp's own source:
#   $YUN_LLAMA_CPP_DIR/convert_hf_to_gguf.py, gguf-py/   (HF folder -> GGUF)
#   $YUN_LLAMA_CPP_DIR/build/bin/llama-quantize          (GGUF -> Q4_K_M, Q8_0, ...)
# YUN_LLAMA_CPP_DIR defaults to ~/.cache/yun/llama.cpp. The source is the llama.cpp that
# llama-cpp-python==$VERSION vendors (its sdist on PyPI, the one registry we reach); only
# the llama-quantize target is built, for any x86-64 (GGML_NATIVE=OFF), on $JOBS cores.
# Idempotent: what is already there is kept (~5 min for a fresh build on 2 cores).
set -euo pipefail

VERSION=0.3.36
DIR="${YUN_LLAMA_CPP_DIR:-$HOME/.cache/yun/llama.cpp}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
QUANTIZE="$DIR/build/bin/llama-quantize"
TMP=""  # the download folder, removed on any exit
trap 'if [ -n "$TMP" ]; then rm -rf "$TMP"; fi' EXIT

say() { echo "llama_cpp_tools: $*"; }

fetch_source() {
    if [ -f "$DIR/convert_hf_to_gguf.py" ] && [ -d "$DIR/gguf-py" ]; then
        say "source: $DIR already there"
        return
    fi
    if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
        say "error: $DIR exists but has no convert_hf_to_gguf.py or gguf-py; move it away" >&2
        exit 1
    fi
    local start=$SECONDS parent
    parent="$(dirname "$DIR")"
    mkdir -p "$parent"
    TMP="$(mktemp -d "$parent/.llama.cpp-XXXXXX")"  # same file system: the move is atomic
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        --dest "$TMP" "llama-cpp-python==$VERSION"
    tar -xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
    rmdir "$DIR" 2>/dev/null || true  # an empty folder left by hand
    mv "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR"
    say "source: llama-cpp-python==$VERSION sdist -> vendor/llama.cpp -> $DIR ($((SECONDS - start)) s)"
}

build_quantize() {
    if [ -x "$QUANTIZE" ]; then
        say "llama-quantize: $QUANTIZE already built"
        return
    fi
    local start=$SECONDS log="$DIR/build/yun-build.log"
    mkdir -p "$DIR/build"
    say "building llama-quantize (GGML_NATIVE=OFF, -j$JOBS) in $DIR/build ..."
    cmake -S "$DIR" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > "$log" 2>&1 \
        || { tail -n 50 "$log" >&2; exit 1; }
    cmake --build "$DIR/build" --target llama-quantize -j "$JOBS" >> "$log" 2>&1 \
        || { tail -n 50 "$log" >&2; exit 1; }
    say "llama-quantize: built $QUANTIZE ($((SECONDS - start)) s; log: $log)"
}

fetch_source
build_quantize
