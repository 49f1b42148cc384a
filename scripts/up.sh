#!/usr/bin/env bash
# `make up`: the whole system on one machine, in the foreground. Ctrl-C stops what it started.
#   PostgreSQL on 127.0.0.1:5432 (started if it is not running)
#   the broker on 127.0.0.1:9092, its log kept durably in PostgreSQL database keel_log
#   the topics, the command API on 127.0.0.1:8080, the projector (views in database keel)
#   and the query API on 127.0.0.1:8081
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
ensure_postgres
ensure_broker
say "building the services (release)"
build_release
bin="${CARGO_TARGET_DIR:-target}/release"
mkdir -p .keel/logs
ensure_dev_secret

pids=()
stop() {
    trap - INT TERM EXIT
    [ "${#pids[@]}" -gt 0 ] && { say "stopping"; kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; }
    exit 0
}
trap stop INT TERM EXIT

export KEEL_KAFKA_BROKERS="${KEEL_KAFKA_BROKERS:-127.0.0.1:9092}"
if [ "$KEEL_KAFKA_BROKERS" = "127.0.0.1:9092" ]; then
    if port_open 9092; then
        say "a broker already listens on 127.0.0.1:9092: using it"
    else
        ensure_database keel_log
        say "starting the broker (log: .keel/logs/broker.log)"
        env -u STORAGE_ENGINE -u LISTENER_URL -u ADVERTISED_LISTENER_URL \
            nisshi broker \
            --listener-url tcp://127.0.0.1:9092 \
            --advertised-listener-url tcp://127.0.0.1:9092 \
            --storage-engine "postgres://postgres@$PG_HOST:$PG_PORT/keel_log?sslmode=disable" \
            >.keel/logs/broker.log 2>&1 &
        pids+=($!)
        for _ in $(seq 1 120); do port_open 9092 && break; sleep 0.25; done
        port_open 9092 || { echo "the broker did not start; see .keel/logs/broker.log" >&2; exit 1; }
    fi
fi

say "ensuring the topics"
"$bin/projector" topics

export KEEL_DATABASE_URL="${KEEL_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/keel?sslmode=disable}"
trusted="${KEEL_TRUSTED_KEYS_FILE:-.keel/trusted.keys}"
start_service() {
    local name=$1 port=$2
    if port_open "$port"; then
        echo "port $port is taken: is another 'make up' running? Stop it first." >&2
        exit 1
    fi
    say "starting $name on 127.0.0.1:$port (log: .keel/logs/$name.log)"
    "$bin/$name" >".keel/logs/$name.log" 2>&1 &
    pids+=($!)
}

# The command API first: on a first run it makes the signing key and the trusted keys
# file, which the projector's gate needs.
start_service command-api 8080
for _ in $(seq 1 240); do [ -s "$trusted" ] && break; sleep 0.25; done
[ -s "$trusted" ] || { echo "no trusted keys at $trusted; see .keel/logs/command-api.log" >&2; exit 1; }

say "starting the projector (log: .keel/logs/projector.log)"
"$bin/projector" run >.keel/logs/projector.log 2>&1 &
pids+=($!)

start_service query-api 8081

say "Keel is up: commands on http://127.0.0.1:8080, queries on http://127.0.0.1:8081. Ctrl-C stops it."
[ -n "${KEEL_AUTH_HS256_SECRET_FILE:-}" ] &&
    say "every /v1 route needs a token: TOKEN=\$(make -s token ROLE=all SUB=you), then curl -H \"Authorization: Bearer \$TOKEN\""
wait -n "${pids[@]}" || true
echo "a process exited; see .keel/logs" >&2
