#!/usr/bin/env bash
# Issue "Per-clip cost", part 3: the quinn-proto prototype
# (benches/examples/proto_loop.rs) against what it would replace, side by
# side on this machine (server on core 0, load on core 1), alternating
# round by round:
#
# - clip rate: `client-sim baseline` (200 users, 1 s clips, upload)
#   against the bare quinn sink (`client-sim sink`) and against the
#   prototype in sink mode;
# - RSS per idle connection: SESSIONS idle ptt/1 sessions (`Auth`,
#   `Welcome`, then keep-alives) from one `client-sim load`, held 20 s,
#   (RSS held - RSS at start) / sessions, on the relay and on the
#   prototype in ptt mode.
#
#   scripts/bench-proto-loop.sh ROUNDS SESSIONS [SESSIONS...]
#   e.g. scripts/bench-proto-loop.sh 3 20000 100000
#
# The prototype runs with each crypto session in CRYPTOS (default
# "rustls lean": quinn's, and the relay's `quic::lean_tls`); RELAYS lists
# the relay binaries measured (default this build's), e.g. an earlier
# build's beside this one.
#
# Needs `cargo build --release -p relay -p client-sim` and `cargo build
# --release -p benches --example proto_loop` first, taskset and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift
sizes=("${@:-20000}")
load=target/release/client-sim
proto=target/release/examples/proto_loop
relay=target/release/ptt-relay
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
# A data dir with a certificate, key and token secret.
"$relay" serve --data-dir "$work/d" --listen 127.0.0.1:4477 --admin 127.0.0.1:9497 --web off \
  >/dev/null 2>&1 &
rp=$!
wait_ready "$work/d" 127.0.0.1:9497
kill "$rp"
wait "$rp" 2>/dev/null || true

rate() { # label server-command...
  local label=$1 sp
  shift
  taskset -c 0 "$@" >/dev/null 2>&1 &
  sp=$!
  sleep 1
  rm -f "$work/b.json"
  taskset -c 1 "$load" baseline --sink 127.0.0.1:4478 --cert "$work/d/cert.pem" --users 200 \
    --duration 8s --clip-min 1s --clip-max 1s --mode upload --talk-interval 1ms \
    --report-json "$work/b.json" >/dev/null 2>&1 || true
  kill "$sp" 2>/dev/null || true
  wait "$sp" 2>/dev/null || true
  python3 -c "import json; print(f\"rate   {'$label':8} clips/s {json.load(open('$work/b.json'))['clips_per_s']:9.1f}\")"
}

# Waits until COUNT-COMMAND prints at least N (at most 200 s), then 20 s,
# and prints the server's RSS per connection.
idle() { # label n pid s0 count-command...
  local label=$1 n=$2 pid=$3 s0=$4 t0 s
  shift 4
  t0=$(date +%s)
  while true; do
    s=$("$@")
    [ "${s:-0}" -ge "$n" ] && break
    [ $(($(date +%s) - t0)) -gt 200 ] && break
    sleep 2
  done
  sleep 20
  s=$("$@")
  awk -v s0="$s0" -v n="${s:-0}" -v label="$label" '/VmRSS/{
    printf "idle   %-8s sessions %6d  RSS %7.1f MiB  per idle connection %5.1f KiB\n",
      label, n, $2 / 1024, ($2 - s0) / (n > 0 ? n : 1) }' "/proc/$pid/status"
}
proto_sessions() { awk '/^connections/{s=$4} END{printf "%d", s}' "$work/proto.log"; }
hold() { # port n
  taskset -c 1 "$load" load --relay "127.0.0.1:$1" --ca "$work/d/cert.pem" \
    --secret "$work/d/token.secret" --users "$2" --endpoints 16 --duration 400s \
    --talk-interval 100h --grace 1s >"$work/load.out" 2>&1 &
  lp=$!
}

read -r -a relays <<<"${RELAYS:-$relay}"
read -r -a cryptos <<<"${CRYPTOS:-rustls lean}"
for round in $(seq "$rounds"); do
  echo "round $round"
  rate quinn "$load" sink --listen 127.0.0.1:4478 --cert "$work/d/cert.pem" --key "$work/d/key.pem"
  for c in "${cryptos[@]}"; do
    rate "p-$c" "$proto" --mode sink --crypto "$c" --listen 127.0.0.1:4478 \
      --cert "$work/d/cert.pem" --key "$work/d/key.pem"
  done
  for n in "${sizes[@]}"; do
   for r in "${relays[@]}"; do
    rm -rf "$work/relay"
    cp -r "$work/d" "$work/relay"
    label=relay
    [ ${#relays[@]} -gt 1 ] && label=$(basename "$r")
    taskset -c 0 "$r" serve --data-dir "$work/relay" --listen 127.0.0.1:4476 \
      --admin 127.0.0.1:9496 --web off --max-handshakes-per-second 0 \
      --max-connections 250000 >/dev/null 2>&1 &
    rp=$!
    wait_ready "$work/relay" 127.0.0.1:9496
    s0=$(awk '/VmRSS/{print $2}' /proc/$rp/status)
    hold 4476 "$n"
    idle "$label" "$n" "$rp" "$s0" sessions_open 127.0.0.1:9496
    kill "$lp" "$rp" 2>/dev/null || true
    wait "$lp" "$rp" 2>/dev/null || true
   done
   for c in "${cryptos[@]}"; do
    taskset -c 0 "$proto" --mode ptt --crypto "$c" --listen 127.0.0.1:4479 --cert "$work/d/cert.pem" \
      --key "$work/d/key.pem" --secret "$work/d/token.secret" >"$work/proto.log" 2>&1 &
    pp=$!
    sleep 1
    s0=$(awk '/VmRSS/{print $2}' /proc/$pp/status)
    hold 4479 "$n"
    idle "p-$c" "$n" "$pp" "$s0" proto_sessions
    kill "$lp" "$pp" 2>/dev/null || true
    wait "$lp" "$pp" 2>/dev/null || true
   done
  done
done
