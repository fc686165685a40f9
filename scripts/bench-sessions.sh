#!/usr/bin/env bash
# Many idle authenticated sessions on one relay, and a clip delivered in
# the middle of them: the relay (pinned to core 0) holds PROCS x PER_PROC
# sessions from PROCS `client-sim load` processes (core 1, each its own
# users: --first-user), then a small live load (20 users) runs beside
# them. Prints the relay's RSS as sessions connect, the idle cost per
# session (wire bytes a second, relay CPU) and the live load's report.
#
#   scripts/bench-sessions.sh PER_PROC PROCS     e.g. 25000 4 (100,000)
#   EXTRA="--client-keep-alive 5s" scripts/bench-sessions.sh 25000 4
#   RELAY=/tmp/ptt-relay-old scripts/bench-sessions.sh 25000 4   (another build)
#
# Needs `cargo build --release -p relay -p client-sim` first, taskset,
# curl, and about 9 GB of memory for 100,000 sessions (relay and clients).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?sessions per process}
procs=${2:?processes}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
load=target/release/client-sim
relay=${RELAY:-target/release/ptt-relay}
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
mapfile -t web < <(web_off "$relay")
taskset -c 0 "$relay" serve --data-dir "$work/data" --listen 127.0.0.1:4475 \
  --admin 127.0.0.1:9495 "${web[@]}" --max-handshakes-per-second 0 --max-connections 250000 \
  >"$work/relay.log" 2>&1 &
rp=$!
sleep 2
rss() { awk '/VmRSS/{print $2" kB"}' /proc/$rp/status; }
sessions() { sessions_open 127.0.0.1:9495; }
wire() { curl -s 127.0.0.1:9495/metrics | awk '/^ptt_wire_bytes_total/{s+=$2} END{printf "%d", s}'; }
cpu() { awk '{print $14+$15}' /proc/$rp/stat; }
echo "relay RSS at start: $(rss)"
common=(--relay 127.0.0.1:4475 --ca "$work/data/cert.pem" --secret "$work/data/token.secret" --relay-pid "$rp")
for i in $(seq 0 $((procs - 1))); do
  # shellcheck disable=SC2086
  taskset -c 1 "$load" load "${common[@]}" --users "$n" --first-user $((i * n)) --endpoints 16 \
    --duration 240s --talk-interval 100h --grace 1s ${EXTRA:-} >"$work/idle$i.out" 2>&1 &
done
start=$(date +%s)
while true; do
  s=$(sessions)
  echo "t=$(($(date +%s) - start))s sessions=$s relay RSS $(rss)"
  [ "${s:-0}" -ge $((n * procs)) ] && break
  [ $(($(date +%s) - start)) -gt 200 ] && break
  sleep 10
done
sleep 20
w0=$(wire); c0=$(cpu); t0=$(date +%s.%N)
sleep 30
w1=$(wire); c1=$(cpu); t1=$(date +%s.%N)
python3 -c "
dt = $t1 - $t0; ses = max(1, $n * $procs)
print(f'idle: {($w1 - $w0) / dt / ses:.2f} wire bytes/s per session (both ways), relay CPU {($c1 - $c0) / dt:.1f}% of a core')"
echo "held: sessions=$(sessions) relay RSS $(rss)"
taskset -c 1 "$load" load "${common[@]}" --users 20 --first-user 900000 --endpoints 2 \
  --duration 15s --talk-interval 2s --clip-min 1s --clip-max 3s --grace 3s
echo "after: sessions=$(sessions) relay RSS $(rss)"
