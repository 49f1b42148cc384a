#!/usr/bin/env bash
# `make up`: the whole system on one machine, in the foreground. Ctrl-C stops what it started.
#   PostgreSQL on 127.0.0.1:5432 (started if it is not running)
#   the broker on 127.0.0.1:9092, its log kept durably in PostgreSQL database keel_log
#   the topics, the command API on 127.0.0.1:8080, the projector (views in database keel)
#   the order fulfilment process (a second projector process, /metrics on 127.0.0.1:8083)
#   and the query API on 127.0.0.1:8081; /metrics on each (the projector's on 127.0.0.1:8082)
# INSTANCES=N starts N command-api instances sharing the partitions (the first on 8080, the
# others on 8090, 8091, ...); each takes any command and forwards it to its partition's owner.
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
ensure_postgres
ensure_broker
say "building the services (release)"
build_release
bin="${CARGO_TARGET_DIR:-target}/release"
ensure_dev_secret

. scripts/supervise.sh

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
        supervise broker broker_pinned \
            --listener-url tcp://127.0.0.1:9092 \
            --advertised-listener-url tcp://127.0.0.1:9092 \
            --storage-engine "postgres://postgres@$PG_HOST:$PG_PORT/keel_log?sslmode=disable"
        for _ in $(seq 1 120); do port_open 9092 && break; sleep 0.25; done
        port_open 9092 || { echo "the broker did not start; see .keel/logs/broker.log" >&2; exit 1; }
    fi
fi

say "ensuring the topics"
"$bin/projector" topics

export KEEL_DATABASE_URL="${KEEL_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/keel?sslmode=disable}"
trusted="${KEEL_TRUSTED_KEYS_FILE:-.keel/trusted.keys}"
instances="${INSTANCES:-1}"
case "$instances" in
    '' | *[!0-9]* | 0) echo "INSTANCES must be a number from 1 up, not '$instances'" >&2; exit 1 ;;
esac
command_port() { if [ "$1" -eq 1 ]; then echo 8080; else echo $((8088 + $1)); fi; }
ports="8081 8082 8083"
for i in $(seq 1 "$instances"); do ports="$ports $(command_port "$i")"; done
for port in $ports; do
    if port_open "$port"; then
        echo "port $port is taken: is another 'make up' running? Stop it first." >&2
        exit 1
    fi
done

# The console (served by the query API on 8081) reads the partitions and the command
# counts from the command API: its origin is allowed there, and named to the console.
export KEEL_CORS_ORIGINS="${KEEL_CORS_ORIGINS:-http://127.0.0.1:8081,http://localhost:8081}"
export KEEL_CONSOLE_COMMAND_API="${KEEL_CONSOLE_COMMAND_API:-http://127.0.0.1:8080}"

# The command API first: on a first run it makes the signing key and the trusted keys
# file, which the projector's gate needs.
say "starting command-api on 127.0.0.1:8080 (log: .keel/logs/command-api.log)"
supervise command-api "$bin/command-api"
for i in $(seq 2 "$instances"); do
    port=$(command_port "$i")
    say "starting command-api instance $i on 127.0.0.1:$port (log: .keel/logs/command-api-$i.log)"
    supervise "command-api-$i" env KEEL_COMMAND_ADDR="127.0.0.1:$port" KEEL_INSTANCE="cmd-$i" "$bin/command-api"
done
for _ in $(seq 1 240); do [ -s "$trusted" ] && break; sleep 0.25; done
[ -s "$trusted" ] || { echo "no trusted keys at $trusted; see .keel/logs/command-api.log" >&2; exit 1; }

say "starting the projector, its /metrics and probes on 127.0.0.1:8082 (log: .keel/logs/projector.log)"
supervise projector "$bin/projector" run

# The order fulfilment process: a projector process of its own that sends commands to the
# command API as its own identity (subject svc-fulfilment, role commands:write). Here its
# token is a development one made with .keel/auth.secret; in production it is issued by the
# identity provider and given as KEEL_FULFILMENT_TOKEN_FILE. The process never reads a secret.
if [ -n "${KEEL_AUTH_HS256_SECRET_FILE:-}" ] && [ -z "${KEEL_FULFILMENT_TOKEN_FILE:-}" ]; then
    (umask 077 && "$bin/keel-token" --roles commands:write --sub svc-fulfilment --ttl 2592000 >.keel/fulfilment.token)
    export KEEL_FULFILMENT_TOKEN_FILE="$PWD/.keel/fulfilment.token"
fi
say "starting the order fulfilment process, its /metrics and probes on 127.0.0.1:8083 (log: .keel/logs/fulfilment.log)"
supervise fulfilment env KEEL_FULFILMENT_COMMAND_API="${KEEL_FULFILMENT_COMMAND_API:-http://127.0.0.1:8080}" \
    "$bin/projector" run --process fulfilment --addr 127.0.0.1:8083

say "starting query-api on 127.0.0.1:8081 (log: .keel/logs/query-api.log)"
supervise query-api "$bin/query-api"

if [ "$instances" -gt 1 ]; then
    say "Keel is up: commands on any of $(for i in $(seq 1 "$instances"); do printf 'http://127.0.0.1:%s ' "$(command_port "$i")"; done)(they share the partitions), queries on http://127.0.0.1:8081. Ctrl-C stops it."
else
    say "Keel is up: commands on http://127.0.0.1:8080, queries on http://127.0.0.1:8081. Ctrl-C stops it."
fi
say "the console: http://127.0.0.1:8081/console (sign in with a token from 'make -s token')"
[ -n "${KEEL_AUTH_HS256_SECRET_FILE:-}" ] &&
    say "every /v1 route needs a token: TOKEN=\$(make -s token ROLE=all SUB=you), then curl -H \"Authorization: Bearer \$TOKEN\""
say "a service that exits is started again (said here, logs capped at ${KEEL_LOG_MAX_MB:-20} MB in .keel/logs)"
wait
