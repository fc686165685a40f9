// The page: sign-in, the push-to-talk button, who talks now, the recent
// clips. ptt.js speaks the protocol, audio.js records and plays.
// `window.ptt` exposes the page's state to tests and to curious users.

import { PttSession, claims, codeWords, codeName, idHex } from "./ptt.js";
import { Recorder, Player, FORMAT, supported } from "./audio.js";

const $ = (id) => document.getElementById(id);
const state = {
  user: null, status: "", talkStatus: "", clips: [], now: {}, busy: null,
  decoded: 0, decodeErrors: 0, sent: [], pressedAt: null, sounding: {},
  statusLog: [],
};
window.ptt = state;
// Errors (the decoder's included) are kept for whoever checks the page.
state.errors = [];
const consoleError = console.error.bind(console);
console.error = (...a) => { state.errors.push(a.map(String).join(" ")); consoleError(...a); };
window.addEventListener("error", (e) => state.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => state.errors.push(String(e.reason?.message ?? e.reason)));

let session = null;
let recorder = null;
let player = null;
let press = null; // the clip being recorded
const recent = new Map(); // id -> clip entry (for replay)
const MAX_RECENT = 50;

function say(el, words) {
  $(el).textContent = words;
  state[el === "status" ? "status" : "talkStatus"] = words;
  // The connection's recent history (ms since the page opened), for
  // whoever checks why a page is not online.
  if (el === "status") {
    state.statusLog.push([Math.round(performance.now()), words]);
    if (state.statusLog.length > 20) state.statusLog.shift();
  }
}

function tokenFromLink() {
  const m = location.hash.match(/token=([^&]+)/);
  if (!m) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(m[1]);
}

async function signIn(token) {
  let c;
  try { c = claims(token); } catch { say("status", "that is not a token"); return; }
  const missing = await supported();
  if (missing) { say("status", missing); return; }
  sessionStorage.setItem("ptt-token", token);
  $("signin").hidden = true;
  $("talk").hidden = false;
  const channels = Object.keys(c.channels ?? {});
  const sel = $("to-channel");
  sel.replaceChildren(...channels.map((n) => new Option(`#${n}`, n)));
  $("channel-choice").hidden = channels.length === 0;
  if (channels.length) document.querySelector('input[value="channel"]').checked = true;

  player = new Player();
  await player.open((key) => {
    state.sounding[key] = performance.timeOrigin + performance.now();
  });
  // The microphone is asked for now, so the first press records at once
  // (refused: the button asks again).
  recorder = new Recorder();
  state.mic = recorder.open().then(() => true, (e) => {
    recorder = null;
    say("talk-status", `no microphone yet: ${e.message ?? e}`);
    return false;
  });
  session = new PttSession({ token });
  // Whether a connection is up now (Welcome read, not yet closed).
  Object.defineProperty(state, "connected", { get: () => session?.online ?? false, enumerable: true });
  session.addEventListener("state", (e) => {
    say("status", e.detail.words);
    $("ptt").disabled = false;
  });
  session.addEventListener("welcome", (e) => { state.user = e.detail.user; });
  session.addEventListener("clipstart", (e) => clipStart(e.detail.d));
  session.addEventListener("packet", (e) => player.packet(e.detail.d.idHex, e.detail.packet));
  // Ends are handled one after another, in the order they came.
  let ends = Promise.resolve();
  session.addEventListener("clipend", (e) => { ends = ends.then(() => clipEnd(e.detail)); });
  session.addEventListener("clipcut", (e) => { ends = ends.then(() => clipCut(e.detail)); });
  session.addEventListener("expired", (e) => {
    const m = e.detail;
    addEntry({ id: idHex(m.id), sender: m.sender, target: m.target, createdMs: m.createdMs, expired: true });
  });
  session.start();
}

// ---- listening --------------------------------------------------------

function where(target) { return target.channel ? `#${target.name}` : "you"; }

function clipStart(d) {
  if (d.live && d.target.channel) setNow(d.target.name, d.sender);
  else if (d.live) setNow("", d.sender);
  const entry = { id: d.idHex, sender: d.sender, target: d.target, createdMs: d.createdMs, live: d.live, frames: 0 };
  entry.decoding = player.begin(d.idHex, d.format, (n) => { entry.frames = n; });
  recent.set(d.idHex, entry);
}

async function clipEnd({ d, packets, end }) {
  if (d.live) setNow(d.target.channel ? d.target.name : "", null);
  // A live clip played as it came; a stored one plays now, whole.
  const s = d.live ? await player.end(d.idHex) : await player.play(d.idHex, d.format, packets);
  const entry = recent.get(d.idHex) ?? {};
  recent.set(d.idHex, entry);
  Object.assign(entry, {
    id: d.idHex, sender: d.sender, target: d.target, createdMs: d.createdMs, live: d.live,
    format: d.format, packets, granule: end.granule,
    ms: Math.round(Math.max(0, end.granule - d.format.preSkip) / 48),
    frames: s?.frames ?? 0, decodeErrors: s?.errors ?? 0,
  });
  state.decoded += entry.frames;
  state.decodeErrors += entry.decodeErrors;
  addEntry(entry);
  session.keep(d); // kept whole by the page: ack
}

function clipCut({ d, code }) {
  if (d.live) setNow(d.target.channel ? d.target.name : "", null);
  player.end(d.idHex);
  recent.delete(d.idHex);
  const words = code == null ? "cut off" : codeWords(code);
  say("talk-status", `${d.sender} to ${where(d.target)}: ${words}`);
}

function setNow(channel, sender) {
  if (sender) state.now[channel] = sender;
  else delete state.now[channel];
  const items = Object.entries(state.now).map(([c, s]) => {
    const li = document.createElement("li");
    li.textContent = c ? `${s} in #${c}` : `${s} to you`;
    return li;
  });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "empty"; li.textContent = "nobody";
    items.push(li);
  }
  $("now").replaceChildren(...items);
}

