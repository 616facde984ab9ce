# Services for the team-scale tests: a throw-away PostgreSQL cluster on loopback.
#
# Source it (bash), don't run it:   source scripts/ci_services.sh
#
#   * installs the PostgreSQL server from Debian's packages when it is missing (needs root and
#     apt-get; quiet; a no-op when already installed);
#   * creates a cluster in a fresh temporary folder (initdb, scram-sha-256 passwords), listening
#     ONLY on 127.0.0.1 on a free port, with its Unix socket inside that folder;
#   * creates a role `cpreg` (random password, CREATEDB) and its database `cpreg`;
#   * exports CPREG_TEST_POSTGRES_URL=postgresql+psycopg://cpreg:...@127.0.0.1:PORT/cpreg, which
#     the registry and CLI tests use to run on a fresh PostgreSQL database per test;
#   * stops the server and deletes the folder when the sourcing shell exits (an EXIT trap added
#     to any that is already set), or earlier with `cpreg_services_stop`.
#
# As root the cluster belongs to the `postgres` user (PostgreSQL refuses to run as root); as
# any other user it is that user's. The S3 test server (moto) is started by the tests themselves.

cpreg_services_stop() {
    if [ -n "${CPREG_PG_DIR:-}" ] && [ -d "$CPREG_PG_DIR" ]; then
        if [ -f "$CPREG_PG_DIR/data/postmaster.pid" ]; then
            _cpreg_pg_as "$CPREG_PG_BIN/pg_ctl" -D "$CPREG_PG_DIR/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
        fi
        rm -rf "$CPREG_PG_DIR"
    fi
    unset CPREG_PG_DIR CPREG_TEST_POSTGRES_URL
}

_cpreg_pg_as() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_cpreg_services_start() {
    local bin port password dir started
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "ci_services: PostgreSQL server missing and cannot apt-get install it (not root on Debian)" >&2
            return 1
        fi
        echo "ci_services: installing PostgreSQL from Debian's packages" >&2
        local log status policy=""
        log=$(mktemp)
        # policy-rc.d: do not start Debian's own cluster service (we run our own, on loopback only)
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >>"$log" 2>&1
        status=$?
        [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
        if [ "$status" != 0 ]; then
            cat "$log" >&2
            rm -f "$log"
            return 1
        fi
        rm -f "$log"
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    started=$(date +%s)
    dir=$(mktemp -d /tmp/cpreg-pg.XXXXXX)
    chmod 755 "$dir"
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    mkdir -p "$dir/run"
    printf '%s\n' "$password" >"$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$dir"
    fi
    CPREG_PG_DIR=$dir
    CPREG_PG_BIN=$bin
    _cpreg_pg_as "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 --pwfile="$dir/pwfile" \
        --encoding=UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        return 1
    }
    # Throw-away cluster: loopback only, socket in our folder, durability traded for speed.
    _cpreg_pg_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir/run -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        >/dev/null || {
        cat "$dir/server.log" >&2
        return 1
    }
    PGPASSWORD=$password "$bin/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE cpreg LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE cpreg OWNER cpreg" >/dev/null || return 1
    rm -f "$dir/pwfile"
    export CPREG_PG_DIR CPREG_PG_BIN
    export CPREG_TEST_POSTGRES_URL="postgresql+psycopg://cpreg:$password@127.0.0.1:$port/cpreg"
    echo "ci_services: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($(($(date +%s) - started)) s)" >&2
}

_cpreg_previous_exit_trap=$(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")
trap "cpreg_services_stop${_cpreg_previous_exit_trap:+; $_cpreg_previous_exit_trap}" EXIT
unset _cpreg_previous_exit_trap
_cpreg_services_start || {
    cpreg_services_stop
    return 1 2>/dev/null || exit 1
}
