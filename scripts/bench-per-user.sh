#!/usr/bin/env bash
# Every figure of "bytes and memory per user", this build against an
# earlier relay build, side by side: each case starts a fresh relay of one
# build on core 0 and runs `client-sim load` (this build's) on core 1;
# builds alternate case by case, ROUNDS rounds. Prints one line per run
# (with lost/duplicated/corrupted) and the medians per case and build.
#
#   scripts/bench-per-user.sh ROUNDS OTHER_PTT_RELAY_BINARY
#   CASES="live-lean idle" scripts/bench-per-user.sh 3 /tmp/ptt-relay-old
#
# Cases (CASES, default all):
#   live-default  live talk, 20 ms frames, default ACK delays, 80 ms RTT
#   live-lean     live talk, 60 ms frames, ACKs delayed up to the RTT
#                 (relay --ack-delay 200ms, load --client-ack-delay 200ms)
#   upload-wire   recorded clips uploaded as fast as the path allows
#   clip-rate     1 s clips, closed loop, against `client-sim baseline` to a
#                 bare quinn sink measured in the same round
#   idle          20,000 idle authenticated sessions: relay RSS per session
#   active        1,000 users talking one to one: relay RSS per user
#
# Needs `cargo build --release -p relay -p client-sim`, espeak-ng, sox,
# curl and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
other=${2:?the other build\'s ptt-relay binary}
cases=${CASES:-live-default live-lean upload-wire clip-rate idle active}
sim=target/release/client-sim
declare -A bin=([this]=target/release/ptt-relay [other]=$other)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
speech_opus "$work" "$sim" 20 60

relay_pid=
start_relay() { # binary flags...
  local bin=$1
  shift
  rm -rf "$work/data"
  taskset -c 0 "$bin" serve --data-dir "$work/data" --listen 127.0.0.1:4481 \
    --admin 127.0.0.1:9521 "$@" >"$work/relay.log" 2>&1 &
  relay_pid=$!
  wait_ready "$work/data" 127.0.0.1:9521
}
stop_relay() {
  kill "$relay_pid" 2>/dev/null || true
  wait "$relay_pid" 2>/dev/null || true
}
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$relay_pid/status"; }
load() { # report-json args...
  local out=$1
  shift
  rm -f "$out"
  taskset -c 1 "$sim" load --relay 127.0.0.1:4481 --ca "$work/data/cert.pem" \
    --secret "$work/data/token.secret" --relay-pid "$relay_pid" "$@" \
    --report-json "$out" >"$work/load.log" 2>&1 || tail -3 "$work/load.log"
}

# One case against one build; appends a JSON line to $work/results.
run_case() { # case build-name binary baseline-clips-per-s
  local c=$1 name=$2 bin=$3 base=$4 extra
  mapfile -t extra < <(web_off "$bin")
  local live=(--users 200 --duration 20s --talk-interval 5s --clip-min 3s --clip-max 6s --delay 40ms)
  local rate=(--max-clips-per-minute 0 --max-clip-bytes-per-minute 0 --max-handshakes-per-second 0)
  local r0=0
  case $c in
  live-default)
    start_relay "$bin" "${extra[@]}"
    load "$work/r.json" --opus "$work/s20.opus" "${live[@]}" ;;
  live-lean)
    start_relay "$bin" "${extra[@]}" --ack-delay 200ms
    load "$work/r.json" --opus "$work/s60.opus" --client-ack-delay 200ms "${live[@]}" ;;
  upload-wire)
    start_relay "$bin" "${extra[@]}"
    load "$work/r.json" --users 50 --duration 10s --mode upload --talk-interval 2s \
      --clip-min 5s --clip-max 10s --seed 7 ;;
  clip-rate)
    start_relay "$bin" "${extra[@]}" "${rate[@]}"
    load "$work/r.json" --users 200 --duration 8s --clip-min 1s --clip-max 1s --mode upload \
      --talk-interval 1ms ;;
  idle)
    start_relay "$bin" "${extra[@]}" --max-handshakes-per-second 0 --max-connections 250000
    r0=$(rss_kib)
    load "$work/r.json" --users 20000 --endpoints 16 --duration 45s --talk-interval 100h \
      --grace 1s ;;
  active)
    start_relay "$bin" "${extra[@]}"
    r0=$(rss_kib)
    load "$work/r.json" --users 1000 --endpoints 8 --duration 20s --talk-interval 4s \
      --clip-min 1s --clip-max 3s ;;
  esac
  stop_relay
  python3 - "$work/r.json" "$c" "$name" "$r0" "$base" >>"$work/results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, name, r0, base = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
