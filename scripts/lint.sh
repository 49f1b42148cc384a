#!/usr/bin/env bash
# `make lint`: formatting and clippy, as CI checks them.
cd "$(dirname "$0")/.."
. scripts/common.sh

ensure_packages
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
