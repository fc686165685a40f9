#!/usr/bin/env bash
# Live voice's bytes on the wire against its Opus frame length: the same
# speech encoded with 20, 40 and 60 ms frames (`client-sim encode
# --frame-ms`), the same live `client-sim load` with each, ROUNDS rounds,
# frame lengths alternating. Relay on core 0, load on core 1.
#
#   scripts/bench-frames.sh [ROUNDS]
#   FRAMES="20 60" ACK_DELAYS="25ms 100ms" scripts/bench-frames.sh 3
#
# ACK_DELAYS: the longest ACK delay both ends ask of each other (relay
# `--ack-delay`, load `--client-ack-delay`), one relay per value; each
# round runs every frame length with every delay. quinn asks for no more
# than the path's RTT (and at least 25 ms), so longer delays only show on
# a path with a longer RTT: DELAY adds that one-way delay to every user's
# link (load `--delay`, e.g. DELAY=40ms for an 80 ms RTT).
#
# Needs `cargo build --release -p relay -p client-sim`, espeak-ng, sox and
# taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
sim=target/release/client-sim
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
speech_opus "$work" "$sim" 20 40 60
frames=${FRAMES:-20 40 60}
acks=${ACK_DELAYS:-25ms}
port=4461
declare -A relay_port relay_pid
for a in $acks; do
  taskset -c 0 target/release/ptt-relay serve --data-dir "$work/relay-$a" --listen 127.0.0.1:$port \
    --admin 127.0.0.1:$((port + 5040)) --web off --ack-delay "$a" 2>"$work/relay-$a.log" >/dev/null &
  relay_pid[$a]=$!
  relay_port[$a]=$port
  port=$((port + 1))
done
sleep 2
cat >"$work/show.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = r["first_frame_ms"]
print(f"{sys.argv[2]:>3} ms frames, ACK delay {sys.argv[3]:>5}: wire {r['wire_bytes_per_voice_s']:7.0f} B/voice-s ({r['connect_bytes_per_voice_s']:.0f} to Welcome), "
      f"Opus {r['opus_bytes_per_voice_s']:6.0f} ({r['wire_overhead_ratio']:.2f}x), "
      f"{r['datagrams_per_voice_s']:5.1f} datagrams and {r['ack_frames_per_voice_s']:5.1f} ACK frames "
      f"per voice-s, first frame p50 {f['p50']:.2f} p95 {f['p95']:.2f} ms, "
      f"lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}")
PY
for round in $(seq "$rounds"); do
  echo "round $round"
  for f in $frames; do
    for a in $acks; do
      rm -f "$work/r.json"
      taskset -c 1 "$sim" load --relay 127.0.0.1:${relay_port[$a]} --ca "$work/relay-$a/cert.pem" \
        --secret "$work/relay-$a/token.secret" --relay-pid "${relay_pid[$a]}" --opus "$work/s$f.opus" \
        --users 200 --duration 20s --talk-interval 5s --clip-min 3s --clip-max 6s \
        --client-ack-delay "$a" --delay "${DELAY:-0ms}" --report-json "$work/r.json" >"$work/load.log" 2>&1 || tail -3 "$work/load.log"
      python3 "$work/show.py" "$work/r.json" "$f" "$a"
    done
  done
done
