#!/usr/bin/env bash
# Two relay builds side by side on core 0 (this build and an earlier one),
# the same `client-sim load` against each in turn on core 1, builds
# alternating round by round: the upload clip rate and the relay's CPU per
# delivered packet (live), with lost/duplicated/corrupted for every run.
# ONLY_UPLOAD=1 leaves out the live run.
#
#   scripts/bench-vs-build.sh ROUNDS OTHER_PTT_RELAY_BINARY
#
# SINK=1 adds, each round, the same upload workload against a bare quinn
# sink (`client-sim sink` on core 0): the reference for the clip rate, and
# its CPU per clip for the relay's (`us/clip`: CPU over the run / clips).
# CHANNEL=1 adds a channel run (one talker, 999 members) to each round.
# CLUSTER=1 runs each relay clustered, on a `nats-server -js` of its own
# (also on core 0): the clustered relay's clip rate, build against build.
# CLUSTER=this clusters only this build (pass this very binary as the
# other one): a clustered relay against a single one, side by side, with
# nats-server's CPU per clip.
# PAIRS=1 adds, each round, the upload workload in fixed pairs (100
# talkers, each to its own listener: `--pairs true`), whose report counts
# datagrams per clip on each leg and direction; every upload run prints
# its datagrams per clip relayed.
#
# Needs `cargo build --release -p relay -p client-sim` first, and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
rounds=${1:-3}
other=${2:?the other build\'s ptt-relay binary}
load=target/release/client-sim
flags=(--max-clips-per-minute 0 --max-clip-bytes-per-minute 0 --max-handshakes-per-second 0)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
echo "work dir $work" >&2
cluster_this=() cluster_other=()
if [ -n "${CLUSTER:-}" ]; then
  for p in 14231 14232; do
    taskset -c 0 nats-server -a 127.0.0.1 -p $p -js -sd "$work/nats-$p" >/dev/null 2>&1 &
  done
  sleep 1
  cluster_this=(--cluster nats://127.0.0.1:14231) cluster_other=(--cluster nats://127.0.0.1:14232)
  [ "$CLUSTER" = this ] && cluster_other=()
fi
taskset -c 0 target/release/ptt-relay serve --data-dir "$work/this" --listen 127.0.0.1:4441 \
  --admin 127.0.0.1:9481 --web off "${flags[@]}" "${cluster_this[@]}" 2>"$work/this.log" >/dev/null &
pid_this=$!
mapfile -t web < <(web_off "$other")
taskset -c 0 "$other" serve --data-dir "$work/other" --listen 127.0.0.1:4442 \
  --admin 127.0.0.1:9482 "${web[@]}" "${flags[@]}" "${cluster_other[@]}" 2>"$work/other.log" >/dev/null &
pid_other=$!
sleep 2
cat >"$work/show.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = r['relay']['cpu_us_per_packet'] if r.get('relay') else float('nan')
# The relay's CPU per clip accepted (core-µs), and listeners' first frame.
per_clip = (r['relay']['cpu_percent'] * 1e4 / r['clips_per_s']
            if r.get('relay') and r['clips_per_s'] else float('nan'))
ff = r['first_frame_ms']
legs = [r.get('datagrams_per_clip_' + k) for k in
        ('sender_to_relay', 'relay_to_sender', 'relay_to_recipient', 'recipient_to_relay')]
dg = f"  datagrams/clip {r['datagrams_per_clip']:5.2f}" if r.get('datagrams_per_clip') else ""
if None not in legs:
    dg += " (s>r {:.2f} r>s {:.2f} r>rcp {:.2f} rcp>r {:.2f})".format(*legs)
print(f"{sys.argv[3]:7} {sys.argv[2]:6} clips/s {r['clips_per_s']:9.1f}  relay us/packet "
      f"{cpu:6.2f} us/clip {per_clip:6.1f}  first frame p50/p99 {ff['p50']:.2f}/{ff['p99']:.2f} ms"
      f"  lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}{dg}")
PY
run() { # name port pid label load-args...
  local name=$1 port=$2 pid=$3 label=$4
  shift 4
  rm -f "$work/r.json"
  taskset -c 1 "$load" load --relay "127.0.0.1:$port" --ca "$work/$name/cert.pem" \
    --secret "$work/$name/token.secret" --relay-pid "$pid" "$@" \
    --report-json "$work/r.json" >"$work/load.log" 2>&1 || { tail -3 "$work/load.log"; tail -3 "$work/$name.log"; }
  python3 "$work/show.py" "$work/r.json" "$name" "$label"
}
sink() { # the upload workload against a bare quinn sink on core 0
  rm -f "$work/b.json"
  taskset -c 0 "$load" sink --listen 127.0.0.1:4443 --cert "$work/this/cert.pem" \
    --key "$work/this/key.pem" >/dev/null 2>&1 &
  local sp=$! c0 c1 t0 t1
  sleep 1
  # The sink's CPU (user + system ticks) over the run, as the relay's is
  # measured: its CPU per clip is the reference beside the relay's.
  c0=$(awk '{print $14 + $15}' "/proc/$sp/stat")
  t0=$(date +%s.%N)
  taskset -c 1 "$load" baseline --sink 127.0.0.1:4443 --cert "$work/this/cert.pem" "$@" \
    --report-json "$work/b.json" >/dev/null 2>&1 || true
  c1=$(awk '{print $14 + $15}' "/proc/$sp/stat")
  t1=$(date +%s.%N)
  kill "$sp" 2>/dev/null || true
  wait "$sp" 2>/dev/null || true
  python3 - "$work/b.json" "$c0" "$c1" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
c0, c1, t0, t1, tck = (float(x) for x in sys.argv[2:7])
cpu_s = (c1 - c0) / tck
print(f"upload  sink   clips/s {b['clips_per_s']:9.1f}  sink cpu {100 * cpu_s / (t1 - t0):5.1f}%  "
      f"us/clip {cpu_s * 1e6 / max(b['clips'], 1):6.1f}")
PY
}
for round in $(seq "$rounds"); do
  echo "round $round"
  if [ -n "${SINK:-}" ]; then
    sink --users 200 --duration 8s --clip-min 1s --clip-max 1s --mode upload --talk-interval 1ms
  fi
  # The order flips every round (the first run of a round may find the
  # machine in another state than the second).
  order="this other"
  [ $((round % 2)) -eq 0 ] && order="other this"
  for b in $order; do
    if [ $b = this ]; then port=4441 pid=$pid_this; else port=4442 pid=$pid_other; fi
    run $b $port "$pid" upload --users 200 --duration 8s --clip-min 1s --clip-max 1s \
      --mode upload --talk-interval 1ms
    if [ -n "${PAIRS:-}" ]; then
      run $b $port "$pid" pairs --users 200 --duration 8s --clip-min 1s --clip-max 1s \
        --mode upload --talk-interval 1ms --pairs true
    fi
    [ -n "${ONLY_UPLOAD:-}" ] && continue
    run $b $port "$pid" live --users 1000 --duration 15s --talk-interval 2s \
      --clip-min 1s --clip-max 3s
    if [ -n "${CHANNEL:-}" ]; then
      # One talker, 999 listening members of its channel: relay CPU per
      # delivered frame.
      run $b $port "$pid" channel --users 1000 --channel-size 1000 --talkers-per-channel 1 \
        --talk-interval 1s --duration 15s --clip-min 1s --clip-max 2s --endpoints 16 --grace 30s
    fi
  done
done
