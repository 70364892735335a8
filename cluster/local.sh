#!/usr/bin/env bash
# A local Ray head for `ray job submit`: the same path as a real cluster, on one machine.
#
#   cluster/local.sh up                      start a head (free ports, its own temp dir, job API on 127.0.0.1)
#                                            and wait until job submission answers; prints the address
#   cluster/local.sh submit [RAY_JOB_SUBMIT_OPTIONS] -- ENTRYPOINT...
#                                            `ray job submit --working-dir .` (the repo, as .gitignore leaves it;
#                                            .git and .venv stay here) and follow the job's logs until it ends;
#                                            exits 1 when the job failed. --no-wait, --submission-id ... pass through
#   cluster/local.sh status JOB_ID           `ray job status`        (also: logs JOB_ID [-f], list, stop JOB_ID)
#   cluster/local.sh env                     the variables for running `ray job ...` against this head yourself
#   cluster/local.sh down                    stop this head (only its processes) and check that none is left
#
# State (ports, the head's pid, its log, Ray's temp dir) lives in $NOTA_RAY_DIR (default /tmp/nota-ray-UID); keep
# the path short: Ray's unix sockets live under it (107 characters at most). Heads with different NOTA_RAY_DIRs run
# side by side, and beside any `ray.init()` local Ray: every port is chosen free, none is Ray's default. `down`
# stops the `ray start --block` process (which stops what it started), then any process of its process group or
# naming its temp dir; it never runs `ray stop`, which would stop every Ray on the machine.
#
# Network: the dashboard, which serves the job API, listens on 127.0.0.1 only. Ray 2.60 does not let a head's node
# IP be loopback (`ray start` turns --node-ip-address 127.0.0.1 into this machine's address), and the GCS and
# raylet listen on all interfaces whatever the node IP: use it on a machine whose ports are not open to others.
# Authentication: Ray 2.60 turns token authentication on when RAY_AUTH_MODE is unset and ~/.ray/auth_token exists
# (every local `ray.init()` writes one), so whether a head asks for a token would depend on what ran before. This
# script sets RAY_AUTH_MODE=disabled for the head (its jobs inherit it) and for the `ray job` clients it runs.
#
# Variables: NOTA_RAY_DIR; PYTHON (default .venv/bin/python, else python3: its bin dir goes first on the head's
# PATH, so that a job's `python` is the project's); NUM_CPUS / NUM_GPUS (default: Ray detects); UP_TIMEOUT_S (120);
# DRAIN_TIMEOUT_S (0: `down` does not wait for Ray's SIGTERM drain); NOTA_CACHE, when set, is passed to the job.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${NOTA_RAY_DIR:-/tmp/nota-ray-$(id -u)}"
STATE="$DIR/head.env"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
BIN="$(dirname "$PYTHON")"
RAY="$BIN/ray"
export RAY_AUTH_MODE=disabled

die() { echo "local.sh: $*" >&2; exit 1; }

load_state() {
    [[ -f "$STATE" ]] || die "no head recorded in $DIR (run: cluster/local.sh up)"
    # shellcheck disable=SC1090
    source "$STATE"
    export RAY_ADDRESS="$DASHBOARD_URL"
}

head_alive() { [[ -n "${HEAD_PID:-}" ]] && kill -0 "$HEAD_PID" 2>/dev/null; }

# Processes of this head: the `ray start` process group, and every process whose command line names its temp dir
# (GCS, raylet, dashboard and agents, workers). Never matched by name, so other Rays on the machine are untouched.
head_pids() {
    local pid cmd stat pgrp
    for pid in /proc/[0-9]*; do
        pid="${pid#/proc/}"
        [[ "$pid" == "$$" ]] && continue
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        read -r _ _ pgrp _ <<<"${stat##*) }"  # fields after "pid (comm) ": state ppid pgrp ...
        if [[ -n "${HEAD_PGID:-}" && "$pgrp" == "$HEAD_PGID" ]]; then echo "$pid"; continue; fi
        cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
        [[ "$cmd" == *"$TEMP_DIR/"* ]] && echo "$pid"
    done
    return 0
}

