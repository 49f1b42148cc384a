#!/usr/bin/env bash
# `make sim`: the write path's deterministic simulation over many seeds, in a release
# build. Usage: scripts/sim.sh SEEDS [FIRST]
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
export KEEL_SIM_SEEDS="${1:-100000}"
if [ -n "${2:-}" ]; then
    export KEEL_SIM_FIRST_SEED="$2"
fi
exec cargo test --release --locked -p command-api --lib owner::sim -- --nocapture
