"""End-to-end client runs through the generated Python bindings of
ptt_client (scripts/sdk.sh), driven by client/tests/python_sdk.rs against a
real relay. Each command is one app process:

  send    RELAY CA DATA TOKEN KIND TO FILE [--wait]
          record FILE into the outbox; with --wait, until the relay
          accepted it, else only until it is safely in the outbox
  flush   RELAY CA DATA TOKEN        send what an earlier run left behind
  receive RELAY CA DATA TOKEN N OUT  keep N clips (written to OUT), then
          watch a little longer for repeats; reports the live talk heard
          (decoded samples, when the first audio came)
  talk    RELAY CA DATA TOKEN KIND TO WAV [--network-change]
          once connected, press, feed the WAV (16-bit mono) in 20 ms frames
          in real time, release, wait for the relay's answer; with
          --network-change, move to a new socket halfway through

Prints one JSON line with what happened; exits non-zero on any surprise.
"""

import asyncio
import json
import os
import sys
import threading
import time
import wave

import ptt_client as ptt


class Listener(ptt.ClipListener):
    def __init__(self, out_dir=None):
        self.lock = threading.Lock()
        self.clips = []
        self.sent = []
        self.statuses = []
        self.out_dir = out_dir
        self.talk = {"started": [], "audio_samples": 0, "first_audio_at": None,
                     "complete": [], "cut": [], "busy": []}

    def on_clip(self, clip):
        with self.lock:
            n = len(self.clips)
            if self.out_dir:
                path = os.path.join(self.out_dir, f"{n:03}-{clip.id}.opus")
                with open(path, "wb") as f:
                    f.write(clip.ogg)
                    f.flush()
                    os.fsync(f.fileno())
            self.clips.append(
                {
                    "id": clip.id,
                    "sender": clip.sender,
                    "target": clip.target,
                    "channel": clip.target_kind == ptt.TargetKind.CHANNEL,
                    "live": clip.live,
                    "duration_ms": clip.duration_ms,
                }
            )
        return True

    def on_sent(self, id, result):
        with self.lock:
            if result.is_ACCEPTED():
                self.sent.append({"id": id, "accepted": True, "duplicate": result.duplicate})
            else:
                self.sent.append({"id": id, "accepted": False, "code": result.code})

    def on_status(self, status):
        print(f"status: {status}", file=sys.stderr, flush=True)
        with self.lock:
            # "LinkStatus.OFFLINE(why=..., ...)" -> "OFFLINE"
            self.statuses.append(str(status).split("(")[0].split(".")[-1])

    def fresh_token(self):
        return None

    def on_talk(self, event):
        with self.lock:
            t = self.talk
            if event.is_STARTED():
                t["started"].append({"id": event.clip_id, "sender": event.sender})
            elif event.is_AUDIO():
                if t["first_audio_at"] is None:
                    t["first_audio_at"] = time.time()
                t["audio_samples"] += len(event.pcm)
            elif event.is_COMPLETE():
                t["complete"].append(event.clip_id)
            elif event.is_CUT_OFF():
                t["cut"].append(event.why)
            elif event.is_BUSY():
                t["busy"].append(event.holder)


def wait_for(cond, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out after {secs} s waiting for {what}")


async def main(argv):
    cmd, relay, ca, data, token = argv[:5]
    rest = argv[5:]
    out_dir = rest[1] if cmd == "receive" else None
    listener = Listener(out_dir)
    mic_rate = 48000
    if cmd == "talk":
        with wave.open(rest[2], "rb") as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2, "16-bit mono WAV"
            mic_rate = w.getframerate()
            frames = w.readframes(w.getnframes())
        samples = [int.from_bytes(frames[i:i + 2], "little", signed=True)
                   for i in range(0, len(frames), 2)]
    config = ptt.ClientConfig(relay=relay, ca_pem=ca, data_dir=data, token=token,
                              mic_rate=mic_rate)
    client = ptt.PttClient(config, listener)
    result = {}
    if cmd == "send":
        kind = ptt.TargetKind.CHANNEL if rest[0] == "channel" else ptt.TargetKind.USER
        with open(rest[2], "rb") as f:
            ogg = f.read()
        clip_id = client.send_file(kind, rest[1], ogg)
        result["id"] = clip_id
        if "--wait" in rest:
            wait_for(lambda: listener.sent, 30, "the relay's answer")
            if "--usage" in rest:
                days = await client.usage(1)
                result["usage"] = [{"day_start_ms": d.day_start_ms, "bytes_up": d.bytes_up,
                                    "bytes_down": d.bytes_down} for d in days]
        else:
            # The relay is down: the clip is on disk, waiting, once
            # send_file has returned.
            result["pending"] = client.pending()
    elif cmd == "talk":
        kind = ptt.TargetKind.CHANNEL if rest[0] == "channel" else ptt.TargetKind.USER
        wait_for(lambda: "CONNECTED" in listener.statuses, 30, "a connection")
        step = mic_rate // 50  # 20 ms
        chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
        result["id"] = client.press(kind, rest[1])
        start = time.monotonic()
        for n, chunk in enumerate(chunks):
            if "--network-change" in rest and n == len(chunks) // 2:
                client.network_changed()
                result["moved"] = True
            client.pcm(chunk)
            # In real time, as a microphone gives them.
            delay = start + (n + 1) * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        result["released_at"] = time.time()
        client.release()
        wait_for(lambda: listener.sent, 30, "the relay's answer")
    elif cmd == "flush":
        wait_for(lambda: client.pending() == 0 and listener.sent, 30, "the outbox to empty")
    elif cmd == "receive":
        want = int(rest[0])
        wait_for(lambda: "CONNECTED" in listener.statuses, 30, "a connection")
        wait_for(lambda: len(listener.clips) >= want, 30, f"{want} clips")
        time.sleep(1.5)  # repeats, if any, would arrive now
    else:
        raise SystemExit(f"unknown command {cmd}")
    await client.stop()
    with listener.lock:
        result["sent"] = listener.sent
        result["clips"] = listener.clips
        result["statuses"] = listener.statuses
        result["talk"] = listener.talk
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
