#!/usr/bin/env bash
# `make test`: installs and starts what is missing, then runs every test of the workspace.
# Tests start their own brokers (memory storage, free ports) and use random topic prefixes.
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
ensure_postgres
ensure_broker
ensure_schemathesis
export KEEL_SCHEMATHESIS="$SCHEMATHESIS_VENV/bin/st"
ensure_axe
export KEEL_AXE_JS="$AXE_JS"
say "building the services (the end-to-end tests start them)"
cargo build --workspace --bins --locked
say "running every test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
