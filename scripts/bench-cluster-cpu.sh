#!/usr/bin/env bash
# CPU per clip (relay + NATS) for the clip-rate workload (200 users, 1 s
# clips uploaded back to back, closed loop), in four layouts, each on
# core 0 with the load on core 1, rounds alternating:
#   single    one relay, not clustered
#   cluster1  one relay on a nats-server -js
#   cluster2  two relays on one nats-server -js (users spread over both)
#   regions2  two regions, a nats-server each (JetStream domains a and b,
#             b a leaf node of a), a relay in each (replicas_in_other_regions 1)
# Prints clips/s and CPU µs per accepted clip: relays, NATS, and the sum,
# read from /proc before and after each run; zero lost is checked.
#
#   cargo build --release -p relay -p client-sim
#   scripts/bench-cluster-cpu.sh ROUNDS [LAYOUT...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
layouts=("$@")
[ ${#layouts[@]} -gt 0 ] || layouts=(single cluster1 cluster2 regions2)
relay=target/release/ptt-relay
load=target/release/client-sim
flags=(--max-clips-per-minute 0 --max-clip-bytes-per-minute 0 --max-handshakes-per-second 0 --web off)
work=$(mktemp -d)
echo "work dir $work" >&2
# Servers start in command substitutions (not jobs of this shell): their
# pids are kept in a file for the exit trap.
trap 'kill $(cat "$work/pids" 2>/dev/null) 2>/dev/null || true; sleep 0.5; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
tick=$(getconf CLK_TCK)
cpu() { # pids... -> total CPU ticks
  local t=0 p
  for p in "$@"; do
    if [ ! -e "/proc/$p/stat" ]; then
      echo "process $p is gone (logs in $work)" >&2
      exit 1
    fi
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $t
}
nats() { # name port [extra config] -> pid
  local d="$work/nats-$1"
  mkdir -p "$d"
  printf 'server_name: %s\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s" %s }\n%s\n' \
    "$1" "$2" "$d/js" "${3:+, $3}" "${4:-}" >"$d/nats.conf"
  taskset -c 0 nats-server -c "$d/nats.conf" >"$d/log" 2>&1 &
  echo $! | tee -a "$work/pids"
}
start_relay() { # name port extra-flags... -> pid (first relay makes the keys)
  local name=$1 port=$2
  shift 2
  mkdir -p "$work/$name"
  if [ "$name" != r1 ]; then cp "$work"/r1/{cert.pem,key.pem,token.secret} "$work/$name/"; fi
  taskset -c 0 "$relay" serve --data-dir "$work/$name" --listen "127.0.0.1:$port" \
    --admin "127.0.0.1:$((port + 1))" "${flags[@]}" "$@" >/dev/null 2>"$work/$name.log" &
  local pid=$!
  echo $pid >>"$work/pids"
  for _ in $(seq 50); do
    [ -s "$work/$name/token.secret" ] && grep -q "listening on QUIC" "$work/$name.log" && break
    sleep 0.2
  done
  echo $pid
}
run() { # layout
  local relays=() natsp=() addrs
  rm -rf "$work"/r1 "$work"/r2 "$work"/nats-*
  case $1 in
    single)
      relays+=("$(start_relay r1 4451)"); addrs=127.0.0.1:4451 ;;
    cluster1)
      natsp+=("$(nats n1 14251)"); sleep 1
      relays+=("$(start_relay r1 4451 --cluster nats://127.0.0.1:14251)"); addrs=127.0.0.1:4451 ;;
    cluster2)
      natsp+=("$(nats n1 14251)"); sleep 1
      relays+=("$(start_relay r1 4451 --cluster nats://127.0.0.1:14251)")
      relays+=("$(start_relay r2 4453 --cluster nats://127.0.0.1:14251)")
      addrs=127.0.0.1:4451,127.0.0.1:4453 ;;
    regions2)
      natsp+=("$(nats a 14251 'domain: a' 'leafnodes { listen: 127.0.0.1:14261 }')")
      natsp+=("$(nats b 14252 'domain: b' 'leafnodes { remotes: [ { urls: [ "nats-leaf://127.0.0.1:14261" ] } ] }')")
      sleep 2
      relays+=("$(start_relay r1 4451 --cluster nats://127.0.0.1:14251 --region a --regions a,b)")
      relays+=("$(start_relay r2 4453 --cluster nats://127.0.0.1:14252 --region b --regions a,b)")
      addrs=127.0.0.1:4451,127.0.0.1:4453 ;;
  esac
  sleep 2
  local r0 n0 r1 n1
  r0=$(cpu "${relays[@]}")
  n0=$( [ ${#natsp[@]} -gt 0 ] && cpu "${natsp[@]}" || echo 0)
  rm -f "$work/r.json"
  taskset -c 1 "$load" load --relay "$addrs" --ca "$work/r1/cert.pem" --secret "$work/r1/token.secret" \
    --users 200 --duration 8s --clip-min 1s --clip-max 1s --mode upload --talk-interval 1ms \
    --report-json "$work/r.json" >"$work/load.log" 2>&1 || tail -3 "$work/load.log"
  r1=$(cpu "${relays[@]}")
  n1=$( [ ${#natsp[@]} -gt 0 ] && cpu "${natsp[@]}" || echo 0)
  python3 - "$work/r.json" "$1" $((r1 - r0)) $((n1 - n0)) "$tick" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name, relay, nats, tick = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n = max(r['clips_accepted'], 1)
us = lambda t: t / tick * 1e6 / n
print(f"{name:9} clips/s {r['clips_per_s']:8.1f}  µs per clip: relays {us(relay):6.1f}  NATS {us(nats):6.1f}  "
      f"sum {us(relay + nats):6.1f}  lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}", flush=True)
PY
  # Not this shell's children: wait until they are gone (their ports free).
  kill "${relays[@]}" "${natsp[@]}" 2>/dev/null || true
  local p
  for p in "${relays[@]}" "${natsp[@]}"; do
    while [ -e "/proc/$p" ]; do sleep 0.1; done
  done
}
for round in $(seq "$rounds"); do
  echo "round $round"
  order=("${layouts[@]}")
  if [ $((round % 2)) -eq 0 ]; then
    order=(); for ((i = ${#layouts[@]} - 1; i >= 0; i--)); do order+=("${layouts[$i]}"); done
  fi
  for l in "${order[@]}"; do run "$l"; done
done
