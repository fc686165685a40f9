//! What a load run reports: the JSON report (`--report-json`), the summary
//! table, the HTML page with plots (`--report-html`), and the progress bar.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::run::{FRAME_KINDS, LEGS, RelayUsage};
use super::stats::{Latency, Percentiles};
use super::verify::Counts;
use super::workload::Workload;

/// One second of the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct TimePoint {
    pub t_s: u64,
    pub clips_delivered: u64,
    pub first_frame_max_ms: f64,
    /// The longest delivery (the sender wrote the clip's end → the
    /// recipient had it whole) of the clips delivered in this second: a
    /// backlog held back by an outage shows as a run of long ones.
    pub delivery_max_ms: f64,
}

/// The relay's resource use, when it ran locally (`--relay-pid`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RelayReport {
    /// CPU used over the run, in % of one core.
    pub cpu_percent: f64,
    /// CPU per packet delivered (sender → relay → recipient), µs.
    pub cpu_us_per_packet: f64,
    pub rss_max_mib: f64,
    pub rss_end_mib: f64,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The verification: `deliveries_ok`, `lost`, `duplicated`,
    /// `corrupted`, `redelivered`, `unowed`, `accepted` (top-level fields in
    /// the JSON).
    #[serde(flatten)]
    pub counts: Counts,
    pub clips_started: u64,
    pub clips_accepted: u64,
    pub send_failed: u64,
    pub send_retries: u64,
    /// Deliveries reset by the relay as cut off.
    pub cut: u64,
    pub connects: u64,
    /// Connections whose `Auth` went in QUIC 0-RTT (resumed).
    pub zero_rtt_connects: u64,
    pub connect_failures: u64,
    /// Clip rejections by error code (each was retried after the relay's
    /// hint, up to 10 times).
    pub rejections: std::collections::BTreeMap<String, u64>,
    /// Failed connection attempts by reason (closed with a code, refused).
    pub connect_errors: std::collections::BTreeMap<String, u64>,
    /// Clips accepted per second while users were talking.
    pub clips_per_s: f64,
    pub packets_per_s: f64,
    /// Seconds of voice accepted per second.
    pub voice_s_per_s: f64,
    /// Seconds of voice delivered whole and verified.
    pub delivered_voice_s: f64,
    /// Relay hop of a live clip's first packet: sender wrote it → the
    /// recipient read it.
    pub first_frame_ms: Percentiles,
    /// Channel runs: per clip, the first packet's latency to the slowest
    /// member (time until the last member has the first packet).
    pub last_member_first_frame_ms: Percentiles,
    /// Access time: the sender opened the clip's stream → the recipient had
    /// the relay's `Delivery` header (live clips).
    pub access_ms: Percentiles,
    /// Access time from the press (before connecting, with `press_from =
    /// asleep`) to the relay having the clip's header (its
    /// `Delivery.created_ms`, so millisecond resolution; live clips).
    pub press_to_relay_ms: Percentiles,
    /// From the press to the listener having the `Delivery` header, which
    /// travels with the first packet (live clips).
    pub press_to_listener_ms: Percentiles,
    /// The sender wrote the clip's end → the recipient had it whole.
    pub delivery_ms: Percentiles,
    /// The sender wrote the clip's end → the sender had `Accepted`.
    pub ack_ms: Percentiles,
    /// UDP bytes on the users' connections (both directions, handshakes,
    /// acks and keep-alives included) per second of voice per leg
    /// (sender → relay and relay → recipient are two legs).
    pub wire_bytes_per_voice_s: f64,
    /// Of `wire_bytes_per_voice_s`, what the connections spent up to
    /// `Welcome` (handshake, `Auth`): a long-lived session pays it once, a
    /// short load run over few voice-seconds per user notices it.
    pub connect_bytes_per_voice_s: f64,
    /// Opus payload bytes per second of voice.
    pub opus_bytes_per_voice_s: f64,
    pub wire_overhead_ratio: f64,
    /// UDP datagrams per second of voice per leg (both directions).
    pub datagrams_per_voice_s: f64,
    /// QUIC ACK frames per second of voice per leg (both directions).
    pub ack_frames_per_voice_s: f64,
    /// UDP datagrams the users' connections sent to the relay, in all.
    pub datagrams_to_relay: u64,
    /// UDP datagrams the users' connections received from the relay.
    pub datagrams_from_relay: u64,
    /// Every UDP datagram on both legs, both directions (handshakes,
    /// ACK-only ones and keep-alives included), per clip relayed (a clip
    /// delivered whole to one recipient: `counts.deliveries_ok`).
    pub datagrams_per_clip: f64,
    /// Of `datagrams_per_clip`, those from senders to the relay (clip data,
    /// and their ACKs of what the relay sent them). Counted only when
    /// every connection carries one leg (`pairs`, or channels with one
    /// talker each); `null` otherwise.
    pub datagrams_per_clip_sender_to_relay: Option<f64>,
    /// From the relay to senders (their ACKs, `Accepted`, credit).
    pub datagrams_per_clip_relay_to_sender: Option<f64>,
    /// From the relay to recipients (deliveries).
    pub datagrams_per_clip_relay_to_recipient: Option<f64>,
    /// From recipients to the relay (their ACKs, `Ack`s, credit).
    pub datagrams_per_clip_recipient_to_relay: Option<f64>,
    /// What those datagrams carry: QUIC frames per clip relayed on each
    /// leg and direction, by kind (`ack`, `stream`, `max_streams`,
    /// `max_data` with `max_stream_data`, `other`); counted as the
    /// per-leg datagrams are.
    pub frames_per_clip: Option<BTreeMap<&'static str, BTreeMap<&'static str, f64>>>,
    pub relay: Option<RelayReport>,
    pub talking_s: f64,
    pub elapsed_s: f64,
    /// When the run started (Unix ms): `timeline` seconds count from it,
    /// so events outside the run (a relay or NATS killed and started) can
    /// be placed on it.
    pub started_unix_ms: u64,
    pub workload: Workload,
    pub timeline: Vec<TimePoint>,
    /// Latency CDFs, (ms, quantile), for plots.
    #[serde(skip)]
    pub cdfs: Vec<(&'static str, Vec<(f64, f64)>)>,
}