u = r["workload"]["users"]
out = {"case": c, "build": name, "lost": r["lost"], "duplicated": r["duplicated"],
       "corrupted": r["corrupted"], "clips": r["deliveries_ok"]}
wire, setup, opus = r["wire_bytes_per_voice_s"], r["connect_bytes_per_voice_s"], r["opus_bytes_per_voice_s"]
if c.startswith("live") or c == "upload-wire":
    out.update(wire=wire, opus=opus, ratio=wire / opus, steady=(wire - setup) / opus,
               first_p50=r["first_frame_ms"]["p50"])
elif c == "clip-rate":
    out.update(clips_per_s=r["clips_per_s"], baseline=base, ratio=r["clips_per_s"] / base)
else:
    # idle: RSS at the end of the run (every session still open); active:
    # the run's peak, both less the relay's RSS before the load.
    rss = r["relay"]["rss_end_mib" if c == "idle" else "rss_max_mib"] * 1024
    out.update(kib_per_user=(rss - r0) / u, users=u)
print(json.dumps(out))
PY
  tail -1 "$work/results"
}

baseline() { # the bare quinn sink's clip rate, same clips, same pinning
  taskset -c 0 "$sim" sink --listen 127.0.0.1:4489 --cert "$work/sink/cert.pem" \
    --key "$work/sink/key.pem" >/dev/null 2>&1 &
  local sp=$!
  sleep 1
  taskset -c 1 "$sim" baseline --sink 127.0.0.1:4489 --cert "$work/sink/cert.pem" --users 200 \
    --duration 8s --clip-min 1s --clip-max 1s --report-json "$work/b.json" >/dev/null 2>&1
  kill "$sp"
  wait "$sp" 2>/dev/null || true
  python3 -c "import json; print(json.load(open('$work/b.json'))['clips_per_s'])"
}
if [[ " $cases " == *" clip-rate "* ]]; then
  # A certificate for the sink: the one a relay makes in its data dir.
  start_relay "${bin[this]}" --web off
  mkdir -p "$work/sink"
  cp "$work/data/cert.pem" "$work/data/key.pem" "$work/sink/"
  stop_relay
fi

for round in $(seq "$rounds"); do
  echo "round $round"
  order="this other"
  if ((round % 2 == 0)); then order="other this"; fi
  for c in $cases; do
    base=0
    if [ "$c" = clip-rate ]; then base=$(baseline); echo "  baseline sink $base clips/s"; fi
    for b in $order; do
      run_case "$c" "$b" "${bin[$b]}" "$base"
    done
  done
done

echo "medians over $rounds rounds (this / other):"
python3 - "$work/results" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
bad = [r for r in rows if r["lost"] or r["duplicated"] or r["corrupted"]]
for c in dict.fromkeys(r["case"] for r in rows):
    def med(b, k):
        v = [r[k] for r in rows if r["case"] == c and r["build"] == b and k in r]
        return st.median(v) if v else float("nan")
    keys = [k for k in ("ratio", "steady", "wire", "first_p50", "clips_per_s", "baseline", "kib_per_user")
            if k in next(r for r in rows if r["case"] == c)]
    print(f"{c:13} " + "  ".join(f"{k} {med('this', k):.3f} / {med('other', k):.3f}" for k in keys))
print(f"runs with a lost, duplicated or corrupted clip: {len(bad)} of {len(rows)}")
PY
