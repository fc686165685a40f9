//! Metrics end to end: real traffic through a relay on loopback, its
//! `/metrics` checked by `promtool check metrics`, scraped by a real
//! Prometheus, and the deploy files' metrics checked against the scrape.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`, which
//! `scripts/test.sh` installs). The recorder is process-wide: every check
//! that reads counter values is in one test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use codec::ErrorCode;
use codec::wire::Target;
use common::*;
use ptt_client::{ClientError, ClientOptions, Pacing};
use relay::testing::CATALOGUE;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The value of one series (`name` or `name{labels}`) in a scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Metric names a PromQL-bearing file uses (`ptt_*`, `process_*`), with
/// histogram suffixes taken off.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text
        .match_indices("ptt_")
        .chain(text.match_indices("process_"))
    {
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = name
            .strip_suffix("_bucket")
            .unwrap_or(&name)
            .trim_end_matches('_')
            .to_owned();
        out.insert(name);
    }
    out
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (apt-get install prometheus)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Kills the child when dropped (a failing assert must not leak a server).
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_traffic_is_counted_linted_and_scraped_by_prometheus() {
    let t = start(|_| {}).await;
    let admin = t.relay.admin_addr();

    // Traffic: one live delivery (acknowledged), a duplicate retry, a clip
    // refused for lack of a channel right, a connection with a bad token.
    let (bob, mut ev) = t.connect("bob").await;
    let (alice, _) = t.connect("alice").await;
    let c = clip("bob", 10);
    assert!(!alice.send_clip(&c, Pacing::Upload).await.unwrap().duplicate);
    let got = next_complete(&mut ev).await;
    bob.ack(got.id()).await.unwrap();
    assert!(alice.send_clip(&c, Pacing::Upload).await.unwrap().duplicate);
    let mut to_channel = clip("x", 3);
    to_channel.target = Target::Channel("ops".into());
    match alice.send_clip(&to_channel, Pacing::Upload).await {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, ErrorCode::NotAllowed),
        other => panic!("{other:?}"),
    }
    let bad = t
        .try_connect_with("not-a-token", ClientOptions::default())
        .await;
    assert!(bad.is_err());

    // The ack reaches the store asynchronously: wait for it in the scrape.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let (status, body) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        if value(&body, "ptt_clips_delivered_total") == Some(1.0)
            || tokio::time::Instant::now() > deadline
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Counters say exactly what happened.
    for (series, want) in [
        ("ptt_clips_accepted_total{target=\"user\"}", 1.0),
        ("ptt_clips_accepted_total{target=\"channel\"}", 0.0),
        ("ptt_clips_duplicate_total", 1.0),
        ("ptt_clips_rejected_total{reason=\"not_allowed\"}", 1.0),
        ("ptt_clips_delivered_total", 1.0),
        ("ptt_deliveries_total{path=\"live\"}", 1.0),
        ("ptt_packets_in_total", 10.0),
        ("ptt_packets_out_total", 10.0),
        ("ptt_auth_failures_total{reason=\"token_invalid\"}", 1.0),
        ("ptt_connections_rejected_total{reason=\"auth\"}", 1.0),
        ("ptt_connections_accepted_total{transport=\"quic\"}", 2.0),
        ("ptt_handshakes_total{outcome=\"completed\"}", 3.0),
        ("ptt_sessions_open", 2.0),
        ("ptt_ready", 1.0),
        ("ptt_store_pending_copies", 0.0),
        ("ptt_sender_ack_seconds_count", 1.0),
        ("ptt_build_info{version=\"0.1.0\"}", 1.0),
    ] {
        assert_eq!(value(&scrape, series), Some(want), "{series}\n{scrape}");
    }
    let bytes_in = value(&scrape, "ptt_bytes_in_total").unwrap();
    assert_eq!(value(&scrape, "ptt_bytes_out_total"), Some(bytes_in));
    assert!(bytes_in > 10.0 * 40.0);
    // Wire bytes (the usage book's), current to the scrape: the clip went
    // up and came down, with QUIC around it.
    for dir in ["up", "down"] {
        let wire = value(
            &scrape,
            &format!("ptt_wire_bytes_total{{direction=\"{dir}\"}}"),
        );
        assert!(wire.unwrap() > bytes_in, "{dir}: {wire:?}");
    }
    assert!(value(&scrape, "ptt_relay_hop_seconds_count").unwrap() >= 1.0);
    assert!(value(&scrape, "ptt_store_sync_seconds_count").unwrap() >= 1.0);
    assert!(value(&scrape, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&scrape, "process_cpu_seconds_total").is_some());

    // Every catalogued metric is exported with its documented type.
    for m in CATALOGUE {
        let want = format!("# TYPE {} {}", m.name, m.kind.as_str());
        assert!(scrape.contains(&want), "missing `{want}`");
    }
    // No user, channel or clip id leaks into a label.
    let labels: Vec<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('{').map(|(_, rest)| rest))
        .collect();
    for secret in ["alice", "bob", "ops", &c.id.to_string(), "127.0.0.1"] {
        assert!(
            !labels.iter().any(|l| l.contains(secret)),
            "{secret} in a label"
        );
    }

    // promtool accepts the exposition.
    let out = run_with_stdin(Command::new("promtool").args(["check", "metrics"]), &scrape);
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the dashboard and the alert rules use is documented and
    // in the live scrape.
    let docs = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    for file in [
        "deploy/grafana/dashboards/ptt-relay.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let used = names_used(&text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        for name in used {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{file} uses {name}, not in docs/metrics.md"
            );
            assert!(
                scrape.contains(&format!("# TYPE {name} ")),
                "{file} uses {name}, not in a live scrape"
            );
        }
    }

    // A real Prometheus scrapes it.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ptt-relay\n    \
             static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (apt-get install prometheus)");
    let _prom = Killed(prom);
    let api: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let query = |q: &'static str| async move {
        let (status, body) = match tokio::net::TcpStream::connect(api).await {
            Ok(_) => http_get(api, &format!("/api/v1/query?query={q}")).await,
            Err(_) => return None,
        };
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // up{job="ptt-relay"} and sum(ptt_clips_accepted_total), URL-encoded.
        let up = query("up%7Bjob%3D%22ptt-relay%22%7D").await;
        let clips = query("sum(ptt_clips_accepted_total)").await;
        if up == Some(1.0) && clips.is_some_and(|c| c > 0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus did not scrape the relay: up={up:?} clips={clips:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
