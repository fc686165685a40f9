#!/usr/bin/env bash
# Access time on an impaired link: the press → the relay has the clip's
# header, and the press → the listener has it, for a talker that is
# connected, one that reconnects with a full handshake, and one that
# reconnects with 0-RTT. Relay on core 0, `client-sim load` on core 1,
# every user's link delayed DELAY each way (default 50ms: a 100 ms round
# trip), ROUNDS rounds of the three cases.
#
#   scripts/bench-access.sh [ROUNDS] [DELAY]
#
# Needs `cargo build --release -p relay -p client-sim` first, and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
delay=${2:-50ms}
load=target/release/client-sim
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
taskset -c 0 target/release/ptt-relay serve --data-dir "$work/relay" --listen 127.0.0.1:4451 \
  --admin 127.0.0.1:9491 --web off 2>"$work/relay.log" >/dev/null &
pid=$!
sleep 2
cat >"$work/show.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a, l = r["press_to_relay_ms"], r["press_to_listener_ms"]
print(f"{sys.argv[2]:10} n {a['count']:4}  press->relay p50 {a['p50']:7.1f} p95 {a['p95']:7.1f}  "
      f"press->listener p50 {l['p50']:7.1f} p95 {l['p95']:7.1f}  "
      f"connects {r['connects']} (0-RTT {r['zero_rtt_connects']})  "
      f"lost {r['lost']} dup {r['duplicated']} corrupt {r['corrupted']}")
PY
run() { # label load-args...
  local label=$1
  shift
  rm -f "$work/r.json"
  # 20 channels of one talker and one listener; each talker presses about
  # every 3 s for 1-2 s of speech.
  taskset -c 1 "$load" load --relay 127.0.0.1:4451 --ca "$work/relay/cert.pem" \
    --secret "$work/relay/token.secret" --relay-pid "$pid" \
    --users 40 --channel-size 2 --talkers-per-channel 1 --duration 30s \
    --talk-interval 3s --clip-min 1s --clip-max 2s --delay "$delay" --grace 5s \
    "$@" --report-json "$work/r.json" >/dev/null 2>&1 || true
  python3 "$work/show.py" "$work/r.json" "$label"
}
for round in $(seq "$rounds"); do
  echo "round $round (delay $delay each way)"
  run connected --press-from connected
  run full --press-from asleep --zero-rtt false
  run 0-rtt --press-from asleep --zero-rtt true
done
