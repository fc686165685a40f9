#!/usr/bin/env bash
# What an idle phone costs on the wire per day (docs/benchmarks.md,
# "Waking phones", figure (a)): a connected client with the default 15 s
# keep-alive, as the relay counts its bytes (UDP payload both ways,
# `client-sim usage`), against an asleep one, which has no connection.
#
# Two users stay connected and idle at once, one for SHORT seconds and one
# for LONG; the difference of their bytes over the difference of their
# times is the idle rate (what connecting and asking cost is the same for
# both and cancels out), times 86,400 s.
#
#   scripts/bench-idle-day.sh [SHORT] [LONG]     (release builds; default 60 240)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
short=${1:-60}
long=${2:-240}
bin=${BIN:-target/release}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mapfile -t web < <(web_off "$bin/ptt-relay")
"$bin/ptt-relay" serve --data-dir "$work/r" --listen 127.0.0.1:4461 --admin 127.0.0.1:9491 \
  "${web[@]}" >"$work/relay.log" 2>&1 &
wait_ready "$work/r" http://127.0.0.1:9491
tok() { "$bin/ptt-relay" token --data-dir "$work/r" --user "$1"; }
conn=(--relay 127.0.0.1:4461 --ca "$work/r/cert.pem")
"$bin/client-sim" listen "${conn[@]}" --token "$(tok idle-short)" --out "$work/a" \
  --count 1 --timeout "${short}s" >/dev/null 2>&1 &
a_pid=$!
"$bin/client-sim" listen "${conn[@]}" --token "$(tok idle-long)" --out "$work/b" \
  --count 1 --timeout "${long}s" >/dev/null 2>&1 &
b_pid=$!
# They time out (exit 1): nothing was sent to them.
wait "$a_pid" "$b_pid" || true
bytes() {
  "$bin/client-sim" usage "${conn[@]}" --token "$(tok "$1")" --days 1 --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bytes_up"] + r["bytes_down"])'
}
a=$(bytes idle-short)
b=$(bytes idle-long)
python3 - "$a" "$b" "$short" "$long" <<'PY'
import sys
a, b, s, l = map(float, sys.argv[1:])
rate = (b - a) / (l - s)
print(f"connected, 15 s keep-alive: {a:.0f} B over {s:.0f} s, {b:.0f} B over {l:.0f} s: "
      f"{rate:.2f} B/s idle = {rate * 86400 / 1e6:.3f} MB per idle day")
print("asleep (SDK sleep(), woken by push): no connection, 0 B per idle day "
      "(relay/tests/push.rs counts 0 datagrams while asleep)")
PY
