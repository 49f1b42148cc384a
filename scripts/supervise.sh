# What `make up` runs its services with, sourced by scripts/up.sh (and by the tests that
# check it): capped logs, a supervisor that restarts what exits, and the broker at a
# pinned log level. Callers keep the supervisors' pids in the array `pids`.

# Where the logs go.
KEEL_LOG_DIR="${KEEL_LOG_DIR:-.keel/logs}"
mkdir -p "$KEEL_LOG_DIR"

# Each log is capped: past KEEL_LOG_MAX_MB (default 20) megabytes it is moved to
# <name>.log.1 (replacing the one before) and a new one begun, so a chatty level (RUST_LOG
# set in the environment, say) never fills the disk.
log_max_bytes=$(( ${KEEL_LOG_MAX_MB:-20} * 1024 * 1024 ))
cap_log() {
    local file=$1 lines=0
    : >>"$file"
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$file"
        lines=$((lines + 1))
        if [ $((lines % 500)) -eq 0 ] && [ "$(stat -c %s "$file")" -ge "$log_max_bytes" ]; then
            mv -f "$file" "$file.1"
            : >"$file"
        fi
    done
}

# Runs a service and starts it again whenever it exits, after a pause that doubles up to
# 30 s while it keeps failing (and is 1 s again once it ran a minute); says so each time.
supervise() {
    local name=$1
    shift
    (
        child=
        trap '[ -n "$child" ] && kill "$child" 2>/dev/null; wait 2>/dev/null; exit 0' INT TERM
        delay=1
        while true; do
            started=$SECONDS
            "$@" > >(cap_log "$KEEL_LOG_DIR/$name.log") 2>&1 &
            child=$!
            status=0
            wait "$child" || status=$?
            child=
            if [ $((SECONDS - started)) -ge 60 ]; then delay=1; fi
            say "$name exited (status $status): restarting it in ${delay}s; see $KEEL_LOG_DIR/$name.log"
            sleep "$delay"
            delay=$((delay * 2 > 30 ? 30 : delay * 2))
        done
    ) &
    pids+=($!)
}

# Runs the broker (nisshi) with the arguments given. Its own log level is pinned: at info
# it logs every request, whatever RUST_LOG the environment holds, and fills the disk under
# load. KEEL_BROKER_LOG changes it on purpose. The broker's own environment settings are
# cleared, so the arguments decide. It replaces the shell that runs it, so a signal to that
# shell (the supervisor's, Ctrl-C's) reaches the broker.
broker_pinned() {
    exec env -u STORAGE_ENGINE -u LISTENER_URL -u ADVERTISED_LISTENER_URL \
        RUST_LOG="${KEEL_BROKER_LOG:-warn}" nisshi broker "$@"
}