function addEntry(entry) {
  state.clips = state.clips.filter((c) => c.id !== entry.id);
  state.clips.push({
    id: entry.id, sender: entry.sender, channel: entry.target?.channel ? entry.target.name : null,
    createdMs: entry.createdMs, ms: entry.ms ?? 0, packets: entry.packets?.length ?? 0,
    frames: entry.frames ?? 0, decodeErrors: entry.decodeErrors ?? 0, live: !!entry.live,
    expired: !!entry.expired,
  });
  while (state.clips.length > MAX_RECENT) recent.delete(state.clips.shift().id);
  const li = document.createElement("li");
  li.dataset.id = entry.id;
  const when = new Date(entry.createdMs).toLocaleTimeString();
  const what = entry.expired
    ? "expired before it reached you"
    : `${(entry.ms / 1000).toFixed(1)} s`;
  const text = document.createElement("span");
  text.textContent = `${entry.sender} → ${where(entry.target)} · ${when} · ${what}`;
  li.append(text);
  if (!entry.expired) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = "Play";
    b.setAttribute("aria-label", `play ${entry.sender}'s clip from ${when}`);
    b.onclick = () => player.play(`${entry.id}:${Date.now()}`, entry.format, entry.packets);
    li.append(b);
  }
  $("clips").prepend(li);
  while ($("clips").children.length > MAX_RECENT) $("clips").lastChild.remove();
}

// ---- talking ----------------------------------------------------------

function target() {
  const kind = document.querySelector('input[name="kind"]:checked')?.value;
  if (kind === "channel") return { channel: true, name: $("to-channel").value };
  const name = $("to-user").value.trim();
  return name ? { channel: false, name } : null;
}

async function pressStart() {
  if (press || !session) return;
  const to = target();
  if (!to) { say("talk-status", "say who to talk to first"); return; }
  state.pressedAt = performance.timeOrigin + performance.now();
  $("ptt").setAttribute("aria-pressed", "true");
  $("ptt").classList.add("on");
  if (!recorder || !(await state.mic)) {
    recorder = new Recorder();
    state.mic = recorder.open().then(() => true);
    try { await state.mic; } catch (e) {
      recorder = null; release();
      say("talk-status", `no microphone: ${e.message ?? e}`); return;
    }
  }
  const clip = session.startClip(to, FORMAT, {
    onRetry: (r) => say("talk-status", `${codeWords(r.code)} (in ${Math.ceil(r.retryAfterMs / 1000)} s)`),
  });
  press = { clip, to, packets: 0, cancelled: false };
  const mine = press;
  say("talk-status", session.online ? `talking to ${to.channel ? "#" + to.name : to.name}…` : "recording (offline: sent when back)…");
  clip.done.then((r) => answered(mine, r));
  recorder.start((p) => { mine.packets += 1; clip.push(p); });
  if (!press) pressEnd(); // released while the microphone opened
}

function release() {
  $("ptt").setAttribute("aria-pressed", "false");
  $("ptt").classList.remove("on");
}

async function pressEnd() {
  release();
  const p = press;
  if (!p || !recorder) { press = null; return; }
  press = null;
  const granule = await recorder.stop();
  if (p.packets === 0) {
    p.clip.abort();
    say("talk-status", "nothing recorded: hold the button while you talk");
    return;
  }
  p.clip.end(granule);
  if (!p.done) say("talk-status", session.online ? "sending…" : "kept: will be sent when back online");
}

function answered(p, r) {
  p.done = true;
  if (r.aborted) return;
  const to = p.to.channel ? `#${p.to.name}` : p.to.name;
  if (r.accepted) {
    state.sent.push({ id: idHex(p.clip.id), packets: p.packets });
    say("talk-status", `sent to ${to}`);
  } else if (r.rejected === 0x1c) {
    // Busy: the relay names the holder in its reason ("busy: alice holds...").
    state.busy = r.reason;
    say("talk-status", r.reason.replace(/^busy: /, "Busy: "));
    if (press === p) { press = null; recorder.stop(); release(); }
  } else {
    say("talk-status", `not sent to ${to}: ${codeWords(r.rejected)}`);
    state.rejections = [...(state.rejections ?? []), { code: codeName(r.rejected), reason: r.reason }];
    console.warn("refused", codeName(r.rejected), r.reason);
    if (press === p) { press = null; recorder.stop(); release(); }
  }
}

function wireButton() {
  const b = $("ptt");
  b.addEventListener("pointerdown", (e) => { b.setPointerCapture(e.pointerId); pressStart(); });
  for (const ev of ["pointerup", "pointercancel", "lostpointercapture"]) b.addEventListener(ev, () => { if (press) pressEnd(); });
  b.addEventListener("contextmenu", (e) => e.preventDefault());
  const typing = () => ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName);
  document.addEventListener("keydown", (e) => {
    if (e.code !== "Space" || e.repeat || typing() || $("talk").hidden) return;
    e.preventDefault(); pressStart();
  });
  document.addEventListener("keyup", (e) => {
    if (e.code !== "Space" || typing()) return;
    e.preventDefault(); if (press) pressEnd();
  });
  // Enter or a click from assistive tech: a toggle, press then release.
  b.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.repeat) return;
    e.preventDefault(); press ? pressEnd() : pressStart();
  });
}

// ---- start ------------------------------------------------------------

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem("ptt-token");
  session?.stop();
  location.reload();
});
wireButton();
window.pttPress = pressStart;
window.pttRelease = pressEnd;

const token = tokenFromLink() ?? sessionStorage.getItem("ptt-token");
say("status", "signed out");
if (token) signIn(token);
