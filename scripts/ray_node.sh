#!/usr/bin/env bash
# Starts or stops this project's Ray on one machine of cluster.local.yaml, touching no other Ray process.
#
#   scripts/ray_node.sh head [ray start options]     # stops our previous Ray here, then `ray start --head`
#   scripts/ray_node.sh worker [ray start options]   # the same with --address=$RAY_HEAD_IP:$SWEEP_RAY_PORT
#   scripts/ray_node.sh stop                         # stops the Ray this script started here
#
# `ray stop` would stop every Ray process of the user on the machine, other people's included. Here
# `ray start --block` runs in the background and its process id goes to $SWEEP_RAY_STATE/ray.pid; a
# SIGTERM to that process makes Ray shut down exactly the processes of its own node. Environment:
# SWEEP_RAY_STATE (default ~/.calibration-sweep: pid file and log), SWEEP_RAY_PORT (default 6379).
set -euo pipefail

STATE=${SWEEP_RAY_STATE:-$HOME/.calibration-sweep}
PORT=${SWEEP_RAY_PORT:-6379}
PIDFILE=$STATE/ray.pid
LOG=$STATE/ray.log
mkdir -p "$STATE"

stop_ours() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "error: our Ray (pid $pid, $PIDFILE) did not stop within 60 s; stop it by that pid" >&2
      exit 1
    fi
  fi
  rm -f "$PIDFILE"
}

start_ours() {
  stop_ours
  ulimit -n 65536 2>/dev/null || true
  nohup ray start --block "$@" > "$LOG" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$PIDFILE"
  for _ in $(seq 120); do
    if grep -q "Ray runtime started" "$LOG"; then
      echo "Ray started here (pid $pid; log $LOG)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "error: ray start exited; its log ($LOG):" >&2
      tail -n 40 "$LOG" >&2
      exit 1
    fi
    sleep 1
  done
  echo "error: Ray did not start within 120 s; see $LOG (still running as pid $pid)" >&2
  exit 1
}

case "${1:-}" in
  head) shift; start_ours --head --port="$PORT" "$@" ;;
  worker) shift; start_ours --address="${RAY_HEAD_IP:?set RAY_HEAD_IP (the launcher sets it on workers)}:$PORT" "$@" ;;
  stop) stop_ours ;;
  *) echo "usage: $0 head|worker|stop [ray start options]" >&2; exit 2 ;;
esac
