#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (Debian's `postgresql` package):
#   scripts/pg_test_server.sh start DIR PORT   -> prints postgresql://postgres@127.0.0.1:PORT/postgres
#   scripts/pg_test_server.sh stop DIR
# The cluster lives in DIR (created), listens on 127.0.0.1:PORT only, trusts local
# connections (no password: it is for tests only) and runs with fsync on. PostgreSQL
# refuses to run as root, so as root it runs as the `postgres` user (or `nobody`).
set -euo pipefail
cmd=${1:?usage: pg_test_server.sh start DIR PORT | stop DIR}
dir=${2:?the cluster folder}

bindir() {
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -n "$d" ] && [ -x "$d/initdb" ] || { echo "pg_test_server.sh: PostgreSQL binaries not found (apt-get install postgresql)" >&2; exit 3; }
    echo "$d"
}

as_db_user() {  # run a command as a non-root user when we are root
    if [ "$(id -u)" != 0 ]; then
        "$@"
    else
        local user=postgres
        id "$user" >/dev/null 2>&1 || user=nobody
        runuser -u "$user" -- "$@"
    fi
}

BIN=$(bindir)
case "$cmd" in
start)
    port=${3:?the port}
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        user=postgres
        id "$user" >/dev/null 2>&1 || user=nobody
        chown "$user" "$dir"
    fi
    chmod 700 "$dir"
    as_db_user "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
    as_db_user "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    as_db_user "$BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: pg_test_server.sh start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
