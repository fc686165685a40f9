//! A real `nats-server` on loopback for cluster tests, and relays joined
//! over it.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TestRelay, start, start_in};

/// A `nats-server` on loopback, killed on drop.
pub struct Nats {
    child: Child,
    port: u16,
    pub url: String,
    dir: tempfile::TempDir,
}

pub fn spawn_nats(port: u16, dir: &std::path::Path) -> Child {
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server must be installed (apt-get install nats-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Nats {
    pub fn start() -> Nats {
        let port = free_ports(1)[0];
        let dir = tempfile::tempdir().unwrap();
        Nats {
            child: spawn_nats(port, dir.path()),
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        }
    }

    /// Kills the server and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn resume(&mut self) {
        self.child = spawn_nats(self.port, self.dir.path());
    }

    /// Sends the server a signal by name (`STOP`: it stops answering
    /// without closing its connections; `CONT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new data dir holding the certificate, key and token secret of the
/// data dir `from` (relays of a cluster share them).
pub fn sharing_keys(from: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    relay::testing::DataFiles::new(from)
        .share_with(dir.path())
        .unwrap();
    dir
}

pub fn data_dir(t: &TestRelay) -> &std::path::Path {
    t.relay.files().cert.parent().unwrap()
}

/// Two relays in one cluster, sharing certificate and token secret.
pub async fn pair(nats: &Nats) -> (TestRelay, TestRelay, tempfile::TempDir) {
    let url = nats.url.clone();
    let one = start(|c| c.cluster = url.clone()).await;
    let dir = sharing_keys(data_dir(&one));
    let two = start_in(dir.path(), |c| c.cluster = url).await;
    (one, two, dir)
}

pub async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (at most `secs`) until `path` on the admin listener answers
/// `status`.
pub async fn until_answer(
    admin: std::net::SocketAddr,
    path: &str,
    status: u16,
    secs: u64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while super::http_get(admin, path).await.0 != status {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clip `id` complete on `events` within `secs` (a bound, not a measure).
pub async fn complete_within(
    events: &mut tokio::sync::mpsc::Receiver<ptt_client::Event>,
    id: codec::wire::ClipId,
    secs: u64,
    what: &str,
) -> ptt_client::ReceivedClip {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match events.recv().await.expect("event channel closed") {
                ptt_client::Event::Complete(g) if g.id() == id => return g,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not delivered in {secs} s: {what}"))
}

/// A TCP forwarder to NATS that can cut its connections and refuse new
/// ones for a while: one relay loses NATS while the others keep it.
pub struct Cuttable {
    pub url: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    pub async fn to(nats: &Nats) -> Cuttable {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let upstream = format!("127.0.0.1:{}", nats.port);
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Cuttable {
            url,
            open,
            conns,
            accept,
        }
    }

    /// Closes every connection through it and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A 3-node NATS cluster started from one of the deployment's files (with
/// loopback ports), killed on drop.
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    pub urls: Vec<String>,
    /// Each node's config file and environment, to start it again.
    envs: Vec<(std::path::PathBuf, Vec<(String, String)>)>,
    /// Each node's monitoring port (`/healthz`).
    http: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
}

impl NatsCluster {
    /// `deploy/cluster/nats.conf`'s three nodes.
    pub fn start() -> NatsCluster {
        NatsCluster::start_from("deploy/cluster/nats.conf", |_| Vec::new())
    }

    /// Three nodes from `conf` (a path in the repository), each given the
    /// variables of `deploy/cluster/nats.conf` and then `extra(node)`.
    pub fn start_from(conf: &str, extra: impl Fn(usize) -> Vec<(String, String)>) -> NatsCluster {
        let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(conf);
        let ports = free_ports(9);
        let (mut nodes, mut urls, mut dirs, mut envs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let mut env: Vec<(String, String)> = vec![
                ("NATS_NAME".into(), format!("nats-{}", i + 1)),
                ("NATS_HOST".into(), "127.0.0.1".into()),
                ("NATS_CLIENT_PORT".into(), ports[i].to_string()),
                ("NATS_CLUSTER_PORT".into(), ports[3 + i].to_string()),
                ("NATS_HTTP".into(), format!("127.0.0.1:{}", ports[6 + i])),
                ("NATS_STORE".into(), dir.path().display().to_string()),
            ];
            for j in 0..3 {
                env.push((
                    format!("NATS_ROUTE_{}", j + 1),
                    format!("nats-route://127.0.0.1:{}", ports[3 + j]),
                ));
            }
            env.extend(extra(i));
            nodes.push(Some(spawn_node(&conf, &env)));
            urls.push(format!("nats://127.0.0.1:{}", ports[i]));
            dirs.push(dir);
            envs.push((conf.clone(), env));
        }
        let http = ports[6..9].to_vec();
        wait_healthy(&http);
        NatsCluster {
            nodes,
            urls,
            envs,
            http,
            _dirs: dirs,
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts every node that was killed again, on its ports and store,
    /// and waits until all are healthy.
    pub fn restart_killed(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.is_none() {
                let (conf, env) = &self.envs[i];
                *node = Some(spawn_node(conf, env));
            }
        }
        wait_healthy(&self.http);
    }
}

/// `n` free loopback TCP ports, none handed out before in this test
/// process (a port freed by one caller and taken by a server a moment
/// later must not be given to the next caller too).
pub fn free_ports(n: usize) -> Vec<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let mut held = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            out.push(port);
        }
        held.push(l);
    }
    out
}

fn spawn_node(conf: &std::path::Path, env: &[(String, String)]) -> Child {
    Command::new("nats-server")
        .arg("--config")
        .arg(conf)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server must be installed")
}

/// Waits until every node whose monitoring port is in `http` answers
/// `/healthz` (JetStream included).
fn wait_healthy(http: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in http {
        loop {
            assert!(Instant::now() < deadline, "the NATS cluster did not form");
            let ok = std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok_and(|mut s| {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200")
            });
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
