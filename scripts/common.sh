# Shared by scripts/up.sh and scripts/test.sh: install and start what Keel needs.
# Every step checks first and does nothing when the thing is already there.

set -euo pipefail

# The broker: nisshi, a Kafka-compatible broker in Rust (Apache-2.0), pinned.
NISSHI_VERSION=0.8.1
PG_HOST=127.0.0.1
PG_PORT=5432
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: a C toolchain, zlib and OpenSSL headers for librdkafka's vendored
# build; PostgreSQL for the views and the broker's durable log; the openssl tool, with
# which the security tests make their certificates and keys.
ensure_packages() {
    # prometheus: the server and promtool, for the tests of the alerting rules and dashboard.
    # chromium and chromium-driver: the console's browser tests drive it headless.
    local wanted=(build-essential pkg-config zlib1g-dev libssl-dev postgresql postgresql-client curl openssl prometheus
        chromium chromium-driver)
    local missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

pg_ok() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; }

# A PostgreSQL server on 127.0.0.1:5432 that lets user postgres in without a password.
ensure_postgres() {
    pg_ok && return 0
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
        say "creating PostgreSQL $version cluster"
        as_root pg_createcluster "$version" main
    fi
    if ! pg_isready -h "$PG_HOST" -p "$PG_PORT" -q; then
        say "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        for _ in $(seq 1 60); do pg_isready -h "$PG_HOST" -p "$PG_PORT" -q && break; sleep 0.5; done
    fi
    if ! pg_ok; then
        # A fresh Debian cluster asks local TCP clients for a password: trust loopback, as
        # a development machine does. Production databases are configured by their owners.
        say "allowing passwordless loopback connections to PostgreSQL (development set-up)"
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        sleep 1
    fi
    pg_ok || { echo "PostgreSQL is not reachable at $PG_HOST:$PG_PORT as user postgres" >&2; exit 1; }
}

# nisshi $NISSHI_VERSION in ~/.cargo/bin with the three storage engines Keel uses: memory
# (the tests' brokers; nisshi's "dynostore" feature), SQLite (the chaos suite's durable
# broker; "libsql") and PostgreSQL (`make up`). Its default features hold all three, and
# are built. Its dependencies declare rustc 1.96 while the code builds with
# 1.95, so the rust-version check is skipped.
NISSHI_NEEDS=dynostore,libsql,postgres

# True when ~/.cargo/bin/nisshi is $NISSHI_VERSION and was built with the features Keel
# needs (its defaults, or a set naming them), as cargo recorded the install.
broker_is_usable() {
    [ -x "$HOME/.cargo/bin/nisshi" ] || return 1
    python3 - "$HOME/.cargo/.crates2.json" "$NISSHI_VERSION" "$NISSHI_NEEDS" <<'PY' 2>/dev/null
import json, sys
path, version, needs = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
installs = json.load(open(path))["installs"]
sys.exit(0 if any(
    key.startswith(f"nisshi {version} ")
    and (info.get("all_features") or not info.get("no_default_features")
         or needs <= set(info.get("features", [])))
    for key, info in installs.items()
) else 1)
PY
}

ensure_broker() {
    broker_is_usable && return 0
    local force=()
    if [ -x "$HOME/.cargo/bin/nisshi" ]; then
        say "the installed broker is not nisshi $NISSHI_VERSION with memory, SQLite and PostgreSQL storage: rebuilding it"
        force=(--force)
    fi
    say "installing the broker: nisshi $NISSHI_VERSION (one-off, about 25 minutes on 2 cores)"
    cargo install --locked --ignore-rust-version "${force[@]}" nisshi --version "$NISSHI_VERSION"
}

# schemathesis, pinned, in a virtual environment beside the build cache (outside the
# clone): the contract test runs it against both APIs' OpenAPI documents. The test finds it
# through KEEL_SCHEMATHESIS, or at this path.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV="$HOME/.cargo/keel-schemathesis"

ensure_schemathesis() {
    local st="$SCHEMATHESIS_VENV/bin/st"
    if [ -x "$st" ] && "$st" --version 2>/dev/null | grep -qx "st, version $SCHEMATHESIS_VERSION"; then
        return 0
    fi
    say "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV (one-off, under a minute)"
    if ! python3 -m venv --clear "$SCHEMATHESIS_VENV" >/dev/null 2>&1; then
        # Debian's own python3 keeps venv in a package of its own.
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv --clear "$SCHEMATHESIS_VENV"
    fi
    "$SCHEMATHESIS_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
}

# axe-core, pinned (MPL-2.0), beside the build cache (outside the clone): the console's
# browser tests run its accessibility checks in the page. Fetched from the npm registry and
# checked against its digest; the tests find it through KEEL_AXE_JS, or at this path.
AXE_VERSION=4.14.1
AXE_SHA256=e6b0ce02b84d892e2e33e403485e7f3d6c29e2be6df65daf44d89ba564139745
AXE_JS="$HOME/.cargo/keel-axe/axe-core-$AXE_VERSION/axe.min.js"

ensure_axe() {
    [ -s "$AXE_JS" ] && return 0
    say "fetching axe-core $AXE_VERSION for the console's accessibility checks (one-off)"
    local dir tgz
    dir=$(dirname "$AXE_JS")
    tgz=$(mktemp)
    curl -sSfL -o "$tgz" "https://registry.npmjs.org/axe-core/-/axe-core-$AXE_VERSION.tgz"
    if ! echo "$AXE_SHA256  $tgz" | sha256sum -c --quiet -; then
        rm -f "$tgz"
        echo "axe-core $AXE_VERSION does not match its pinned digest" >&2
        exit 1
    fi
    mkdir -p "$dir"
    tar xzf "$tgz" -C "$dir" --strip-components=1 package/axe.min.js package/LICENSE
    rm -f "$tgz"
}

# The development token secret: made once into .keel/auth.secret (mode 0600, ignored by
# git) and never printed; the APIs read it through KEEL_AUTH_HS256_SECRET_FILE. Left alone
# when keys are configured or authentication is explicitly off.
ensure_dev_secret() {
    if [ "${KEEL_AUTH:-on}" = off ] ||
        [ -n "${KEEL_AUTH_HS256_SECRET:-}${KEEL_AUTH_HS256_SECRET_FILE:-}${KEEL_AUTH_JWKS_FILE:-}" ]; then
        return 0
    fi
    mkdir -p .keel
    if [ ! -s .keel/auth.secret ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >.keel/auth.secret)
        say "made a development token secret in .keel/auth.secret: 'make token' prints tokens"
    fi
    export KEEL_AUTH_HS256_SECRET_FILE="$PWD/.keel/auth.secret"
}

# The release binaries of `make up` and `make token`. One package set for both, so that
# the second finds the first's build (another set would unify features differently and
# rebuild the dependencies).
build_release() {
    cargo build --release --locked -p command-api -p projector -p query-api -p keel-http "$@"
}

ensure_database() {
    local db=$1
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc \
        "select 1 from pg_database where datname = '$db'" | grep -q 1 ||
        psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc "create database \"$db\"" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
