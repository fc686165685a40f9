#!/usr/bin/env bash
# The durable and the in-memory relay measured AT THE SAME TIME, so that the
# machine's noise (on a shared VM a relay's CPU per packet moves by up to 2x
# from one minute to the next) is common to both: both relays on core 0,
# each in its own cgroup with equal cpu.shares; their two load generators
# together on core 1, each in its own cgroup. Prints the clip-rate ratio
# and each relay's CPU per packet, per round. Latencies are about doubled
# (half a core each): compare ratios between builds, not with other rows.
#
# usage (root, cgroup v1 cpu controller, release build):
#   scripts/bench-store-at-once.sh [ROUNDS] [DURABLE_BINARY]
# env: DUR (default 8s), USERS (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
durable_bin=${2:-target/release/ptt-relay}
bin=target/release
cg=/sys/fs/cgroup/cpu
work=$(mktemp -d)
limits="--max-clips-per-minute 0 --max-clip-bytes-per-minute 0 --max-handshakes-per-second 0"
for g in relay-d relay-m load-d load-m; do
  mkdir -p "$cg/$g"
  echo 1024 >"$cg/$g/cpu.shares"
done
mkdir -p "$work/d" "$work/m"
# shellcheck disable=SC2086
taskset -c 0 "$durable_bin" serve --data-dir "$work/d" --listen 127.0.0.1:4433 \
  --admin 127.0.0.1:9470 --web off $limits >"$work/d.log" 2>&1 &
pd=$!
# shellcheck disable=SC2086
taskset -c 0 $bin/ptt-relay serve --data-dir "$work/m" --store memory \
  --listen 127.0.0.1:4434 --admin 127.0.0.1:9471 --web off $limits >"$work/m.log" 2>&1 &
pm=$!
trap 'kill $pd $pm 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 1.5
echo $pd >"$cg/relay-d/cgroup.procs"
echo $pm >"$cg/relay-m/cgroup.procs"
for i in $(seq "$rounds"); do
  loads=""
  for k in d m; do
    if [ $k = d ]; then port=4433 pid=$pd; else port=4434 pid=$pm; fi
    (
      echo $BASHPID >"$cg/load-$k/cgroup.procs"
      exec taskset -c 1 $bin/client-sim load --relay 127.0.0.1:$port \
        --ca "$work/$k/cert.pem" --secret "$work/$k/token.secret" --relay-pid $pid \
        --users "${USERS:-200}" --duration "${DUR:-8s}" --clip-min 1s --clip-max 1s \
        --mode upload --talk-interval 1ms --report-json "$work/$k-$i.json" >/dev/null 2>&1
    ) &
    loads="$loads $!"
  done
  # shellcheck disable=SC2086
  wait $loads
  python3 - "$work/d-$i.json" "$work/m-$i.json" "$i" <<'PY'
import json, sys
d, m = (json.load(open(f)) for f in sys.argv[1:3])
print(f"round {sys.argv[3]}: durable {d['clips_per_s']:.0f} clips/s, memory {m['clips_per_s']:.0f}, "
      f"ratio {d['clips_per_s'] / m['clips_per_s']:.3f}; CPU per packet "
      f"{d['relay']['cpu_us_per_packet']:.2f} vs {m['relay']['cpu_us_per_packet']:.2f} us; "
      f"lost {d['lost']} / {m['lost']}")
PY
done
