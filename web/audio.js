// The audio path: microphone -> Opus (WebCodecs AudioEncoder) while the
// button is held; Opus -> speaker (WebCodecs AudioDecoder into the
// "player" worklet). Settings as `client-sim encode`: 48 kHz mono, voice,
// 16 kbit/s, 20 ms frames.

export const RATE = 48000;
export const FRAME = 960; // 20 ms
// libopus's look-ahead at 48 kHz: the decoder drops this many samples.
export const PRE_SKIP = 312;
export const FORMAT = { channels: 1, preSkip: PRE_SKIP, inputRate: RATE, gain: 0 };
export const ENCODER = {
  codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 16000,
  opus: { frameDuration: 20000, application: "voip", signal: "voice" },
};

export async function supported() {
  if (!("WebTransport" in window)) return "this browser has no WebTransport";
  if (!("AudioEncoder" in window) || !("AudioDecoder" in window)) return "this browser has no WebCodecs audio";
  const e = await AudioEncoder.isConfigSupported(ENCODER).catch(() => ({ supported: false }));
  if (!e.supported) return "this browser cannot encode Opus";
  return null;
}

let context = null;
export async function audioContext() {
  if (!context) {
    context = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await context.audioWorklet.addModule("worklets.js");
  }
  // Browsers start audio only after a user gesture: resume now if allowed,
  // else at the first press or key (never wait for it: the page must
  // connect and receive before anyone touches it).
  if (context.state !== "running") {
    context.resume().catch(() => {});
    const wake = () => context.resume().catch(() => {});
    for (const ev of ["pointerdown", "keydown"]) document.addEventListener(ev, wake, { once: true, capture: true });
  }
  return context;
}

// The microphone, opened once; each press is one encoder run.
export class Recorder {
  async open() {
    const ctx = await audioContext();
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    this.node = new AudioWorkletNode(ctx, "capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    ctx.createMediaStreamSource(this.stream).connect(this.node);
    this.node.port.onmessage = (e) => this.frame(e.data);
    this.encoder = null;
  }

  // Starts encoding; onPacket(Uint8Array) gets each Opus packet in order.
  start(onPacket) {
    this.samples = 0;
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const p = new Uint8Array(chunk.byteLength);
        chunk.copyTo(p);
        onPacket(p);
      },
      error: (e) => console.error("encoder", e),
    });
    this.encoder.configure(ENCODER);
    this.node.port.postMessage({ on: true });
  }

  frame(samples) {
    if (!this.encoder || this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32", sampleRate: RATE, numberOfFrames: samples.length, numberOfChannels: 1,
      timestamp: Math.round((this.samples * 1e6) / RATE), data: samples,
    });
    this.samples += samples.length;
    this.encoder.encode(data);
    data.close();
  }

  // Ends the press: the encoder's last packets, then the clip's granule
  // (its total duration at 48 kHz, as the spec asks of a recorder).
  async stop() {
    this.node.port.postMessage({ on: false });
    const enc = this.encoder;
    this.encoder = null;
    if (!enc) return 0;
    await enc.flush().catch(() => {});
    enc.close();
    return this.samples;
  }
}

// Decodes clips and plays them through the "player" worklet; onSound(key)
// tells when a clip's first sample sounds.
export class Player {
  async open(onSound) {
    const ctx = await audioContext();
    this.node = new AudioWorkletNode(ctx, "player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { startMs: 60 },
    });
    this.node.connect(ctx.destination);
    this.node.port.onmessage = (e) => { if (e.data.sounding) onSound(e.data.sounding); };
    this.decoders = new Map();
    this.stats = { decoded: 0, errors: 0 };
  }

  // A decoder for one clip; frames(key) counts its decoded frames.
  begin(key, format, onFrame) {
    const state = { skip: format.preSkip, frames: 0, errors: 0, ts: 0 };
    state.decoder = new AudioDecoder({
      output: (data) => {
        const n = data.numberOfFrames;
        const pcm = new Float32Array(n);
        data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
        data.close();
        state.frames += 1;
        this.stats.decoded += 1;
        const cut = Math.min(state.skip, n);
        state.skip -= cut;
        if (cut < n) this.node.port.postMessage({ clip: key, samples: pcm.subarray(cut) }, []);
        onFrame?.(state.frames);
      },
      error: (e) => { state.errors += 1; this.stats.errors += 1; console.error("decoder", e); },
    });
    state.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: format.channels });
    this.decoders.set(key, state);
    return state;
  }

  packet(key, p) {
    const s = this.decoders.get(key);
    if (!s || s.decoder.state !== "configured") return;
    s.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: s.ts, data: p }));
    s.ts += 20000;
  }

  async end(key) {
    const s = this.decoders.get(key);
    if (!s) return null;
    this.decoders.delete(key);
    if (s.decoder.state === "configured") {
      await s.decoder.flush().catch(() => {});
      s.decoder.close();
    }
    this.node.port.postMessage({ clip: key, end: true });
    return s;
  }

  // Plays a whole clip (a replay).
  async play(key, format, packets) {
    this.begin(key, format);
    for (const p of packets) this.packet(key, p);
    return this.end(key);
  }
}
