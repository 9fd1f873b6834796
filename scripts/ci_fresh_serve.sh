#!/usr/bin/env bash
# README's first command, `make serve`, the way a newcomer meets it:
#   1. a fresh venv with the runtime dependencies only (`make setup VENV=...`, no test
#      extras: what a runtime install lacks shows up here, not in the test suite's .venv);
#   2. import every yun module in it (a module whose optional extra is not installed,
#      like yun.distributed.ray_replicas without ray, may fail on that extra alone);
#   3. `make serve` on a free loopback port, until /health answers (bounded);
#   4. one chat completion ("Tell me the capital of France.", greedy, 32 tokens): a
#      well-formed chat.completion with non-empty content, containing EXPECTED_WORD
#      (case-insensitive) if one is given, e.g. Paris for a real default model;
#   5. stop the server (its whole process group) on every exit path.
# Usage: scripts/ci_fresh_serve.sh [EXPECTED_WORD]
# Env: YUN_FRESH_VENV (default /tmp/yun-fresh-venv; removed first), YUN_FRESH_CACHE (the
# server's YUN_CACHE, default ~/.cache/yun-fresh-serve: kept, so later runs reuse its
# native kernels; in ~/.cache/yun the test suite's .venv, whose torch lies elsewhere,
# would rebuild them and this venv would rebuild them back), YUN_HEALTH_TIMEOUT (default
# 600 s: a first start builds the native kernels), YUN_CHAT_TIMEOUT (default 300 s).
set -euo pipefail
cd "$(dirname "$0")/.."

EXPECT="${1:-}"
VENV="${YUN_FRESH_VENV:-/tmp/yun-fresh-venv}"
HEALTH_TIMEOUT="${YUN_HEALTH_TIMEOUT:-600}"
export YUN_CACHE="${YUN_FRESH_CACHE:-$HOME/.cache/yun-fresh-serve}"
CHAT_TIMEOUT="${YUN_CHAT_TIMEOUT:-300}"
PY="$VENV/bin/python"
WORK="$(mktemp -d /tmp/yun-fresh-serve-XXXXXX)"
LOG="$WORK/server.log"
SERVER_PGID=""
T0=$SECONDS

say() { echo "ci_fresh_serve: $*"; }
step() { say "$1: $(( SECONDS - $2 )) s"; }

stop_server() {
    [ -n "$SERVER_PGID" ] || return 0
    kill -TERM -- "-$SERVER_PGID" 2>/dev/null || true
    for _ in $(seq 20); do  # 10 s to shut down cleanly, then SIGKILL
        kill -0 -- "-$SERVER_PGID" 2>/dev/null || { SERVER_PGID=""; return 0; }
        sleep 0.5
    done
    kill -KILL -- "-$SERVER_PGID" 2>/dev/null || true
    SERVER_PGID=""
}

fail() {
    say "FAILED: $*" >&2
    if [ -s "$LOG" ]; then
        say "server log ($LOG), last 100 lines:" >&2
        tail -n 100 "$LOG" >&2
    fi
    exit 1
}

trap 'stop_server; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM  # through the EXIT trap: the server never outlives us

# 1. set-up, as `make serve` does it on first use, into a venv of its own
t=$SECONDS
rm -rf "$VENV"
make --no-print-directory setup VENV="$VENV" < /dev/null
step "fresh venv (make setup VENV=$VENV)" "$t"
if "$PY" -m pip show --quiet pytest 2>/dev/null; then
    fail "$VENV has pytest: the fresh venv must hold the runtime dependencies only"
fi

# 2. every module imports with the runtime dependencies alone
t=$SECONDS
"$PY" - <<'EOF' || fail "a yun module does not import with the runtime dependencies alone"
import importlib, pkgutil, sys
import yun

OPTIONAL = {"yun.distributed.ray_replicas": "ray"}  # module -> the extra's import name
failed, skipped, count = [], [], 0

def broken(name):
    failed.append(name)
    print(f"  cannot import {name}: {sys.exc_info()[1]!r}", file=sys.stderr)

for info in pkgutil.walk_packages(yun.__path__, "yun.", onerror=broken):
    try:
        importlib.import_module(info.name)
        count += 1
    except ModuleNotFoundError as e:
        if OPTIONAL.get(info.name) == (e.name or "").split(".")[0]:
            skipped.append(f"{info.name} (needs {e.name})")
        else:
            broken(info.name)
    except Exception:
        broken(info.name)
print(f"ci_fresh_serve: imported {count} yun modules"
      + (f"; skipped {', '.join(skipped)}" if skipped else ""))
sys.exit(1 if failed else 0)
EOF
step "import every yun module" "$t"

# 3. serve on a free port, in a process group of its own
t=$SECONDS
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
setsid make --no-print-directory serve VENV="$VENV" ARGS="--port $PORT" < /dev/null > "$LOG" 2>&1 &
SERVER_PID=$!
SERVER_PGID=$SERVER_PID  # setsid in a non-interactive shell: the job is its own group leader
say "yun serve (pid $SERVER_PID) on $BASE, log $LOG"
until curl -sf -o /dev/null "$BASE/health"; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited before /health answered"
    (( SECONDS - t < HEALTH_TIMEOUT )) || fail "/health did not answer within $HEALTH_TIMEOUT s"
    sleep 1
done
step "server up (start to /health 200)" "$t"
grep '^yun:' "$LOG" | head -n 5 || true  # what it serves, with which kernels

# 4. one chat completion, checked
t=$SECONDS
MODEL="$(curl -sf "$BASE/v1/models" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')" \
    || fail "/v1/models did not list a model"
BODY="$("$PY" -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "temperature": 0,
    "max_tokens": 32, "messages": [{"role": "user", "content": "Tell me the capital of France."}]}))' "$MODEL")"
REPLY="$WORK/reply.json"
curl -sS --max-time "$CHAT_TIMEOUT" -o "$REPLY" -w '%{http_code}\n' \
    -H 'Content-Type: application/json' -d "$BODY" "$BASE/v1/chat/completions" > "$WORK/status" \
    || fail "the chat completion request failed"
[ "$(cat "$WORK/status")" = 200 ] || fail "chat completion: HTTP $(cat "$WORK/status"): $(cat "$REPLY")"
"$PY" - "$REPLY" "$EXPECT" <<'EOF' || fail "not the chat completion expected: $(cat "$REPLY")"
import json, sys
reply, expect = json.load(open(sys.argv[1])), sys.argv[2]
choice = reply["choices"][0]
content = choice["message"]["content"]
assert reply["object"] == "chat.completion", reply["object"]
assert choice["message"]["role"] == "assistant", choice["message"]["role"]
assert choice["finish_reason"] in ("stop", "length"), choice["finish_reason"]
assert isinstance(content, str) and content.strip(), f"empty content: {content!r}"
assert 0 < reply["usage"]["completion_tokens"] <= 32, reply["usage"]
assert expect.lower() in content.lower(), f"{expect!r} not in the reply {content!r}"
print(f"ci_fresh_serve: {reply['model']} answered ({choice['finish_reason']}, "
      f"{reply['usage']['completion_tokens']} tokens): {content!r}")
EOF
step "chat completion" "$t"

# 5. stop the server (the EXIT trap would too)
t=$SECONDS
stop_server
step "server stopped" "$t"
say "passed in $(( SECONDS - T0 )) s${EXPECT:+ (the reply names \"$EXPECT\")}"
