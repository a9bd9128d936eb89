#!/usr/bin/env bash
# `make run`: the embedded stack, a simulated fleet registered against the
# simulator, and poller serve in the foreground. Ctrl-C stops serve (which
# flushes and uploads) and then the simulator this script started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEVICES=${POLLER_DEMO_DEVICES:-1000}
export POLLER_STATE_DIR=${POLLER_STATE_DIR:-$PWD/var}
# The simulated fleet answers on loopback, which device URLs may not reach by
# default (polling.denied_networks): this demo allows it, by configuration.
export POLLER_POLLING_ALLOWED_NETWORKS=${POLLER_POLLING_ALLOWED_NETWORKS:-127.0.0.0/8,::1/128}
mkdir -p "$POLLER_STATE_DIR"

"$BIN/poller" stack up
rm -f "$POLLER_STATE_DIR/simulator.port"
"$BIN/poller" simulate --devices "$DEVICES" --register \
    --port-file "$POLLER_STATE_DIR/simulator.port" &
SIM_PID=$!
trap 'kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    [ -s "$POLLER_STATE_DIR/simulator.port" ] && break
    kill -0 "$SIM_PID" 2>/dev/null || { echo "simulator failed to start" >&2; exit 1; }
    sleep 0.1
done
API_PORT=$("$BIN/poller" config show --json | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["api"]["port"])')
cat <<MSG
-------------------------------------------------------------------------------
poller is starting with $DEVICES simulated devices. Where to look:
  dashboard: http://127.0.0.1:$API_PORT/ui/   (open it in a browser)
  fleet:     curl -s http://127.0.0.1:$API_PORT/api/fleet
  metrics:   curl -s http://127.0.0.1:$API_PORT/metrics
  a device:  curl -s http://127.0.0.1:$API_PORT/api/event/f00001
  devices:   $BIN/poller list-users | head
  servers:   $BIN/poller stack status
  archive:   $POLLER_STATE_DIR/spool (hourly segments, then S3)
Ctrl-C stops poller serve gracefully; '$BIN/poller stack down' stops the servers.
-------------------------------------------------------------------------------
MSG
"$BIN/poller" serve
