#!/usr/bin/env bash
# Commands/s one command-api instance accepts, beside a bare rdkafka producer into the
# same broker (nisshi, memory storage) and B_http (an axum handler that parses the same
# bodies and does nothing else, driven by the same client), in the same run. Release build; each round
# starts a fresh broker so rounds do not see each other's logs.
#   scripts/bench-commands.sh [rounds=3] [clients=64] [seconds=10]
cd "$(dirname "$0")/.."
. scripts/common.sh
rounds=${1:-3} clients=${2:-64} seconds=${3:-10}
cargo build --release --locked -p command-api -p keel-tests --bins >/dev/null
bin="${CARGO_TARGET_DIR:-target}/release"
port=$((20000 + RANDOM % 10000)) http=$((30000 + RANDOM % 10000))
for round in $(seq 1 "$rounds"); do
    env -u STORAGE_ENGINE nisshi broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://nisshi/ >/dev/null 2>&1 &
    broker=$!
    sleep 2
    KEEL_KAFKA_BROKERS="127.0.0.1:$port" KEEL_TOPIC_PREFIX="bench$round" KEEL_COMMAND_ADDR="127.0.0.1:$http" \
        RUST_LOG=warn "$bin/command-api" &
    api=$!
    for _ in $(seq 1 120); do curl -sf "127.0.0.1:$http/readyz" >/dev/null && break; sleep 0.5; done
    echo "round $round: $("$bin/command-load" "http://127.0.0.1:$http" "$clients" "$seconds" 1000)"
    kill "$api"; wait "$api" 2>/dev/null
    echo "round $round: bare $("$bin/broker-bench" "127.0.0.1:$port" 200000 700 produce)"
    echo "round $round: $("$bin/command-load" baseline "$clients" "$seconds" 1000)"
    kill "$broker"; wait "$broker" 2>/dev/null
done
