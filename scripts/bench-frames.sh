#!/usr/bin/env bash
# Live voice's bytes on the wire against its Opus frame length: the same
# speech encoded with 20, 40 and 60 ms frames (`client-sim encode
# --frame-ms`), the same live `client-sim load` with each, ROUNDS rounds,
# frame lengths alternating. Relay on core 0, load on core 1.
#
#   scripts/bench-frames.sh [ROUNDS]
#
# Needs `cargo build --release -p relay -p client-sim`, espeak-ng, sox and
# taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
sim=target/release/client-sim
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
espeak-ng -w "$work/speech.wav" "Unit seven to base. The north gate is clear, two vehicles \
waiting at the checkpoint, one truck and one van. Requesting permission to open the gate \
and let them through. Over."
sox "$work/speech.wav" -r 48000 "$work/speech48.wav"
for f in 20 40 60; do
  "$sim" encode --frame-ms "$f" "$work/speech48.wav" "$work/s$f.opus" >/dev/null
done
taskset -c 0 target/release/ptt-relay serve --data-dir "$work/relay" --listen 127.0.0.1:4461 \
  --admin 127.0.0.1:9501 2>"$work/relay.log" >/dev/null &
pid=$!
sleep 2
cat >"$work/show.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = r["first_frame_ms"]
print(f"{sys.argv[2]:>3} ms frames: wire {r['wire_bytes_per_voice_s']:7.0f} B/voice-s, "
      f"Opus {r['opus_bytes_per_voice_s']:6.0f} ({r['wire_overhead_ratio']:.2f}x), "
      f"{r['datagrams_per_voice_s']:5.1f} datagrams and {r['ack_frames_per_voice_s']:5.1f} ACK frames "
      f"per voice-s, first frame p50 {f['p50']:.2f} p95 {f['p95']:.2f} ms, "
      f"lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}")
PY
for round in $(seq "$rounds"); do
  echo "round $round"
  for f in 20 40 60; do
    rm -f "$work/r.json"
    taskset -c 1 "$sim" load --relay 127.0.0.1:4461 --ca "$work/relay/cert.pem" \
      --secret "$work/relay/token.secret" --relay-pid "$pid" --opus "$work/s$f.opus" \
      --users 200 --duration 20s --talk-interval 5s --clip-min 3s --clip-max 6s \
      --report-json "$work/r.json" >/dev/null 2>&1 || true
    python3 "$work/show.py" "$work/r.json" "$f"
  done
done