free_ports() {  # N distinct free TCP ports on 127.0.0.1 (all held open while choosing)
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_ready() {  # the dashboard's job API answers (a submission then waits for the head's job agent itself)
    local deadline=$((SECONDS + ${UP_TIMEOUT_S:-120}))
    until "$RAY" job list --address "$DASHBOARD_URL" >/dev/null 2>&1; do
        head_alive || { tail -n 40 "$DIR/head.log" >&2; die "the head exited while starting (log: $DIR/head.log)"; }
        (( SECONDS < deadline )) || die "the head did not answer on $DASHBOARD_URL in ${UP_TIMEOUT_S:-120} s (log: $DIR/head.log)"
        sleep 1
    done
}

cmd_up() {
    if [[ -f "$STATE" ]]; then
        # shellcheck disable=SC1090
        source "$STATE"
        if head_alive; then echo "a head is already running: $DASHBOARD_URL (pid $HEAD_PID, $DIR)"; return 0; fi
        TEMP_DIR="$DIR/ray"; HEAD_PGID="${HEAD_PGID:-}"
        [[ -z "$(head_pids)" ]] || die "the recorded head (pid $HEAD_PID) is gone but some of its processes are left: run cluster/local.sh down"
        rm -f "$STATE"
    fi
    [[ -x "$RAY" ]] || die "no ray in $BIN (make setup)"
    mkdir -p "$DIR"
    TEMP_DIR="$DIR/ray"
    # shellcheck disable=SC2207
    local ports=($(free_ports 9))
    local gcs=${ports[0]} dashboard=${ports[1]} agent_http=${ports[2]} agent_grpc=${ports[3]} runtime_env=${ports[4]}
    local metrics=${ports[5]} object_manager=${ports[6]} node_manager=${ports[7]} client=${ports[8]}
    local resources=()
    [[ -n "${NUM_CPUS:-}" ]] && resources+=(--num-cpus "$NUM_CPUS")
    [[ -n "${NUM_GPUS:-}" ]] && resources+=(--num-gpus "$NUM_GPUS")
    # setsid: the head and what it starts get a process group of their own (pgid == the head's pid), away from the
    # caller's terminal; `--block` makes the `ray start` process the owner that stops them all on SIGTERM.
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: on SIGTERM Ray 2.60 first drains the node for up to 30 s (for Serve),
    # which a batch head has no use for: `down` tears down at once (DRAIN_TIMEOUT_S to change it).
    PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${DRAIN_TIMEOUT_S:-0}" setsid "$RAY" start --head --block \
        --port "$gcs" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
        --dashboard-agent-listen-port "$agent_http" --dashboard-agent-grpc-port "$agent_grpc" \
        --runtime-env-agent-port "$runtime_env" --metrics-export-port "$metrics" \
        --object-manager-port "$object_manager" --node-manager-port "$node_manager" \
        --ray-client-server-port "$client" --min-worker-port 0 --max-worker-port 0 \
        --temp-dir "$TEMP_DIR" --disable-usage-stats "${resources[@]}" \
        </dev/null >"$DIR/head.log" 2>&1 &
    HEAD_PID=$!
    HEAD_PGID=$HEAD_PID
    DASHBOARD_URL="http://127.0.0.1:$dashboard"
    cat >"$STATE" <<EOF
HEAD_PID=$HEAD_PID
HEAD_PGID=$HEAD_PGID
TEMP_DIR=$TEMP_DIR
GCS_PORT=$gcs
DASHBOARD_URL=$DASHBOARD_URL
EOF
    wait_ready
    echo "Ray head up: $DASHBOARD_URL (GCS port $gcs, pid $HEAD_PID, temp dir $TEMP_DIR, log $DIR/head.log)"
    echo "  cluster/local.sh submit -- python -m jobs.infer ...   |   cluster/local.sh down"
}

cmd_submit() {
    load_state
    head_alive || die "the head (pid $HEAD_PID) is not running (run: cluster/local.sh up)"
    local args=() runtime_env=""
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        if [[ "$1" == "--runtime-env-json" ]]; then runtime_env="$2"; shift 2; else args+=("$1"); shift; fi
    done
    [[ "${1:-}" == "--" ]] || die "usage: cluster/local.sh submit [ray job submit options] -- ENTRYPOINT..."
    shift
    [[ $# -gt 0 ]] || die "no entrypoint after --"
    cd "$ROOT"
    if [[ -z "$runtime_env" ]]; then  # .git and .venv (Ray 2.60 leaves them out too) and what .gitignore names stay here
        runtime_env="$("$PYTHON" -c 'import json, os
env = {"excludes": [".git", ".venv"]}
if os.environ.get("NOTA_CACHE"):
    env["env_vars"] = {"NOTA_CACHE": os.environ["NOTA_CACHE"]}
print(json.dumps(env))')"
    fi
    "$RAY" job submit --address "$DASHBOARD_URL" --working-dir . --runtime-env-json "$runtime_env" "${args[@]}" -- "$@"
}

cmd_down() {
    if [[ ! -f "$STATE" ]]; then echo "no head recorded in $DIR"; return 0; fi
    load_state
    if head_alive; then
        if "$RAY" job list --address "$DASHBOARD_URL" 2>/dev/null | grep -q "JobStatus.RUNNING\|JobStatus.PENDING"; then
            echo "local.sh: jobs still running on this head are stopped with it" >&2
        fi
        kill -TERM "$HEAD_PID"
        local deadline=$((SECONDS + 60))
        while head_alive && (( SECONDS < deadline )); do sleep 0.5; done
    fi
    local left deadline=$((SECONDS + 20))
    while left="$(head_pids)"; [[ -n "$left" ]] && (( SECONDS < deadline )); do sleep 0.5; done
    if [[ -n "$left" ]]; then
        echo "stopping what is left of the head: $(echo $left)" >&2
        # shellcheck disable=SC2086
        kill -TERM $left 2>/dev/null || true
        sleep 3
        left="$(head_pids)"
        # shellcheck disable=SC2086
        [[ -z "$left" ]] || kill -KILL $left 2>/dev/null || true
        sleep 1
    fi
    left="$(head_pids)"
    [[ -z "$left" ]] || die "processes of the head are still running: $(echo $left)"
    rm -f "$STATE"
    echo "Ray head stopped (pid $HEAD_PID); no process of it is left. Logs: $TEMP_DIR/session_latest/logs"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    submit) shift; cmd_submit "$@" ;;
    status) shift; load_state; "$RAY" job status --address "$DASHBOARD_URL" "$@" ;;
    logs) shift; load_state; "$RAY" job logs --address "$DASHBOARD_URL" "$@" ;;
    list) shift; load_state; "$RAY" job list --address "$DASHBOARD_URL" "$@" ;;
    stop) shift; load_state; "$RAY" job stop --address "$DASHBOARD_URL" "$@" ;;
    env) load_state; printf 'export RAY_ADDRESS=%s RAY_AUTH_MODE=disabled\n' "$DASHBOARD_URL" ;;
    down) shift; cmd_down ;;
    *) sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; [[ -n "${1:-}" && "$1" != -h && "$1" != --help ]] && exit 2 || exit 0 ;;
esac
