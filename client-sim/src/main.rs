//! `client-sim`: talk to a relay as a person would (`send`, `listen`,
//! `usage`), and turn audio into clips and back (`encode`, `decode`).

mod audio_cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use codec::ogg_opus::OggOpus;
use codec::wire::{ClipId, Target};
use ptt_client::failover::{self, Connected, Relays, Watched};
use ptt_client::net;
use ptt_client::{Client, ClientError, ClientOptions, Event, OutgoingClip, Pacing};
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "client-sim",
    version,
    about = "Client and simulator for the push-to-talk relay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// Relay address, HOST:PORT; several, comma-separated, for relays of
    /// one service: the home relay first, then the others in order of
    /// preference. One that stops answering is left for the next within
    /// --failover-after, and the client goes back home once home answers
    /// again.
    #[arg(long, env = "PTT_RELAY")]
    relay: String,
    /// With several relays: how soon one that stopped answering is left
    /// for the next (what was sent unanswered for half of it, or a
    /// connection attempt for all of it).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    failover_after: Duration,
    /// A silent connection sends a QUIC PING this often (1s..25s): an idle
    /// client notices a relay gone within this plus half of
    /// --failover-after.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    keep_alive: Duration,
    /// PEM file of the relay's certificate (or the CA that signed it).
    #[arg(long, env = "PTT_CA")]
    ca: PathBuf,
    /// Access token (JWT) for the user to act as.
    #[arg(long, env = "PTT_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Args)]
struct LoadArgs {
    /// Relay address, HOST:PORT; several, comma-separated, for relays of
    /// one cluster (users are spread over them round-robin).
    #[arg(long, env = "PTT_RELAY")]
    relay: String,
    /// PEM file of the relay's certificate (or its CA).
    #[arg(long, env = "PTT_CA")]
    ca: PathBuf,
    /// The relay's token secret file: tokens are minted for every user.
    #[arg(long)]
    secret: PathBuf,
    #[command(flatten)]
    run: RunArgs,
    /// PID of a local relay, to report its CPU and memory.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Write the report as an HTML page with plots here.
    #[arg(long)]
    report_html: Option<PathBuf>,
}

