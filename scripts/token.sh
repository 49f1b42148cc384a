#!/usr/bin/env bash
# `make token ROLE=... SUB=... [TTL=seconds]`: prints a development bearer token signed with
# the secret `make up` keeps in .keel/auth.secret. Nothing else goes to standard output, so
# TOKEN=$(make -s token ROLE=queries:read SUB=alice) works.
cd "$(dirname "$0")/.."
. scripts/common.sh
if [ ! -s .keel/auth.secret ] && [ -z "${KEEL_AUTH_HS256_SECRET_FILE:-}" ]; then
    echo "no development secret yet: run 'make up' once (it makes .keel/auth.secret)" >&2
    exit 1
fi
build_release -q >&2
exec "${CARGO_TARGET_DIR:-target}/release/keel-token" --roles "${1:-all}" --sub "${2:-dev}" --ttl "${3:-3600}"
