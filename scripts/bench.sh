#!/usr/bin/env bash
# `make bench`: every benchmark scenario beside its baselines, in one run, in release mode.
# Writes BENCHMARKS.md (its results block) and docs/bench/ (report.json and the plots).
# Arguments go to the harness: scripts/bench.sh --quick, --events N, --seconds S, ...
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
ensure_postgres
ensure_broker
say "building (release)"
cargo build --release --locked --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/release"
"$bin/bench" "$@"