/// Everything the run measured.
pub struct Inputs {
    pub workload: Workload,
    pub counts: Counts,
    pub talking_secs: f64,
    pub elapsed: Duration,
    pub started_unix_ms: u64,
    pub clips_started: u64,
    pub clips_accepted: u64,
    pub send_failed: u64,
    pub send_retries: u64,
    pub cut: u64,
    pub packets: u64,
    pub opus_bytes: u64,
    pub voice_ms: u64,
    pub delivered_voice_ms: u64,
    pub wire_bytes: u64,
    pub connect_bytes: u64,
    pub datagrams: u64,
    pub datagrams_from_relay: u64,
    /// Datagrams per leg and direction (sender → relay, relay → sender,
    /// relay → recipient, recipient → relay), when each connection had
    /// one leg.
    pub leg_datagrams: Option<[u64; LEGS.len()]>,
    /// QUIC frames on the same legs, by `run::FRAME_KINDS`.
    pub leg_frames: Option<[[u64; FRAME_KINDS.len()]; LEGS.len()]>,
    pub ack_frames: u64,
    pub connects: u64,
    pub zero_rtt_connects: u64,
    pub connect_failures: u64,
    pub first_frame: Latency,
    pub last_member: Latency,
    pub access: Latency,
    pub press_relay: Latency,
    pub press_listener: Latency,
    pub delivery: Latency,
    pub ack: Latency,
    pub timeline: Vec<TimePoint>,
    pub rejections: std::collections::BTreeMap<String, u64>,
    pub connect_errors: std::collections::BTreeMap<String, u64>,
    pub relay: Option<RelayUsage>,
}

