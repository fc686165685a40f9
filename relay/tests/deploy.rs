//! The deploy files: Prometheus config and alert rules pass promtool, the
//! systemd unit passes `systemd-analyze verify`, the binary speaks the
//! systemd notify protocol the unit relies on, and the Grafana dashboard
//! is well-formed. (relay/tests/metrics.rs checks their metric names
//! against a live scrape.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The deploy files pass their own tools' checks.
#[test]
fn prometheus_config_rules_and_the_systemd_unit_verify() {
    let root = repo();
    for args in [
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/alerts.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root)
            .output()
            .expect("promtool (apt-get install prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // systemd-analyze, where the machine has it; the unit's ExecStart
    // points at the binary this test built.
    let has_systemd = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_systemd {
        eprintln!("systemd-analyze not found: unit not verified");
        return;
    }
    let unit = std::fs::read_to_string(root.join("deploy/systemd/ptt-relay.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/ptt-relay serve"));
    verify_unit(
        "ptt-relay.service",
        &unit.replace("/usr/local/bin/ptt-relay", env!("CARGO_BIN_EXE_ptt-relay")),
    );
    // The cluster's NATS unit (its ExecStart is Debian's nats-server).
    let nats = std::fs::read_to_string(root.join("deploy/cluster/nats.service")).unwrap();
    verify_unit("nats.service", &nats);
}

/// `systemd-analyze verify` on a unit: it exits 0 on settings it
/// ignores, so any complaint naming the unit fails too.
fn verify_unit(name: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains(name),
        "systemd-analyze verify {name}: {stderr}"
    );
}

/// docs/metrics.md, the dashboard and the alert rules agree with the code
/// (without a relay).
#[test]
fn the_dashboard_is_generated_and_names_documented_metrics() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/ptt-relay.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dash["uid"], "ptt-relay");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() > 10);
    for p in panels.iter().filter(|p| p["type"] == "timeseries") {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
    }
}

/// `Type=notify`: READY=1 once the endpoint is up, STOPPING=1 when SIGTERM
/// starts the drain, exit 0. And the UDP buffer warning appears exactly
/// when the kernel caps the 8 MiB the relay asks for.
#[test]
fn the_binary_notifies_systemd_and_warns_when_udp_buffers_are_capped() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ptt-relay"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--web",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no READY=1 within 30 s");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let n = sock.recv(&mut buf).expect("no STOPPING=1 within 30 s");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    // Linux grants at most rmem_max and reports twice what it grants.
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let capped = rmem_max * 2 < 8 * 1024 * 1024;
    assert_eq!(
        log.contains("UDP receive buffer capped by the kernel: raise net.core.rmem_max"),
        capped,
        "rmem_max {rmem_max}: {log}"
    );
}
