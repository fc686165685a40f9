#!/usr/bin/env bash
# A cluster's NATS outage under load, as an operator would try it
# (docs/benchmarks.md, "A NATS outage under load"): two relays
# (`--cluster`) on one `nats-server -js`, `client-sim load` over both, NATS
# killed with -9 at OUTAGE_AT and started again on the same store OUTAGE
# later. Each round runs a channel workload and a one-to-one workload and
# prints lost/duplicated, the delivery p99 across the outage, and when the
# clips the outage held back were all delivered, counted from NATS's
# return (the end of the last second in which a clip arrived more than 2 s
# after its sender finished it).
#
#   scripts/bench-outage.sh [ROUNDS]        (release builds of ptt-relay and client-sim)
# BIN=DIR takes the binaries from DIR; OUTAGE_AT and OUTAGE (seconds) move the outage.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
rounds=${1:-3}
bin=${BIN:-target/release}
OUTAGE_AT=${OUTAGE_AT:-10}
OUTAGE=${OUTAGE:-15}
work=$(mktemp -d)
pids=()
# KEEP=1 keeps the runs' logs and reports (the directory is printed).
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# one_run DIR CHANNEL_SIZE: prints one result line
one_run() {
  local d=$1 cs=$2 np q1 q2 a1 a2
  np=$(free_port); q1=$(free_port); q2=$(free_port); a1=$(free_port); a2=$(free_port)
  mkdir -p "$d/r1" "$d/r2"
  nats-server -a 127.0.0.1 -p "$np" -js -sd "$d/nats" >"$d/nats.log" 2>&1 &
  local nats=$!; pids+=("$nats")
  mapfile -t web < <(web_off "$bin/ptt-relay")
  "$bin/ptt-relay" serve --data-dir "$d/r1" --listen "127.0.0.1:$q1" --admin "127.0.0.1:$a1" \
    "${web[@]}" --cluster "nats://127.0.0.1:$np" >"$d/r1.log" 2>&1 &
  local r1=$!; pids+=("$r1")
  wait_ready "$d/r1" "http://127.0.0.1:$a1"
  cp "$d/r1/"{cert.pem,key.pem,token.secret} "$d/r2/"
  "$bin/ptt-relay" serve --data-dir "$d/r2" --listen "127.0.0.1:$q2" --admin "127.0.0.1:$a2" \
    "${web[@]}" --cluster "nats://127.0.0.1:$np" >"$d/r2.log" 2>&1 &
  local r2=$!; pids+=("$r2")
  wait_ready "$d/r2" "http://127.0.0.1:$a2"
  local cross=()
  [ "$cs" = 0 ] && cross=(--cross-relay true)
  "$bin/client-sim" load --relay "127.0.0.1:$q1,127.0.0.1:$q2" --ca "$d/r1/cert.pem" \
    --secret "$d/r1/token.secret" --users 100 --duration 40s --talk-interval 3s \
    --clip-min 1s --clip-max 3s --grace 30s --channel-size "$cs" "${cross[@]}" \
    --report-json "$d/run.json" >"$d/load.log" 2>&1 &
  local load=$!
  sleep "$OUTAGE_AT"
  kill -9 "$nats"; wait "$nats" 2>/dev/null || true
  sleep "$OUTAGE"
  nats-server -a 127.0.0.1 -p "$np" -js -sd "$d/nats" >>"$d/nats.log" 2>&1 &
  nats=$!; pids+=("$nats")
  local back_ms
  back_ms=$(date +%s%3N)
  wait "$load" || true
  kill "$r1" "$r2" "$nats" 2>/dev/null || true
  wait "$r1" "$r2" "$nats" 2>/dev/null || true
  python3 - "$d/run.json" "$back_ms" "$cs" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); back = (int(sys.argv[2]) - r["started_unix_ms"]) / 1000
late = [p["t_s"] + 1 for p in r["timeline"] if p["delivery_max_ms"] > 2000]
drained = (max(late) - back) if late else float("nan")
kind = "channels of " + sys.argv[3] if sys.argv[3] != "0" else "one-to-one"
print(f"{kind:15} accepted {r['clips_accepted']:5}  ok {r['deliveries_ok']:5}  lost {r['lost']}  dup {r['duplicated']}"
      f"  delivery p99 {r['delivery_ms']['p99']:8.0f} ms  backlog delivered {drained:+.1f} s after NATS was back")
PY
}

for i in $(seq "$rounds"); do
  for cs in 10 0; do
    one_run "$work/$i-$cs" "$cs"
  done
done
