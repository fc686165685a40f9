// Audio worklets: "capture" hands the microphone's samples to the page in
// 20 ms frames; "player" plays decoded clips with a small jitter buffer and
// tells the page when each clip's first sample sounds.

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Float32Array(960);
    this.at = 0;
    this.on = false;
    this.port.onmessage = (e) => { this.on = e.data.on; this.at = 0; };
  }
  process(inputs) {
    const ch = inputs[0]?.[0];
    if (this.on && ch) {
      let i = 0;
      while (i < ch.length) {
        const n = Math.min(ch.length - i, 960 - this.at);
        this.frame.set(ch.subarray(i, i + n), this.at);
        this.at += n; i += n;
        if (this.at === 960) {
          this.port.postMessage(this.frame.slice());
          this.at = 0;
        }
      }
    }
    return true;
  }
}

// Clips play one after another, each whole, in the order their first
// audio came; a clip starts once `startMs` of it is queued (or it ended),
// and pauses to refill if it runs dry before its end.
class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.clips = []; // {key, chunks: [Float32Array], at, queued, ended, started}
    this.byKey = new Map();
    this.playing = false;
    this.startSamples = Math.round((options.processorOptions?.startMs ?? 60) * 48);
    this.port.onmessage = (e) => {
      const m = e.data;
      let c = this.byKey.get(m.clip);
      if (!c) {
        if (!m.samples) return;
        c = { key: m.clip, chunks: [], at: 0, queued: 0, ended: false, started: false };
        this.clips.push(c);
        this.byKey.set(m.clip, c);
      }
      if (m.samples) { c.chunks.push(m.samples); c.queued += m.samples.length; }
      if (m.end) c.ended = true;
    };
  }
  process(_inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    let i = 0;
    while (i < out.length && this.clips.length) {
      const c = this.clips[0];
      if (!this.playing) {
        if (c.queued < this.startSamples && !c.ended) break;
        this.playing = true;
      }
      if (!c.started) { c.started = true; this.port.postMessage({ sounding: c.key }); }
      const q = c.chunks[0];
      if (!q) {
        if (c.ended) { this.clips.shift(); this.byKey.delete(c.key); continue; }
        this.playing = false; // ran dry mid-clip: refill first
        break;
      }
      const n = Math.min(out.length - i, q.length - c.at);
      out.set(q.subarray(c.at, c.at + n), i);
      c.at += n; i += n; c.queued -= n;
      if (c.at === q.length) { c.chunks.shift(); c.at = 0; }
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