#[derive(Args)]
struct BaselineArgs {
    /// A running sink (`client-sim sink`), HOST:PORT; without it, one is
    /// started in this process with --cert and --key.
    #[arg(long)]
    sink: Option<String>,
    /// The sink's certificate (to trust, or to serve with --key).
    #[arg(long)]
    cert: PathBuf,
    /// The certificate's key, for an in-process sink.
    #[arg(long)]
    key: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// What `load` and `baseline` share: the workload, the clip audio, the
/// JSON report.
#[derive(Args)]
struct RunArgs {
    /// Scenario file (TOML; keys as the workload flags, with `_`).
    #[arg(long)]
    scenario: Option<PathBuf>,
    #[command(flatten)]
    workload: client_sim::load::WorkloadArgs,
    /// Ogg Opus file whose packets make the clips (default: a built-in
    /// 9.3 s speech clip at 16 kbit/s, 20 ms frames).
    #[arg(long)]
    opus: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send an Ogg Opus file (or a WAV file, encoded on the way) as one
    /// clip; prints the clip id once the relay has stored it.
    Send {
        #[command(flatten)]
        conn: Conn,
        /// Recipient user id.
        #[arg(long, required_unless_present = "channel", conflicts_with = "channel")]
        to: Option<String>,
        /// Talk channel to talk in (needs the talk right in the token);
        /// fails with "busy" while another member holds the floor.
        #[arg(long)]
        channel: Option<String>,
        /// Ogg Opus file to send (as opusenc writes it), packets unchanged.
        #[arg(long, required_unless_present = "wav", conflicts_with = "wav")]
        opus: Option<PathBuf>,
        /// WAV file to clean, trim and encode (as `encode` does), then send.
        #[arg(long)]
        wav: Option<PathBuf>,
        #[command(flatten)]
        audio: audio_cli::AudioArgs,
        /// Pace packets in real time, as a phone recording would.
        #[arg(long)]
        live: bool,
        /// Clip id (32 hex digits) to use, e.g. to retry a send; random by
        /// default.
        #[arg(long)]
        clip_id: Option<String>,
        /// Attempts on connection loss or retryable refusal.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// Receive clips and write each as OUT/<clip-id>.opus.
    Listen {
        #[command(flatten)]
        conn: Conn,
        /// Directory for received clips.
        #[arg(long)]
        out: PathBuf,
        /// Also decode each clip to OUT/<clip-id>.wav.
        #[arg(long)]
        wav: bool,
        /// Exit 0 after this many clips.
        #[arg(long)]
        count: Option<u64>,
        /// Give up (exit 1) when --count clips have not arrived by then.
        /// Without --count, stop (exit 0) after this long. Default with
        /// --count: 30s; without: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Print this user's data use as the relay counted it: UDP payload
    /// bytes up (to the relay) and down (from it), per UTC day, this
    /// query's connection included. (Clips waiting for the user may start
    /// arriving meanwhile; they stay stored: nothing is acked.)
    Usage {
        #[command(flatten)]
        conn: Conn,
        /// Days back from today: 1 is today only; 0 every day the relay
        /// keeps (`usage_days`).
        #[arg(long, default_value_t = 0)]
        days: u64,
        /// Print JSON (`user`, `today`, `days` [{`date`, `bytes_up`,
        /// `bytes_down`}], `bytes_up`, `bytes_down`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register (or, with --remove, unregister) a device to be woken by a
    /// push when a clip starts for this user while it has no connected
    /// session; prints the relay's answer (for operators and tests).
    PushRegister {
        #[command(flatten)]
        conn: Conn,
        /// Who wakes the device.
        #[arg(long, value_parser = ["apns", "fcm"])]
        provider: String,
        /// The provider's token for the device (APNs device token, FCM
        /// registration token).
        #[arg(long, default_value = "")]
        push_token: String,
        /// APNs: the PushToTalk topic, `<bundle id>.voip-ptt`.
        #[arg(long, default_value = "")]
        topic: String,
        /// The device's id (one user may have several devices; the same
        /// id registered again replaces the old registration).
        #[arg(long, default_value = "client-sim")]
        device_id: String,
        /// Remove this device's registration instead.
        #[arg(long)]
        remove: bool,
    },
    /// Encode a WAV file (any rate, any channels) into an Ogg Opus clip:
    /// resample to 48 kHz mono, clean up, trim silence, Opus.
    Encode {
        /// WAV file to read.
        input: PathBuf,
        /// Ogg Opus file to write.
        output: PathBuf,
        #[command(flatten)]
        audio: audio_cli::AudioArgs,
    },
    /// Load a relay with thousands of virtual users; verify every delivery
    /// and measure latencies. Exits 1 when any clip was lost, duplicated or
    /// corrupted.
    Load(Box<LoadArgs>),
    /// The load workload (upload, closed loop) against a bare quinn sink
    /// instead of a relay: the reference rate for `load`.
    Baseline(Box<BaselineArgs>),
    /// Run only the bare quinn sink `baseline` sends to (e.g. pinned to
    /// the core a relay would use).
    Sink {
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:4440")]
        listen: std::net::SocketAddr,
        /// Certificate (PEM), e.g. a relay's DATA_DIR/cert.pem.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM), e.g. DATA_DIR/key.pem.
        #[arg(long)]
        key: PathBuf,
    },
    /// Decode an Ogg Opus file to a 16-bit 48 kHz WAV file.
    Decode {
        /// Ogg Opus file to read.
        input: PathBuf,
        /// WAV file to write.
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,quinn=error,quinn_proto=error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Send {
            conn,
            to,
            channel,
            opus,
            wav,
            audio,
            live,
            clip_id,
            retries,
        } => {
            let file = match (opus, wav) {
                (Some(opus), _) => OggOpus::read_file(&opus)
                    .with_context(|| format!("reading {}", opus.display()))?,
                (None, Some(wav)) => {
                    let (file, report) = audio_cli::encode_wav(&wav, &audio)?;
                    eprintln!("{}: {}", wav.display(), audio_cli::describe(&report));
                    file
                }
                (None, None) => bail!("give --opus FILE or --wav FILE"),
            };
            let target = match (to, channel) {
                (Some(u), _) => Target::User(u),
                (None, Some(c)) => Target::Channel(c),
                (None, None) => bail!("give --to USER or --channel NAME"),
            };
            send(conn, target, &file, live, clip_id, retries).await
        }
        Cmd::Listen {
            conn,
            out,
            wav,
            count,
            timeout,
        } => listen(conn, &out, wav, count, timeout).await,
        Cmd::Usage { conn, days, json } => usage(conn, days, json).await,
        Cmd::PushRegister {
            conn,
            provider,
            push_token,
            topic,
            device_id,
            remove,
        } => {
            let r = codec::wire::PushRegister {
                provider: codec::wire::PushProvider::from_name(&provider)
                    .context("--provider is apns or fcm")?,
                device_id,
                token: push_token,
                topic,
            };
            push_register(conn, r, remove).await
        }
        Cmd::Encode {
            input,
            output,
            audio,
        } => audio_cli::encode_cmd(&input, &output, &audio),
        Cmd::Decode { input, output } => audio_cli::decode_cmd(&input, &output),
        Cmd::Load(args) => load(*args).await,
        Cmd::Baseline(args) => baseline(*args).await,
        Cmd::Sink { listen, cert, key } => {
            let ep = client_sim::load::baseline::sink(listen, &cert, &key)?;
            eprintln!("sink listening on {}", ep.local_addr()?);
            client_sim_signal().await;
            ep.close(0u32.into(), b"bye");
            Ok(())
        }
    }
}

async fn client_sim_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

fn workload(
    scenario: &Option<PathBuf>,
    flags: client_sim::load::WorkloadArgs,
) -> anyhow::Result<client_sim::load::Workload> {
    let mut w = match scenario {
        Some(p) => client_sim::load::Workload::from_file(p)?,
        None => client_sim::load::Workload::default(),
    };
    flags.apply(&mut w);
    w.validate()?;
    Ok(w)
}

fn clip_source(opus: &Option<PathBuf>) -> anyhow::Result<client_sim::load::Source> {
    use client_sim::load::Source;
    match opus {
        Some(p) => Source::from_ogg(
            OggOpus::read_file(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => Source::builtin(),
    }
}

async fn baseline(a: BaselineArgs) -> anyhow::Result<()> {
    let w = workload(&a.run.scenario, a.run.workload)?;
    let source = clip_source(&a.run.opus)?;
    let (_sink, addr, name) = match (&a.sink, &a.key) {
        (Some(s), _) => {
            let (addr, name) = net::resolve(s).await?;
            (None, addr, name)
        }
        (None, Some(key)) => {
            let ep = client_sim::load::baseline::sink("127.0.0.1:0".parse()?, &a.cert, key)?;
            let addr = ep.local_addr()?;
            (Some(ep), addr, "localhost".to_owned())
        }
        (None, None) => bail!("give --sink HOST:PORT, or --key to start a sink here"),
    };
    let r = client_sim::load::baseline::run(addr, &name, &a.cert, &w, &source).await?;
    print!("{}", r.table());
    if let Some(p) = &a.run.report_json {
        audio_cli::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    use client_sim::load::{self, LoadTarget};
    let w = workload(&a.run.scenario, a.run.workload)?;
    let key = codec::token::TokenKey::from_file(&a.secret, Duration::ZERO)
        .with_context(|| format!("reading the token secret {}", a.secret.display()))?;
    let mut relays = Vec::new();
    let mut server_name = String::new();
    for r in a.relay.split(',') {
        let (addr, name) = net::resolve(r.trim()).await?;
        if server_name.is_empty() {
            server_name = name;
        }
        relays.push(addr);
    }
    let source = clip_source(&a.run.opus)?;
    let target = LoadTarget {
        relays,
        server_name,
        ca: a.ca.clone(),
        key,
        relay_pid: a.relay_pid,
    };
    let report = load::run(target, w, source).await?;
    print!("{}", report.table());
    if let Some(p) = &a.run.report_json {
        audio_cli::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if let Some(p) = &a.report_html {
        audio_cli::write_atomic(p, report.html()?.as_bytes())?;
    }
    if report.failed() {
        bail!(
            "verification failed: {} lost, {} duplicated, {} corrupted",
            report.counts.lost,
            report.counts.duplicated,
            report.counts.corrupted
        );
    }
    Ok(())
}

/// The relays of `--relay`, as connections go to them.
struct Relay {
    endpoint: quinn::Endpoint,
    /// Each relay's address and certificate name.
    addrs: std::collections::HashMap<String, (std::net::SocketAddr, String)>,
    token: String,
}

/// The shared retry rule (`codec::retry`) as `send` and `listen` follow
/// it: 200 ms doubling to 6.4 s, never sooner than the relay's hint.
const RETRY: codec::retry::Backoff = codec::retry::Backoff {
    min: Duration::from_millis(200),
    max: Duration::from_millis(6400),
};

async fn prepare(c: &Conn) -> anyhow::Result<(Relay, Relays)> {
    let list: Vec<String> = c
        .relay
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    let Some(home) = list.first() else {
        bail!("--relay names no relay");
    };
    let mut addrs = std::collections::HashMap::new();
    for r in &list {
        addrs.insert(r.clone(), net::resolve(r).await?);
    }
    let transport = net::Transport {
        keep_alive: c.keep_alive,
        ..net::Transport::default()
    };
    let endpoint = net::endpoint_with(addrs[home].0, &c.ca, &transport)?;
    let relay = Relay {
        endpoint,
        addrs,
        token: c.token.clone(),
    };
    Ok((relay, Relays::new(list, RETRY, c.failover_after)))
}

impl Relay {
    /// Closes every connection and lets the last packets (acks) leave.
    async fn finish(&self) {
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Connects to `relay`, given up after `limit` without an answer (the
    /// failover rule's, with another relay to try).
    async fn connect(
        &self,
        relay: &str,
        limit: Option<Duration>,
    ) -> Result<Connected, ClientError> {
        let Some((addr, name)) = self.addrs.get(relay) else {
            return Err(ClientError::Connect(format!("{relay}: not in --relay")));
        };
        let c = Client::connect(
            &self.endpoint,
            *addr,
            name,
            &self.token,
            ClientOptions::default(),
        );
        let Some(limit) = limit else {
            return c.await;
        };
        tokio::time::timeout(limit, c).await.unwrap_or_else(|_| {
            Err(ClientError::Connect(format!(
                "{relay}: no answer within {limit:?}"
            )))
        })
    }

    /// Connects to the first of `relays` that answers (one try each): for
    /// one request, where moving home later does not matter.
    async fn connect_any(&self, relays: &Relays) -> Result<Connected, ClientError> {
        let mut last = ClientError::Connect("--relay names no relay".into());
        for r in relays.relays() {
            match self.connect(r, relays.attempt_limit()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Watches `client`'s relay while it serves: see
    /// `ptt_client::failover::watch`. `may_leave`: whether going home now
    /// would cut nothing.
    async fn watch(
        &self,
        client: &Client,
        relays: &mut Relays,
        may_leave: impl Fn() -> bool,
    ) -> Watched {
        let limit = relays.attempt_limit();
        failover::watch(client.connection(), relays, may_leave, |home| async move {
            self.connect(&home, limit).await.ok()
        })
        .await
    }
}

async fn send(
    conn: Conn,
    to: Target,
    file: &OggOpus,
    live: bool,
    clip_id: Option<String>,
    retries: u32,
) -> anyhow::Result<()> {
    let mut clip = OutgoingClip::from_ogg(file, to);
    if let Some(hex) = clip_id {
        clip.id = ClipId::from_hex(&hex).context("--clip-id must be 32 hex digits")?;
    }
    let pacing = if live { Pacing::Live } else { Pacing::Upload };
    let (t, mut relays) = prepare(&conn).await?;
    let mut attempt = 0;
    loop {
        let result = match t.connect(relays.current(), relays.attempt_limit()).await {
            Ok((client, _events)) => {
                relays.connected(Instant::now().into_std(), rand::random());
                // A relay that goes silent mid-clip is left for the next
                // (the clip goes again there, with the same id).
                let r = tokio::select! {
                    r = client.send_clip(&clip, pacing) => r,
                    _ = t.watch(&client, &mut relays, || false) => {
                        Err(failover::silent())
                    }
                };
                client.shutdown().await;
                r
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                println!("{}", outcome.id);
                if outcome.duplicate {
                    eprintln!("(the relay already had this clip; delivered once)");
                }
                t.finish().await;
                return Ok(());
            }
            Err(e) if e.is_retryable() && attempt < retries => {
                attempt += 1;
                let wait = relays.lost_by(&e, rand::random()).wait;
                eprintln!(
                    "warning: {e}; retrying clip {} at {} in {wait:?} ({attempt}/{retries})",
                    clip.id,
                    relays.current()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => bail!("clip {} not sent: {e}", clip.id),
        }
    }
}

/// One day of `client-sim usage --json`.
#[derive(serde::Serialize)]
struct UsageDay {
    date: String,
    bytes_up: u64,
    bytes_down: u64,
}

/// `client-sim usage --json`.
#[derive(serde::Serialize)]
struct UsageReport {
    user: String,
    today: String,
    days: Vec<UsageDay>,
    bytes_up: u64,
    bytes_down: u64,
}

async fn push_register(
    conn: Conn,
    r: codec::wire::PushRegister,
    remove: bool,
) -> anyhow::Result<()> {
    if !remove && r.token.is_empty() {
        bail!("--push-token is needed to register (or --remove)");
    }
    let (t, relays) = prepare(&conn).await?;
    let (client, _events) = t
        .connect_any(&relays)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = r.device_id.clone();
    let answer = if remove {
        client.unregister_push(&device).await
    } else {
        client.register_push(r).await
    };
    client.close();
    t.finish().await;
    let a = answer.map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.code != codec::ErrorCode::NoError {
        bail!("device {device} not registered: {}: {}", a.code, a.reason);
    }
    println!(
        "device {device} {} ({} device(s) registered for {}): {}",
        if remove { "removed" } else { "registered" },
        a.devices,
        client.user(),
        a.reason
    );
    Ok(())
}

async fn usage(conn: Conn, days: u64, json: bool) -> anyhow::Result<()> {
    let (t, relays) = prepare(&conn).await?;
    let (client, _events) = t
        .connect_any(&relays)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let u = client.usage(days).await;
    client.close();
    t.finish().await;
    let u = u.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (bytes_up, bytes_down) = u.totals();
    let r = UsageReport {
        user: client.user().to_owned(),
        today: codec::wire::date(u.today),
        bytes_up,
        bytes_down,
        days: u
            .days
            .iter()
            .map(|d| UsageDay {
                date: codec::wire::date(d.day),
                bytes_up: d.bytes_up,
                bytes_down: d.bytes_down,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "data use of {} as the relay counted it (UDP payload bytes)",
        r.user
    );
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "date (UTC)", "up", "down", "total"
    );
    for d in &r.days {
        println!(
            "{:<12} {:>14} {:>14} {:>14}",
            d.date,
            d.bytes_up,
            d.bytes_down,
            d.bytes_up + d.bytes_down
        );
    }
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "total",
        r.bytes_up,
        r.bytes_down,
        r.bytes_up + r.bytes_down
    );
    Ok(())
}

async fn listen(
    conn: Conn,
    out: &Path,
    wav: bool,
    count: Option<u64>,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let timeout = timeout.or(count.map(|_| Duration::from_secs(30)));
    let deadline = timeout.map(|t| Instant::now() + t);
    let (t, mut relays) = prepare(&conn).await?;
    let mut got = 0u64;
    let done = |got: u64| count.is_some_and(|n| got >= n);
    let result: anyhow::Result<()> = async {
        // A connection home made while another relay served.
        let mut home: Option<Connected> = None;
        while !done(got) {
            let (client, mut events) = match home.take() {
                Some(c) => c,
                None => match t.connect(relays.current(), relays.attempt_limit()).await {
                    Ok(x) => x,
                    Err(e) if e.is_retryable() => {
                        move_on(&mut relays, &e).await;
                        continue;
                    }
                    Err(e) => bail!("{e}"),
                },
            };
            relays.connected(Instant::now().into_std(), rand::random());
            eprintln!(
                "listening as {} (session {}) at {}",
                client.user(),
                client.session_id(),
                relays.current()
            );
            let mut silent = false;
            {
                let watch = t.watch(&client, &mut relays, || true);
                tokio::pin!(watch);
                while !done(got) {
                    let ev = tokio::select! {
                        ev = events.recv() => match ev {
                            Some(ev) => ev,
                            None => break,
                        },
                        w = &mut watch => {
                            match w {
                                Watched::Silent => silent = true,
                                Watched::Home(c) => home = Some(c),
                            }
                            break;
                        }
                    };
                    got += heard(&client, ev, out, wav).await?;
                }
            }
            if done(got) || home.is_some() {
                client.shutdown().await;
                if home.is_some() {
                    relays.home_answered(Instant::now().into_std(), rand::random());
                }
                continue;
            }
            let why = if silent {
                client.close();
                failover::silent()
            } else {
                client.closed().await
            };
            if !why.is_retryable() {
                bail!("{why}");
            }
            move_on(&mut relays, &why).await;
        }
        Ok(())
    }
    .await_until(deadline)
    .await
    .unwrap_or_else(|| match count {
        Some(n) => Err(anyhow::anyhow!(
            "timed out after {:?} with {got} of {n} clips",
            timeout.unwrap_or_default()
        )),
        None => Ok(()),
    });
    t.finish().await;
    result
}

/// After `e`, waits as the failover rule says before the next relay.
async fn move_on(relays: &mut Relays, e: &ClientError) {
    let next = relays.lost_by(e, rand::random());
    eprintln!(
        "warning: {e}; trying {} in {:?}",
        relays.current(),
        next.wait
    );
    tokio::time::sleep(next.wait).await;
}

/// One event of `listen`: a whole clip written (once; acked once it is on
/// disk), a cut or an expiry said. Returns the clips newly written.
async fn heard(client: &Client, ev: Event, out: &Path, wav: bool) -> anyhow::Result<u64> {
    let mut got = 0;
    match ev {
        Event::Complete(clip) => {
            let id = clip.id();
            let path = out.join(format!("{id}.opus"));
            if !path.exists() {
                let ogg = clip.to_ogg();
                if wav {
                    let wav_path = out.join(format!("{id}.wav"));
                    if let Err(e) = audio_cli::write_clip_wav(&wav_path, &ogg) {
                        eprintln!("warning: clip {id}: no WAV: {e:#}");
                    }
                }
                audio_cli::write_atomic(&path, &ogg.to_vec(rand::random()))?;
                got += 1;
                let via = via(&clip.delivery.target);
                println!(
                    "{id} from {}{via} {:.2}s {} packets {} -> {}",
                    clip.delivery.sender,
                    ogg.duration_ms() as f64 / 1000.0,
                    clip.packets.len(),
                    if clip.delivery.live { "live" } else { "stored" },
                    path.display()
                );
            }
            // Acked only once the file is on disk.
            let _ = client.ack(id).await;
        }
        Event::Cut { id, code } => eprintln!("clip {id} cut off ({code})"),
        Event::Expired(x) => {
            let via = via(&x.target);
            let also = match x.also {
                0 => String::new(),
                n => format!(" (and {n} older)"),
            };
            eprintln!(
                "clip {} from {}{via} sent {} expired before it was heard{also}",
                x.clip_id,
                x.sender,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(x.created_ms)
                )
            );
            let _ = client.ack(x.clip_id).await;
        }
        _ => {}
    }
    Ok(got)
}

/// ` in #channel` for a channel's clip, nothing for a direct one.
fn via(t: &Target) -> String {
    match t {
        Target::Channel(c) => format!(" in #{c}"),
        Target::User(_) => String::new(),
    }
}

/// Runs a future until an optional deadline.
trait AwaitUntil: std::future::Future + Sized {
    async fn await_until(self, deadline: Option<Instant>) -> Option<Self::Output> {
        match deadline {
            Some(d) => tokio::time::timeout_at(d, self).await.ok(),
            None => Some(self.await),
        }
    }
}

impl<F: std::future::Future> AwaitUntil for F {}
