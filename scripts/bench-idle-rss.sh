#!/usr/bin/env bash
# RSS per idle session, this build against another, side by side: each
# round starts each build in turn on core 0, holds SESSIONS idle
# authenticated sessions from one `client-sim load` on core 1, and prints
# (RSS held - RSS at start) / SESSIONS once every session is open and 20 s
# have passed.
#
#   scripts/bench-idle-rss.sh ROUNDS SESSIONS OTHER_PTT_RELAY_BINARY
#   e.g. scripts/bench-idle-rss.sh 3 20000 /tmp/before/ptt-relay
#
# Needs `cargo build --release -p relay -p client-sim` first, taskset and
# curl.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
n=${2:-20000}
other=${3:?the other build\'s ptt-relay binary}
load=target/release/client-sim
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
one() { # label binary
  local label=$1 bin=$2 rp lp s0 s t0
  rm -rf "$work/data"
  mapfile -t web < <(web_off "$bin")
  taskset -c 0 "$bin" serve --data-dir "$work/data" --listen 127.0.0.1:4476 \
    --admin 127.0.0.1:9496 "${web[@]}" --max-handshakes-per-second 0 \
    --max-connections 250000 >"$work/relay.log" 2>&1 &
  rp=$!
  wait_ready "$work/data" 127.0.0.1:9496
  s0=$(awk '/VmRSS/{print $2}' /proc/$rp/status)
  taskset -c 1 "$load" load --relay 127.0.0.1:4476 --ca "$work/data/cert.pem" \
    --secret "$work/data/token.secret" --users "$n" --endpoints 16 --duration 300s \
    --talk-interval 100h --grace 1s >"$work/load.out" 2>&1 &
  lp=$!
  t0=$(date +%s)
  while true; do
    s=$(sessions_open 127.0.0.1:9496)
    [ "${s:-0}" -ge "$n" ] && break
    [ $(($(date +%s) - t0)) -gt 200 ] && break
    sleep 2
  done
  sleep 20
  s=$(sessions_open 127.0.0.1:9496)
  awk -v s0="$s0" -v n="${s:-0}" -v label="$label" '/VmRSS/{
    printf "%-6s sessions %6d  RSS %7.1f MiB  per idle session %5.1f KiB\n",
      label, n, $2 / 1024, ($2 - s0) / (n > 0 ? n : 1) }' /proc/$rp/status
  kill "$lp" "$rp" 2>/dev/null || true
  wait "$lp" "$rp" 2>/dev/null || true
}
for round in $(seq "$rounds"); do
  echo "round $round"
  one this target/release/ptt-relay
  one other "$other"
done
