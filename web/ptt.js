// ptt/1 over WebTransport (docs/protocol.md): the bytes, the streams, the
// session. No audio here: app.js wires this to audio.js and the page.

export const CODES = {
  0x00: ["no_error", "closed"],
  0x01: ["protocol_violation", "the relay did not understand this app (a bug)"],
  0x02: ["unauthenticated", "not signed in in time"],
  0x03: ["token_expired", "your sign-in expired: get a new token"],
  0x04: ["token_invalid", "this token is not valid"],
  0x05: ["server_busy", "the relay is busy; trying again shortly"],
  0x06: ["going_away", "the relay is restarting; reconnecting"],
  0x07: ["session_replaced", "you signed in somewhere else"],
  0x08: ["internal", "the relay had a problem; trying again"],
  0x10: ["clip_too_long", "too long: the clip was not sent"],
  0x11: ["clip_too_large", "too large: the clip was not sent"],
  0x12: ["packet_too_large", "the audio was too large"],
  0x13: ["bad_packet", "the audio was damaged"],
  0x14: ["upload_idle_timeout", "the connection stalled; sending again"],
  0x15: ["bad_target", "nobody to send this to"],
  0x16: ["clip_id_conflict", "clip id taken; sending again"],
  0x17: ["storage_full", "the relay is full; sending again later"],
  0x18: ["cut_off", "cut off: the talker's connection dropped"],
  0x19: ["rate_limited", "too many clips; sending again later"],
  0x1a: ["not_allowed", "you may not talk there"],
  0x1b: ["too_many_streams", "too many clips at once"],
  0x1c: ["floor_busy", "busy"],
  0x1d: ["preempted", "cut off by a priority talker"],
};

export const codeName = (c) => (CODES[c] ?? CODES[0x08])[0];
export const codeWords = (c) => (CODES[c] ?? CODES[0x08])[1];
const RETRYABLE = new Set([0x05, 0x06, 0x08, 0x14, 0x17, 0x19]);

const T = { Auth: 0x01, Welcome: 0x02, Ack: 0x03, GoAway: 0x04, UsageQuery: 0x05,
  Usage: 0x06, Expired: 0x07, AckPolicy: 0x0b, ClipHeader: 0x10, Accepted: 0x11, Rejected: 0x12, Delivery: 0x20 };
const MAX_MESSAGE = 64 * 1024;
const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

// ---- bytes ------------------------------------------------------------

