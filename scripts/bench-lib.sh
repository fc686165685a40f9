# Shared by the bench-*.sh scripts (sourced, not run).

# The same espeak-ng speech at 48 kHz, encoded by `client-sim encode` with
# each frame length given: DIR/s20.opus, DIR/s60.opus, ...
#   speech_opus DIR CLIENT_SIM 20 60
speech_opus() {
  local dir=$1 sim=$2
  shift 2
  espeak-ng -w "$dir/speech.wav" "Unit seven to base. The north gate is clear, two vehicles \
waiting at the checkpoint, one truck and one van. Requesting permission to open the gate \
and let them through. Over."
  sox "$dir/speech.wav" -r 48000 "$dir/speech48.wav"
  local f
  for f in "$@"; do
    "$sim" encode --frame-ms "$f" "$dir/speech48.wav" "$dir/s$f.opus" >/dev/null 2>&1
  done
}

# Prints `--web off` when the relay binary has a web listener to turn off
# (an earlier build may predate it); use as: mapfile -t web < <(web_off BIN)
web_off() {
  if "$1" serve --help | grep -q -- '--web '; then printf '%s\n' --web off; fi
}

# Sessions open on the relay whose admin listener is ADMIN_ADDR.
#   sessions_open ADMIN_ADDR
sessions_open() {
  curl -s "$1/metrics" | awk '/^ptt_sessions_open /{printf "%d", $2}'
}

# Waits (at most 10 s) until a relay started on DATA_DIR with its admin
# listener on ADMIN_ADDR has written its token secret and answers /readyz,
# then a second more.
#   wait_ready DATA_DIR ADMIN_ADDR
wait_ready() {
  local _
  for _ in $(seq 50); do
    [ -s "$1/token.secret" ] && curl -sf "$2/readyz" >/dev/null && break
    sleep 0.2
  done
  sleep 1
}
