#!/usr/bin/env bash
# `make chaos`: the chaos suite with FAULTS faults of each kind (50 by default) against the
# real processes; prints the figures (faults per kind, commands acknowledged, lost,
# applied twice, verify). `make test` runs the same suite with a few faults of each kind.
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
ensure_postgres
ensure_broker
say "building the services"
cargo build --workspace --bins --locked
say "running the chaos suite: ${1:-50} faults of each kind"
KEEL_CHAOS_FAULTS="${1:-50}" cargo test --locked -p keel-tests --test chaos -- --nocapture