export class Writer {
  constructor() { this.parts = []; this.len = 0; }
  bytes(b) { this.parts.push(b); this.len += b.length; return this; }
  u8(v) { return this.bytes(Uint8Array.of(v)); }
  u16(v) { return this.bytes(Uint8Array.of(v >> 8, v & 0xff)); }
  u32(v) { return this.bytes(Uint8Array.of(v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff)); }
  varint(v) { return this.bytes(varint(v)); }
  str(s) { const b = enc.encode(s); return this.varint(b.length).bytes(b); }
  done() {
    const out = new Uint8Array(this.len);
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

export function varint(v) {
  if (v < 0x40) return Uint8Array.of(v);
  if (v < 0x4000) return Uint8Array.of(0x40 | (v >> 8), v & 0xff);
  if (v < 0x40000000) return Uint8Array.of(0x80 | (v >>> 24), (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff);
  const out = new Uint8Array(8);
  let x = BigInt(v);
  for (let i = 7; i >= 0; i--) { out[i] = Number(x & 0xffn); x >>= 8n; }
  out[0] |= 0xc0;
  return out;
}

// Reads a varint at `at`; null when `buf` ends first.
export function readVarint(buf, at) {
  if (at >= buf.length) return null;
  const len = 1 << (buf[at] >> 6);
  if (at + len > buf.length) return null;
  let v = buf[at] & 0x3f;
  for (let i = 1; i < len; i++) v = v * 256 + buf[at + i];
  return [v, len];
}

class Body {
  constructor(b) { this.b = b; this.at = 0; }
  need(n) { if (this.at + n > this.b.length) throw new Error("message too short"); }
  u8() { this.need(1); return this.b[this.at++]; }
  u16() { this.need(2); const v = (this.b[this.at] << 8) | this.b[this.at + 1]; this.at += 2; return v; }
  i16() { const v = this.u16(); return v >= 0x8000 ? v - 0x10000 : v; }
  u32() { this.need(4); const v = new DataView(this.b.buffer, this.b.byteOffset + this.at, 4).getUint32(0); this.at += 4; return v; }
  varint() { const r = readVarint(this.b, this.at); if (!r) throw new Error("message too short"); this.at += r[1]; return r[0]; }
  bytes(n) { this.need(n); const v = this.b.subarray(this.at, this.at + n); this.at += n; return v; }
  str() { return dec.decode(this.bytes(this.varint())); }
  id() { return this.bytes(16).slice(); }
  target() { const kind = this.u8(); const name = this.str(); return { channel: kind === 1, name }; }
  format() {
    return { codec: this.u8(), channels: this.u8(), preSkip: this.u16(), inputRate: this.u32(), gain: this.i16() };
  }
  end() { if (this.at !== this.b.length) throw new Error("message too long"); }
}

export const idHex = (id) => Array.from(id, (b) => b.toString(16).padStart(2, "0")).join("");
export const newClipId = () => crypto.getRandomValues(new Uint8Array(16));

function message(type, body) {
  return new Writer().varint(type).varint(body.length).bytes(body).done();
}

export const encodeAuth = (token) => message(T.Auth, enc.encode(token));
export const encodeAck = (id) => message(T.Ack, id);
// One Ack of several clips (to a relay that sent AckPolicy): the ids one
// after another.
export function encodeAcks(ids) {
  const w = new Writer();
  for (const id of ids) w.bytes(id);
  return message(T.Ack, w.done());
}
export function encodeClipHeader(id, target, format) {
  const w = new Writer().bytes(id).u8(target.channel ? 1 : 0).str(target.name);
  w.u8(0).u8(format.channels).u16(format.preSkip).u32(format.inputRate).u16(format.gain & 0xffff);
  return message(T.ClipHeader, w.done());
}
export const encodePacket = (p) => new Writer().varint(p.length).bytes(p).done();
export const encodeEnd = (count, granule) => new Writer().varint(0).varint(count).varint(granule).done();

export function decodeMessage(type, body) {
  const b = new Body(body);
  let m;
  switch (type) {
    case T.Welcome:
      m = { type: "Welcome", user: b.str(), sessionId: b.varint(), maxClipMs: b.varint(),
        maxClipBytes: b.varint(), maxPacketBytes: b.varint(), maxClipStreams: b.varint(),
        uploadIdleMs: b.varint() };
      break;
    case T.GoAway: m = { type: "GoAway", code: b.varint(), retryAfterMs: b.varint(), reason: b.str() }; break;
    case T.AckPolicy: m = { type: "AckPolicy", maxIds: b.varint(), holdMs: b.varint() }; break;
    case T.Expired:
      m = { type: "Expired", id: b.id(), sender: b.str(), target: b.target(), createdMs: b.varint(), also: b.varint() };
      break;
    case T.Accepted: m = { type: "Accepted", id: b.id(), duplicate: b.u8() === 1 }; break;
    case T.Rejected: m = { type: "Rejected", id: b.id(), code: b.varint(), retryAfterMs: b.varint(), reason: b.str() }; break;
    case T.Delivery:
      m = { type: "Delivery", id: b.id(), sender: b.str(), target: b.target(), format: b.format(),
        createdMs: b.varint(), live: b.u8() === 1 };
      break;
    case T.Usage: {
      m = { type: "Usage", today: b.varint(), days: [] };
      const n = b.varint();
      for (let i = 0; i < n; i++) m.days.push({ day: b.varint(), up: b.varint(), down: b.varint() });
      break;
    }
    default: return null; // Unknown (or not ours): skipped, as the spec says.
  }
  b.end();
  return m;
}

// ---- streams ----------------------------------------------------------

// Buffered reads of one incoming stream: messages, then clip records.
export class StreamReader {
  constructor(readable) { this.reader = readable.getReader(); this.buf = new Uint8Array(0); this.at = 0; this.fin = false; }
  async fill() {
    if (this.fin) return false;
    const { value, done } = await this.reader.read();
    if (done) { this.fin = true; return false; }
    const rest = this.buf.subarray(this.at);
    const next = new Uint8Array(rest.length + value.length);
    next.set(rest); next.set(value, rest.length);
    this.buf = next; this.at = 0;
    return true;
  }
  // The next known message (unknown types skipped), or null at FIN.
  async message() {
    for (;;) {
      const t = readVarint(this.buf, this.at);
      const l = t && readVarint(this.buf, this.at + t[1]);
      if (l) {
        if (l[0] > MAX_MESSAGE) throw new Error("message too large");
        const start = this.at + t[1] + l[1];
        if (start + l[0] <= this.buf.length) {
          this.at = start + l[0];
          const m = decodeMessage(t[0], this.buf.subarray(start, start + l[0]));
          if (m) return m;
          continue;
        }
      }
      if (!(await this.fill())) {
        if (this.at < this.buf.length) throw new Error("stream ended inside a message");
        return null;
      }
    }
  }
  // The next record: {packet} or {end: {count, granule}}; null at FIN.
  async record() {
    for (;;) {
      const l = readVarint(this.buf, this.at);
      if (l && l[0] === 0) {
        const c = readVarint(this.buf, this.at + l[1]);
        const g = c && readVarint(this.buf, this.at + l[1] + c[1]);
        if (g) { this.at += l[1] + c[1] + g[1]; return { end: { count: c[0], granule: g[0] } }; }
      } else if (l && this.at + l[1] + l[0] <= this.buf.length) {
        const p = this.buf.slice(this.at + l[1], this.at + l[1] + l[0]);
        this.at += l[1] + l[0];
        return { packet: p };
      }
      if (!(await this.fill())) {
        if (this.at < this.buf.length) throw new Error("stream ended inside a record");
        return null;
      }
    }
  }
  cancel() { this.reader.cancel().catch(() => {}); }
}

// ---- the session ------------------------------------------------------

// Clip ids this browser has given the app, kept across reloads (bounded):
// a repeat (an ack that was lost) is dropped by id and acked again.
class SeenIds {
  constructor(user, max = 2000) {
    this.key = `ptt-seen-${user}`; this.max = max;
    try { this.list = JSON.parse(localStorage.getItem(this.key) ?? "[]"); } catch { this.list = []; }
    this.set = new Set(this.list);
  }
  has(id) { return this.set.has(id); }
  add(id) {
    if (this.set.has(id)) return;
    this.set.add(id); this.list.push(id);
    while (this.list.length > this.max) this.set.delete(this.list.shift());
    try { localStorage.setItem(this.key, JSON.stringify(this.list)); } catch { /* private mode */ }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Which relay the page talks to, of the service's relays (home first):
// the rule of docs/protocol.md "Several relays", step for step the same
// as ptt_client::failover::Relays (client/tests/failover.rs runs both on
// the same steps). `why`: "unanswered" (no answer in time), "closed" (it
// answered, then closed or reset: once more there first), "goingAway"
// (GoAway: the next after its hint). `unit`: uniform random in 0..1.
export class Relays {
  constructor(list, { minMs = 250, maxMs = 30000 } = {}) {
    this.list = list; this.current = 0; this.failedInRow = 0; this.retryHere = false;
    this.minMs = minMs; this.maxMs = maxMs;
    this.rounds = 0; this.homeTries = 0; this.homeDue = null;
  }
  get atHome() { return this.current === 0; }
  // The shared backoff (codec::retry): doubling from minMs to maxMs, a
  // quarter either way.
  delay(attempt, unit) {
    return jitterMs(Math.min(this.maxMs, this.minMs * 2 ** Math.min(attempt, 20)), unit);
  }
  connected(nowMs, unit) {
    this.failedInRow = 0; this.retryHere = false; this.rounds = 0;
    if (this.atHome) {
      this.homeDue = null; this.homeTries = 0;
    } else if (this.homeDue === null) {
      this.homeDue = nowMs + this.delay(this.homeTries++, unit);
    }
  }
  lost(why, hintMs, unit) {
    const min = jitterMs(this.minMs, unit);
    if (why === "closed" && !this.retryHere) {
      this.retryHere = true;
      return { index: this.current, waitMs: Math.max(min, hintMs) };
    }
    if (why === "goingAway" && this.list.length === 1) {
      return { index: 0, waitMs: Math.max(jitterMs(hintMs, unit), min) };
    }
    this.retryHere = false;
    this.failedInRow += 1;
    if (this.failedInRow >= this.list.length) {
      this.failedInRow = 0; this.current = 0;
      return { index: 0, waitMs: Math.max(this.delay(this.rounds++, unit), hintMs) };
    }
    this.current = (this.current + 1) % this.list.length;
    return { index: this.current, waitMs: why === "goingAway" ? jitterMs(hintMs, unit) : 0 };
  }
  homeAnswered(nowMs, unit) { this.current = 0; this.connected(nowMs, unit); }
  homeSilent(nowMs, unit) { this.homeDue = nowMs + this.delay(this.homeTries++, unit); }
}

const jitterMs = (ms, unit) => ms * (0.75 + Math.min(Math.max(unit, 0), 1) * 0.5);

// A relay's /config.json, or an error once `ms` passed without it.
async function fetchConfig(url, ms) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), ms);
  try {
    return await (await fetch(url, { cache: "no-store", signal: abort.signal })).json();
  } finally {
    clearTimeout(timer);
  }
}
const hexBytes = (h) => Uint8Array.from(h.match(/../g), (x) => parseInt(x, 16));

// One user's connection to the relay, reconnecting by itself. Events
// (CustomEvent detail): state {state, words}, welcome, clipstart {d} and
// packet {d, packet} (live deliveries, as they arrive), clipend {d,
// packets, end} and clipcut {d, code} (stored ones in order), expired {m},
// closed {code, reason}.
export class PttSession extends EventTarget {
  constructor({ token, configUrl = "config.json", failoverAfterMs = 3000 }) {
    super();
    this.token = token; this.configUrl = configUrl; this.failoverAfterMs = failoverAfterMs;
    this.wt = null; this.ctl = null; this.welcome = null;
    this.outbox = []; // clips recorded or not yet accepted, sent when back
    this.stopped = false; this.seen = null;
    this.relays = null; // the service's relays (config URLs), home first
  }
  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
  get online() { return this.welcome !== null; }

  async start() {
    while (!this.stopped) {
      let end;
      try {
        // The list comes from the page's own relay, once.
        if (!this.relays) {
          const cfg = await fetchConfig(this.configUrl, 10000);
          const others = (cfg.relays ?? []).map((r) => `${r}/config.json`);
          this.relays = new Relays([this.configUrl, ...others]);
        }
        end = await this.runOnce(this.relays.list[this.relays.current]);
      } catch (e) {
        this.emit("state", { state: "offline", words: `not connected: ${e.message ?? e}` });
        end = { why: "unanswered", hintMs: 0 };
      }
      if (end === null || this.stopped) return;
      if (!this.relays) { await sleep(jitterMs(1000, Math.random())); continue; }
      if (end.why === "home") continue;
      await sleep(this.relays.lost(end.why, end.hintMs, Math.random()).waitMs);
    }
  }

  stop() {
    this.stopped = true;
    if (this.wt) try { this.wt.close({ closeCode: 0, reason: "bye" }); } catch { /* closed */ }
  }

  // One connection's life, to the relay whose config is at `configUrl`;
  // returns how it ended ({why, hintMs} for the failover rule, {why:
  // "home"} to go home now), or null when the page must not reconnect.
  async runOnce(configUrl) {
    this.emit("state", { state: "connecting", words: "connecting…" });
    const several = this.relays.list.length > 1;
    const limit = several ? this.failoverAfterMs : 30000;
    const cfg = await fetchConfig(configUrl, limit);
    const at = new URL(configUrl, location.href).hostname;
    const host = at.includes(":") ? `[${at}]` : at;
    const url = `https://${host}:${cfg.port}${cfg.path}`;
    const opts = { congestionControl: "low-latency" };
    if (cfg.certificate_hashes.length) {
      opts.serverCertificateHashes = cfg.certificate_hashes.map((h) => ({ algorithm: "sha-256", value: hexBytes(h) }));
    }
    const wt = new WebTransport(url, opts);
    this.wt = wt;
    let closeInfo = null;
    wt.closed.then((i) => { closeInfo = i; }, (e) => { closeInfo = { closeCode: null, reason: String(e.message ?? e) }; });
    // With several relays, one that does not answer in time is left.
    let timer;
    const late = new Promise((_, no) => { timer = setTimeout(() => no(new Error(`no answer within ${limit} ms`)), limit); });
    try {
      await Promise.race([wt.ready, late]);
    } catch (e) {
      try { wt.close(); } catch { /* closed */ }
      throw e;
    } finally {
      clearTimeout(timer);
    }
    const bidi = await wt.createBidirectionalStream();
    const writer = bidi.writable.getWriter();
    const reader = new StreamReader(bidi.readable);
    await writer.write(encodeAuth(this.token));
    const welcome = await Promise.race([reader.message(), wt.closed.then(() => null, () => null)]);
    if (!welcome || welcome.type !== "Welcome") {
      await wt.closed.catch(() => {});
      return this.afterClose(closeInfo);
    }
    this.ctl = writer; this.welcome = welcome;
    clearTimeout(this.acks?.timer);
    this.acks = { policy: null, held: [], timer: null };
    this.relays.connected(Date.now(), Math.random());
    this.seen = this.seen ?? new SeenIds(welcome.user);
    this.emit("welcome", welcome);
    this.emit("state", { state: "online", words: `online as ${welcome.user}` });
    this.acceptDeliveries(wt);
    this.flushOutbox();
    const home = this.watchHome(wt, writer);
    let goAway = null;
    for (;;) {
      let m;
      try { m = await reader.message(); } catch { m = null; }
      if (!m) break;
      if (m.type === "GoAway") {
        goAway = m;
        this.emit("state", { state: "reconnecting", words: codeWords(m.code) });
      } else if (m.type === "Expired") {
        const id = idHex(m.id);
        if (!this.seen.has(id)) this.emit("expired", m);
        this.ack(m.id);
      } else if (m.type === "AckPolicy") {
        this.acks.policy = m;
      }
    }
    await wt.closed.catch(() => {});
    clearInterval(home.timer);
    this.welcome = null; this.ctl = null;
    // Uploads of this connection are gone: the outbox sends them again.
    for (const clip of this.outbox) clip.live = null;
    if (home.answered) return { why: "home" };
    if (goAway) {
      try { wt.close(); } catch { /* closed */ }
      return { why: "goingAway", hintMs: goAway.retryAfterMs };
    }
    return this.afterClose(closeInfo);
  }

  // Away from home, tries home's /config.json when due (the failover
  // rule's backoff) while nothing is being sent; once it answers, leaves
  // this relay cleanly (its acks count) to connect home.
  watchHome(wt, writer) {
    const home = { answered: false, trying: false, timer: null };
    home.timer = setInterval(async () => {
      const r = this.relays;
      if (r.atHome || home.trying || r.homeDue === null || Date.now() < r.homeDue || this.outbox.length) return;
      home.trying = true;
      try {
        await fetchConfig(r.list[0], this.failoverAfterMs);
        r.homeAnswered(Date.now(), Math.random());
        home.answered = true;
        clearInterval(home.timer);
        // The control stream finished: the relay handles the acks sent
        // and closes; the page closes after at most 2 s anyway.
        this.flushAcks();
        await writer.close().catch(() => {});
        await Promise.race([wt.closed.catch(() => {}), sleep(2000)]);
        try { wt.close({ closeCode: 0, reason: "home" }); } catch { /* closed */ }
      } catch {
        r.homeSilent(Date.now(), Math.random());
      } finally {
        home.trying = false;
      }
    }, 250);
    return home;
  }

  afterClose(info) {
    this.welcome = null; this.ctl = null;
    for (const clip of this.outbox) clip.live = null;
    const code = info?.closeCode;
    this.emit("closed", { code, reason: info?.reason ?? "" });
    if (code === 0x07 || code === 0x03 || code === 0x04) {
      this.emit("state", { state: "stopped", words: codeWords(code) });
      return null;
    }
    this.emit("state", { state: "offline", words: code == null ? "connection lost; reconnecting" : codeWords(code) });
    return { why: "closed", hintMs: 0 };
  }

  // Acks go one by one, or, where the relay announced AckPolicy, held up
  // to its holdMs to go together (up to maxIds in one Ack): one datagram
  // for several clips and the transport's ACK. Held acks of a connection
  // that ends are dropped (those clips come again, and are dropped by id).
  ack(id) {
    if (!this.ctl) return;
    const a = this.acks;
    const p = a.policy;
    if (!p || p.maxIds < 2 || p.holdMs === 0) {
      this.ctl.write(encodeAck(id)).catch(() => {});
      return;
    }
    a.held.push(id);
    if (a.held.length >= p.maxIds) this.flushAcks();
    else if (a.held.length === 1) a.timer = setTimeout(() => this.flushAcks(), p.holdMs);
  }

  flushAcks() {
    const a = this.acks;
    clearTimeout(a.timer);
    const ids = a.held;
    a.held = [];
    if (!this.ctl || ids.length === 0) return;
    // One id gives the same bytes as `encodeAck`.
    this.ctl.write(encodeAcks(ids)).catch(() => {});
  }

  // Delivery streams come in the order the relay opened them (stream id
  // order). Stored deliveries are handed to the app in that order (the
  // spec's acceptance order), each once it is complete or cut; live ones
  // as they happen.
  async acceptDeliveries(wt) {
    const streams = wt.incomingUnidirectionalStreams.getReader();
    const order = [];
    const flush = () => {
      while (order.length && order[0].done) {
        const slot = order.shift();
        if (slot.event) this.emit(...slot.event);
      }
    };
    for (;;) {
      let r;
      try { r = await streams.read(); } catch { return; }
      if (r.done) return;
      const slot = { done: false, event: null };
      order.push(slot);
      this.receive(r.value, slot).finally(() => { slot.done = true; flush(); });
    }
  }

  async receive(stream, slot) {
    const rd = new StreamReader(stream);
    let d = null;
    const packets = [];
    // Stored: held for its turn; live: at once.
    const tell = (type, detail) => { if (d.live) this.emit(type, detail); else slot.event = [type, detail]; };
    try {
      d = await rd.message();
      if (!d) return; // reset before its header: ignored
      if (d.type !== "Delivery") throw new Error("not a delivery");
      d.idHex = idHex(d.id);
      if (this.seen.has(d.idHex)) { rd.cancel(); this.ack(d.id); return; }
      if (d.live) this.emit("clipstart", { d });
      for (;;) {
        const rec = await rd.record();
        if (!rec) throw new Error("FIN before the end record");
        if (rec.end) {
          if (rec.end.count !== packets.length) throw new Error("packet count mismatch");
          if ((await rd.record()) !== null) throw new Error("bytes after the end record");
          tell("clipend", { d, packets, end: rec.end });
          return;
        }
        packets.push(rec.packet);
        if (d.live) this.emit("packet", { d, packet: rec.packet, index: packets.length - 1 });
      }
    } catch (e) {
      if (d?.type === "Delivery") tell("clipcut", { d, code: e.streamErrorCode ?? null, error: String(e.message ?? e) });
    }
  }

  // The app kept a clip whole: the relay may drop its copy.
  keep(d) {
    this.seen.add(d.idHex);
    this.ack(d.id);
  }

  // A new upload: the header goes at once (so "busy" comes back at once),
  // packets as they are recorded, then end(). The result promise gives
  // {accepted, duplicate} or {rejected: code, reason, retryAfterMs}.
  // `onRetry(rejected)`: the relay refused it for now (busy, rate, full
  // store); it goes again after the relay's hint, recording or not.
  startClip(target, format, { onRetry = null } = {}) {
    const clip = { id: newClipId(), target, format, packets: [], ended: null, live: null, onRetry };
    clip.done = new Promise((resolve) => { clip.resolve = resolve; });
    this.outbox.push(clip);
    if (this.online) clip.live = this.upload(clip);
    return {
      id: clip.id,
      push: (p) => { clip.packets.push(p); clip.live?.push(p); },
      end: (granule) => { clip.ended = granule; clip.live?.end(); },
      // Nothing worth sending (no audio): the upload is reset, which the
      // relay and live listeners take as a cut clip.
      abort: () => {
        this.outbox = this.outbox.filter((c) => c !== clip);
        clip.live?.abort();
        clip.resolve({ aborted: true });
      },
      done: clip.done,
    };
  }

  // Sends `clip` on a new stream: what is recorded so far, then the rest
  // as it comes. Retried with the same id after a lost connection.
  upload(clip) {
    const wt = this.wt;
    let writer = null;
    let sent = 0;
    let finished = false;
    let aborted = false;
    let pending = Promise.resolve();
    const write = (bytes) => { pending = pending.then(() => writer?.write(bytes)).catch(() => {}); };
    const flush = () => {
      while (sent < clip.packets.length) write(encodePacket(clip.packets[sent++]));
      if (clip.ended !== null && sent === clip.packets.length && !finished) {
        finished = true;
        write(encodeEnd(clip.packets.length, clip.ended));
        pending = pending.then(() => writer?.close()).catch(() => {});
      }
    };
    const run = (async () => {
      const bidi = await wt.createBidirectionalStream();
      writer = bidi.writable.getWriter();
      if (aborted) { writer.abort(0x18).catch(() => {}); throw new Error("aborted"); }
      write(encodeClipHeader(clip.id, clip.target, clip.format));
      flush();
      const rd = new StreamReader(bidi.readable);
      const answer = await rd.message();
      if (!answer) throw new Error("no answer");
      // Read on to the FIN that follows the answer (spec §5, "Sending").
      rd.message().catch(() => {});
      return answer;
    })();
    run.then((a) => this.answered(clip, a), () => { /* connection lost: kept in the outbox */ });
    return {
      push: () => { if (writer) flush(); },
      end: () => { if (writer) flush(); },
      // Before the stream exists, `run` resets it as soon as it does.
      abort: () => { aborted = true; pending = pending.then(() => writer?.abort(0x18)).catch(() => {}); },
    };
  }

  answered(clip, a) {
    if (a.type === "Accepted") {
      this.outbox = this.outbox.filter((c) => c !== clip);
      clip.resolve({ accepted: true, duplicate: a.duplicate });
    } else if (a.type === "Rejected" && RETRYABLE.has(a.code)) {
      // Also while still recording: the next attempt sends what was
      // recorded so far, then the rest as it comes. Offline by then: the
      // outbox sends it on reconnect.
      clip.live = null;
      const wait = Math.max(a.retryAfterMs, 1000);
      clip.onRetry?.({ code: a.code, reason: a.reason, retryAfterMs: wait });
      setTimeout(() => {
        if (this.online && !clip.live && this.outbox.includes(clip)) clip.live = this.upload(clip);
      }, wait);
    } else if (a.type === "Rejected") {
      this.outbox = this.outbox.filter((c) => c !== clip);
      clip.resolve({ rejected: a.code, reason: a.reason, retryAfterMs: a.retryAfterMs });
    }
  }

  // After a reconnect: every clip not yet accepted goes again, same id.
  flushOutbox() {
    for (const clip of this.outbox) {
      if (!clip.live) clip.live = this.upload(clip);
    }
  }
}

export const claims = (token) => {
  const part = token.split(".")[1] ?? "";
  const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
  return JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0))));
};
