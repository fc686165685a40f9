//! The web app's ptt/1 bytes (web/ptt.js, run by node) are the codec's:
//! what it writes and reads of the messages it shares with the SDK's
//! client, starting with the acks (`Ack` of several ids, `AckPolicy`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use codec::wire::{AckPolicy, ClipId, Message};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_web_apps_acks_are_the_codecs() {
    let policy = Message::AckPolicy(AckPolicy {
        max_ids: 32,
        hold_ms: 20,
    })
    .to_bytes();
    let ptt_js = common::repo().join("web/ptt.js");
    let script = format!(
        r#"import {{ encodeAck, encodeAcks, decodeMessage, readVarint }} from "{}";
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const id = (v) => new Uint8Array(16).fill(v);
const p = Uint8Array.from(Buffer.from("{}", "hex"));
const t = readVarint(p, 0), l = readVarint(p, t[1]);
const m = decodeMessage(t[0], p.subarray(t[1] + l[1]));
console.log(JSON.stringify({{
  one: hex(encodeAck(id(0x11))),
  oneHeld: hex(encodeAcks([id(0x11)])),
  two: hex(encodeAcks([id(0x11), id(0x22)])),
  policy: m,
}}));
"#,
        ptt_js.display(),
        hex(&policy)
    );
    let out: serde_json::Value = serde_json::from_slice(&common::run_node(&script)).unwrap();
    let one = Message::Ack(ClipId([0x11; 16])).to_bytes();
    let two = Message::Acks(vec![ClipId([0x11; 16]), ClipId([0x22; 16])]).to_bytes();
    assert_eq!(out["one"], hex(&one));
    // A batch of one, as `flushAcks` sends it, is a plain `Ack`.
    assert_eq!(out["oneHeld"], hex(&one));
    assert_eq!(out["two"], hex(&two));
    assert_eq!(
        out["policy"],
        serde_json::json!({"type": "AckPolicy", "maxIds": 32, "holdMs": 20})
    );
}