impl Report {
    pub fn build(i: Inputs) -> Self {
        let per = |x: u64| x as f64 / i.talking_secs.max(1e-9);
        let voice_s = i.voice_ms as f64 / 1000.0;
        let legs = 2.0 * voice_s;
        let wire = if legs > 0.0 {
            i.wire_bytes as f64 / legs
        } else {
            0.0
        };
        let opus = if voice_s > 0.0 {
            i.opus_bytes as f64 / voice_s
        } else {
            0.0
        };
        let relay = i.relay.map(|u| RelayReport {
            cpu_percent: 100.0 * u.cpu_secs / u.wall_secs.max(1e-9),
            cpu_us_per_packet: if i.packets > 0 {
                u.cpu_secs * 1e6 / i.packets as f64
            } else {
                0.0
            },
            rss_max_mib: u.rss_max_bytes as f64 / (1024.0 * 1024.0),
            rss_end_mib: u.rss_end_bytes as f64 / (1024.0 * 1024.0),
        });
        let per_clip = |d: u64| {
            if i.counts.deliveries_ok > 0 {
                d as f64 / i.counts.deliveries_ok as f64
            } else {
                0.0
            }
        };
        let leg = |k: usize| i.leg_datagrams.map(|l| per_clip(l[k]));
        let frames_per_clip = i.leg_frames.map(|legs| {
            LEGS.iter()
                .zip(legs)
                .map(|(name, counts)| {
                    let kinds = FRAME_KINDS
                        .iter()
                        .zip(counts)
                        .map(|(k, n)| (*k, per_clip(n)))
                        .collect();
                    (*name, kinds)
                })
                .collect()
        });
        Report {
            frames_per_clip,
            datagrams_per_clip: per_clip(i.datagrams),
            datagrams_per_clip_sender_to_relay: leg(0),
            datagrams_per_clip_relay_to_sender: leg(1),
            datagrams_per_clip_relay_to_recipient: leg(2),
            datagrams_per_clip_recipient_to_relay: leg(3),
            counts: i.counts,
            clips_started: i.clips_started,
            clips_accepted: i.clips_accepted,
            send_failed: i.send_failed,
            send_retries: i.send_retries,
            cut: i.cut,
            connects: i.connects,
            zero_rtt_connects: i.zero_rtt_connects,
            connect_failures: i.connect_failures,
            rejections: i.rejections,
            connect_errors: i.connect_errors,
            clips_per_s: per(i.clips_accepted),
            packets_per_s: per(i.packets),
            voice_s_per_s: per(i.voice_ms) / 1000.0,
            delivered_voice_s: i.delivered_voice_ms as f64 / 1000.0,
            first_frame_ms: i.first_frame.summary(),
            last_member_first_frame_ms: i.last_member.summary(),
            access_ms: i.access.summary(),
            press_to_relay_ms: i.press_relay.summary(),
            press_to_listener_ms: i.press_listener.summary(),
            delivery_ms: i.delivery.summary(),
            ack_ms: i.ack.summary(),
            wire_bytes_per_voice_s: wire,
            connect_bytes_per_voice_s: if legs > 0.0 {
                i.connect_bytes as f64 / legs
            } else {
                0.0
            },
            opus_bytes_per_voice_s: opus,
            wire_overhead_ratio: if opus > 0.0 { wire / opus } else { 0.0 },
            datagrams_per_voice_s: if legs > 0.0 {
                i.datagrams as f64 / legs
            } else {
                0.0
            },
            ack_frames_per_voice_s: if legs > 0.0 {
                i.ack_frames as f64 / legs
            } else {
                0.0
            },
            datagrams_to_relay: i.datagrams - i.datagrams_from_relay,
            datagrams_from_relay: i.datagrams_from_relay,
            relay,
            talking_s: i.talking_secs,
            elapsed_s: i.elapsed.as_secs_f64(),
            started_unix_ms: i.started_unix_ms,
            workload: i.workload,
            timeline: i.timeline,
            cdfs: vec![
                ("first frame", i.first_frame.cdf()),
                ("access", i.access.cdf()),
                ("delivery", i.delivery.cdf()),
                ("sender ack", i.ack.cdf()),
            ],
        }
    }

    /// Lost, duplicated or corrupted clips: the run failed.
    pub fn failed(&self) -> bool {
        let c = &self.counts;
        c.lost > 0 || c.duplicated > 0 || c.corrupted > 0
    }

    /// The end of the last second (from the run's start) in which a clip
    /// arrived more than `over` after its sender finished it: with an
    /// outage in the run, when its held-back backlog was all delivered.
    /// `None` if no clip took that long.
    pub fn held_back_until(&self, over: std::time::Duration) -> Option<u64> {
        let ms = over.as_secs_f64() * 1000.0;
        self.timeline
            .iter()
            .rev()
            .find(|p| p.delivery_max_ms > ms)
            .map(|p| p.t_s + 1)
    }

