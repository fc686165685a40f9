#!/usr/bin/env bash
# Where a relayed clip's CPU goes: the clip-rate workload (200 users, 1 s
# clips, closed loop, `client-sim load --mode upload`) against a relay on
# core 0, the load on core 1, `perf record --call-graph dwarf` on the
# relay for 6 s of it; the relay's CPU per clip split by inclusive share
# into quinn's connection drivers and endpoint, the relay's upload tasks,
# its sessions (control stream, delivery pump, accepting uploads) and the
# store's committer thread. Several relay binaries are profiled in turn,
# round by round, so builds are compared side by side.
#
#   scripts/profile-clip.sh ROUNDS PTT_RELAY_BINARY...
#
# Needs `cargo build --release -p relay -p client-sim` first, perf and
# taskset. Prints one line per binary and round.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:?rounds}
shift
load=target/release/client-sim
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
profile() { # binary
  local relay=$1 d=$work/data
  rm -rf "$d"
  taskset -c 0 "$relay" serve --data-dir "$d" --listen 127.0.0.1:4451 --admin 127.0.0.1:9491 \
    --web off --max-clips-per-minute 0 --max-clip-bytes-per-minute 0 \
    --max-handshakes-per-second 0 >/dev/null 2>&1 &
  local pid=$!
  sleep 2
  local args=(load --relay 127.0.0.1:4451 --ca "$d/cert.pem" --secret "$d/token.secret"
    --relay-pid "$pid" --users 200 --clip-min 1s --clip-max 1s --mode upload --talk-interval 1ms)
  # A first run warms the relay (its store's files, the allocator).
  taskset -c 1 "$load" "${args[@]}" --duration 6s >/dev/null 2>&1
  perf record -F 2000 -g --call-graph dwarf,16384 -p "$pid" -o "$work/perf.data" \
    -- sleep 6 >/dev/null 2>&1 &
  local perf=$!
  sleep 0.5
  taskset -c 1 "$load" "${args[@]}" --duration 8s --report-json "$work/r.json" >/dev/null 2>&1
  wait "$perf" || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  perf report -i "$work/perf.data" --no-inline --children --sort sym --stdio -g none 2>/dev/null >"$work/report.txt"
  python3 - "$work/r.json" "$work/report.txt" "$relay" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
us = r['relay']['cpu_percent'] * 1e4 / r['clips_per_s']
share = {}
for line in open(sys.argv[2]):
    m = re.match(r'\s*([\d.]+)%\s+[\d.]+%\s+\[.\]\s+(.*?)\s*$', line)
    if m and m.group(2) not in share:
        share[m.group(2)] = float(m.group(1))
parts = [
    ('quinn conn', '<quinn::connection::ConnectionDriver as core::future::future::Future>::poll'),
    ('quinn endpoint', '<quinn::endpoint::EndpointDriver as core::future::future::Future>::poll'),
    ('upload', 'relay::conn::upload::upload::{{closure}}'),
    ('sessions', 'relay::server::accept_loop::{{closure}}::{{closure}}'),
    ('committer', 'relay::disk_store::committer::<impl relay::disk_store::Committer>::run'),
]
got = {name: share.get(sym, 0.0) for name, sym in parts}
own = got['upload'] + got['sessions'] + got['committer']
cells = '  '.join(f"{n} {got[n]:4.1f}% {us * got[n] / 100:5.1f}" for n, _ in parts)
print(f"{sys.argv[3]}: clips/s {r['clips_per_s']:7.0f}  us/clip {us:6.1f}  {cells}  "
      f"relay's own {own:4.1f}% {us * own / 100:5.1f} us  lost {r['lost']} dup {r['duplicated']}")
PY
}
for round in $(seq "$rounds"); do
  echo "round $round"
  # The order flips every round.
  order=("$@")
  if [ $((round % 2)) -eq 0 ]; then
    order=()
    for ((i = $#; i >= 1; i--)); do order+=("${!i}"); done
  fi
  for relay in "${order[@]}"; do
    profile "$relay"
  done
done
