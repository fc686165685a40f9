#!/usr/bin/env bash
# Two client-sim builds (this one and an earlier one) against the same
# relay build: per round, for each client build in turn (order flipping
# every round), a fresh relay on core 0 and the clip-rate load on core 1,
# then `client-sim sink` on core 0 and that build's `client-sim baseline`
# on core 1. Prints clips/s, lost/duplicated/corrupted, datagrams per clip
# to and from the relay, the sink's clips/s and the ratio.
#
#   scripts/bench-client-ab.sh ROUNDS OTHER_CLIENT_SIM_BINARY
#
# Needs `cargo build --release -p relay -p client-sim` first, and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
other=${2:?the other build\'s client-sim binary}
relay=target/release/ptt-relay
declare -A sim=([this]=target/release/client-sim [other]=$other)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
flags=(--max-clips-per-minute 0 --max-clip-bytes-per-minute 0 --max-handshakes-per-second 0)
clips=(--users 200 --duration 8s --clip-min 1s --clip-max 1s --talk-interval 1ms)

for r in $(seq "$rounds"); do
  order="this other"
  if ((r % 2 == 0)); then order="other this"; fi
  for b in $order; do
    rm -rf "$work/data"
    taskset -c 0 "$relay" serve --data-dir "$work/data" --listen 127.0.0.1:4483 \
      --admin 127.0.0.1:9523 --web off "${flags[@]}" >"$work/relay.log" 2>&1 &
    pid=$!
    wait_ready "$work/data" 127.0.0.1:9523
    taskset -c 1 "${sim[$b]}" load --relay 127.0.0.1:4483 --ca "$work/data/cert.pem" \
      --secret "$work/data/token.secret" --relay-pid "$pid" --mode upload "${clips[@]}" \
      --report-json "$work/r.json" >"$work/load.log" 2>&1 || tail -3 "$work/load.log"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    taskset -c 0 "${sim[$b]}" sink --listen 127.0.0.1:4490 --cert "$work/data/cert.pem" \
      --key "$work/data/key.pem" >/dev/null 2>&1 &
    sink=$!
    sleep 1
    taskset -c 1 "${sim[$b]}" baseline --sink 127.0.0.1:4490 --cert "$work/data/cert.pem" \
      "${clips[@]}" --report-json "$work/b.json" >/dev/null 2>&1
    kill "$sink"
    wait "$sink" 2>/dev/null || true
    python3 - "$work/r.json" "$work/b.json" "$r" "$b" <<'PY'
import json, sys
r, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
n = max(r["deliveries_ok"], 1)
print(f"round {sys.argv[3]} {sys.argv[4]:5} relay {r['clips_per_s']:8.0f} clips/s  "
      f"lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}  "
      f"datagrams per clip to/from relay {r['datagrams_to_relay'] / n:.2f}/"
      f"{r['datagrams_from_relay'] / n:.2f}  sink {b['clips_per_s']:8.0f}  "
      f"ratio {r['clips_per_s'] / b['clips_per_s']:.3f}")
PY
  done
done