    /// The summary table printed at the end.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let w = &self.workload;
        let _ = writeln!(
            s,
            "workload: {} users, {:?} {:?} clips of {:?}..{:?} every {:?}, {:.0}% offline{}{}",
            w.users,
            w.duration,
            w.mode,
            w.clip_min,
            w.clip_max,
            w.talk_interval,
            w.offline_share * 100.0,
            w.storm_at
                .map(|t| format!(", storm at {t:?}"))
                .unwrap_or_default(),
            if w.impaired() {
                format!(
                    ", loss {}% delay {:?} jitter {:?} reorder {}%{}",
                    w.loss_pct,
                    w.delay,
                    w.jitter,
                    w.reorder_pct,
                    w.rebind_at
                        .map(|t| format!(" rebind at {t:?}"))
                        .unwrap_or_default()
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "verification: {} ok, {} lost, {} duplicated, {} corrupted ({} legal redeliveries, {} unowed)",
            self.counts.deliveries_ok,
            self.counts.lost,
            self.counts.duplicated,
            self.counts.corrupted,
            self.counts.redelivered,
            self.counts.unowed
        );
        let _ = writeln!(
            s,
            "clips: {} started, {} accepted, {} failed, {} retries, {} cut; {} connects ({} 0-RTT, {} failed)",
            self.clips_started,
            self.clips_accepted,
            self.send_failed,
            self.send_retries,
            self.cut,
            self.connects,
            self.zero_rtt_connects,
            self.connect_failures
        );
        if !self.rejections.is_empty() || !self.connect_errors.is_empty() {
            let _ = writeln!(
                s,
                "shed: clips rejected {:?}; connections failed {:?}",
                self.rejections, self.connect_errors
            );
        }
        let _ = writeln!(
            s,
            "throughput: {:.1} clips/s, {:.0} packets/s, {:.1} voice-s/s",
            self.clips_per_s, self.packets_per_s, self.voice_s_per_s
        );
        let _ = writeln!(
            s,
            "{:<18}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency ms", "n", "p50", "p90", "p95", "p99", "max"
        );
        for (name, p) in [
            ("first frame", &self.first_frame_ms),
            ("last member", &self.last_member_first_frame_ms),
            ("access", &self.access_ms),
            ("press → relay", &self.press_to_relay_ms),
            ("press → listener", &self.press_to_listener_ms),
            ("delivery", &self.delivery_ms),
            ("sender ack", &self.ack_ms),
        ] {
            let _ = writeln!(
                s,
                "{name:<18}{:>8}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                p.count, p.p50, p.p90, p.p95, p.p99, p.max
            );
        }
        let _ = writeln!(
            s,
            "wire: {:.0} B per voice-second per leg ({:.0} of them up to Welcome), Opus payload {:.0} B/s ({:.2}x); {:.1} datagrams and {:.1} ACK frames per voice-second per leg",
            self.wire_bytes_per_voice_s,
            self.connect_bytes_per_voice_s,
            self.opus_bytes_per_voice_s,
            self.wire_overhead_ratio,
            self.datagrams_per_voice_s,
            self.ack_frames_per_voice_s
        );
        let _ = write!(
            s,
            "datagrams per clip relayed: {:.2}",
            self.datagrams_per_clip
        );
        if let (Some(a), Some(b), Some(c), Some(d)) = (
            self.datagrams_per_clip_sender_to_relay,
            self.datagrams_per_clip_relay_to_sender,
            self.datagrams_per_clip_relay_to_recipient,
            self.datagrams_per_clip_recipient_to_relay,
        ) {
            let _ = write!(
                s,
                " (sender → relay {a:.2}, relay → sender {b:.2}, relay → recipient {c:.2}, recipient → relay {d:.2})"
            );
        }
        let _ = writeln!(s);
        for (leg, kinds) in self.frames_per_clip.iter().flatten() {
            let _ = write!(s, "  frames per clip, {leg}:");
            for (k, n) in kinds {
                let _ = write!(s, " {k} {n:.2}");
            }
            let _ = writeln!(s);
        }
        if let Some(r) = &self.relay {
            let _ = writeln!(
                s,
                "relay: {:.1}% CPU, {:.1} µs CPU per packet, RSS max {:.1} MiB (end {:.1} MiB)",
                r.cpu_percent, r.cpu_us_per_packet, r.rss_max_mib, r.rss_end_mib
            );
        }
        s
    }

    /// A self-contained HTML page: latency CDFs, deliveries and first-frame
    /// latency over time (inline SVG, no scripts).
    pub fn html(&self) -> anyhow::Result<String> {
        let json = serde_json::to_string_pretty(self)?;
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>client-sim load report</title>\
             <style>body{{font-family:sans-serif;margin:2em;max-width:980px}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}\
             svg{{background:#fff;border:1px solid #ccc;margin:0.5em 0}}</style></head><body>\
             <h1>client-sim load report</h1><pre>{}</pre>",
            escape(&self.table())
        );
        let series: Vec<(&str, Vec<(f64, f64)>)> = self
            .cdfs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| (*n, v.clone()))
            .collect();
        h.push_str("<h2>Latency CDFs</h2>");
        h.push_str(&svg_plot(
            &series,
            "latency (ms, log scale)",
            "share of clips",
            true,
        ));
        let t = &self.timeline;
        h.push_str("<h2>Deliveries per second</h2>");
        h.push_str(&svg_plot(
            &[(
                "clips delivered",
                t.iter()
                    .map(|p| (p.t_s as f64, p.clips_delivered as f64))
                    .collect(),
            )],
            "time (s)",
            "clips/s",
            false,
        ));
        h.push_str("<h2>Longest delivery per second</h2>");
        h.push_str(&svg_plot(
            &[(
                "delivery max",
                t.iter()
                    .map(|p| (p.t_s as f64, p.delivery_max_ms))
                    .collect(),
            )],
            "time (s)",
            "ms",
            false,
        ));
        h.push_str("<h2>Worst first-frame latency per second</h2>");
        h.push_str(&svg_plot(
            &[(
                "first frame max",
                t.iter()
                    .map(|p| (p.t_s as f64, p.first_frame_max_ms))
                    .collect(),
            )],
            "time (s)",
            "ms",
            false,
        ));
        let _ = write!(
            h,
            "<h2>Report</h2><pre>{}</pre></body></html>",
            escape(&json)
        );
        Ok(h)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// A line plot as inline SVG. `log_x` plots x on a log10 scale.
fn svg_plot(series: &[(&str, Vec<(f64, f64)>)], xlabel: &str, ylabel: &str, log_x: bool) -> String {
    let (w, h, m) = (900.0, 320.0, 55.0);
    let fx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let pts = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(fx(x));
        x1 = x1.max(fx(x));
        y1 = y1.max(y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let sx = |x: f64| m + (fx(x) - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / y1 * (h - 2.0 * m);
    let mut s = format!(
        "<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#333\"/>\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"#333\"/>\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\" font-size=\"12\">{xlabel}</text>\
         <text x=\"12\" y=\"{cy}\" font-size=\"12\" transform=\"rotate(-90 12 {cy})\" text-anchor=\"middle\">{ylabel}</text>",
        b = h - m,
        r = w - m,
        cx = w / 2.0,
        ty = h - 12.0,
        cy = h / 2.0,
    );
    // Axis ticks: 5 on each axis.
    for k in 0..=4 {
        let fxv = x0 + (x1 - x0) * f64::from(k) / 4.0;
        let xv = if log_x { 10f64.powf(fxv) } else { fxv };
        let px = m + (w - 2.0 * m) * f64::from(k) / 4.0;
        let _ = write!(
            s,
            "<text x=\"{px}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            h - m + 16.0,
            short(xv)
        );
        let yv = y1 * f64::from(k) / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            m - 6.0,
            sy(yv) + 4.0,
            short(yv)
        );
    }
    for (i, (name, v)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut d = String::new();
        for &(x, y) in v {
            let _ = write!(d, "{:.1},{:.1} ", sx(x), sy(y));
        }
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{d}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{name}</text>",
            w - m - 140.0,
            m + 16.0 * i as f64
        );
    }
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The progress bar (stderr; hidden when stderr is not a terminal).
pub struct Progress {
    bar: ProgressBar,
}

pub fn progress(duration: Duration) -> Progress {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent}% {msg}")
    {
        bar.set_style(style);
    }
    Progress { bar }
}

impl Progress {
    pub fn update(&self, t: Duration, started: u64, delivered: u64) {
        self.bar.set_position(t.as_millis() as u64);
        self.bar
            .set_message(format!("{started} clips started, {delivered} delivered"));
    }

    pub fn draining(&self, owed: u64) {
        self.bar
            .set_message(format!("waiting for {owed} owed clips"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
