//! Certificates and the token secret in the data dir, and the rustls
//! configuration of the QUIC endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::StartError;
use quinn::crypto::rustls::QuicServerConfig;

/// Names the generated certificate is valid for.
pub const SELF_SIGNED_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Files the relay keeps in its data dir.
#[derive(Debug, Clone)]
pub struct DataFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: PathBuf,
    /// The QUIC stateless-reset key (32 random bytes, hex): kept across
    /// restarts so a restarted relay resets its old connections at their
    /// first packet and their clients reconnect at once.
    pub reset_key: PathBuf,
}

impl DataFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            secret: dir.join("token.secret"),
            reset_key: dir.join("reset.key"),
        }
    }
}

/// What [`ensure_data_dir`] created on this start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Created {
    pub cert: bool,
    pub secret: bool,
}

/// Writes a new file readable by its owner only (it must not exist).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Creates the data dir, a self-signed certificate and a random token
/// secret when they are missing. Existing files are never overwritten.
pub fn ensure_data_dir(dir: &Path) -> Result<(DataFiles, Created), StartError> {
    std::fs::create_dir_all(dir).map_err(StartError::file("creating", dir))?;
    let files = DataFiles::new(dir);
    let mut created = Created::default();
    if !files.cert.exists() && !files.key.exists() {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names)?;
        write_private(&files.key, ck.signing_key.serialize_pem().as_bytes())
            .map_err(StartError::file("writing", &files.key))?;
        std::fs::write(&files.cert, ck.cert.pem())
            .map_err(StartError::file("writing", &files.cert))?;
        created.cert = true;
    }
    if !files.secret.exists() {
        write_private(&files.secret, format!("{}\n", random_hex()).as_bytes())
            .map_err(StartError::file("writing", &files.secret))?;
        created.secret = true;
    }
    if !files.reset_key.exists() {
        write_private(&files.reset_key, format!("{}\n", random_hex()).as_bytes())
            .map_err(StartError::file("writing", &files.reset_key))?;
    }
    Ok((files, created))
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The endpoint's QUIC settings with the stateless-reset key read from the
/// data dir (HMAC-SHA256 over connection ids: the same key makes the same
/// reset tokens after a restart). The connection-id generator's key comes
/// from it too: quinn answers a packet for an unknown connection with a
/// reset only if its connection id carries this generator's checksum, so a
/// restarted relay must recognise the ids its previous run gave out.
pub fn endpoint_config(files: &DataFiles) -> Result<quinn::EndpointConfig, StartError> {
    let path = &files.reset_key;
    let text = std::fs::read_to_string(path).map_err(StartError::file("reading", path))?;
    let text = text.trim();
    let key: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<_>>()
        .filter(|k: &Vec<u8>| k.len() >= 32)
        .ok_or_else(|| StartError::BadFile {
            path: path.clone(),
            why: "expected at least 64 hex characters".into(),
        })?;
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let tag = ring::hmac::sign(&reset, b"ptt-relay connection id generator");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(cfg)
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server config for QUIC with our ALPN, accepting 0-RTT with up
/// to `zero_rtt_tickets` single-use tickets (0: no 0-RTT).
pub fn server_crypto(
    files: &DataFiles,
    zero_rtt_tickets: usize,
) -> Result<QuicServerConfig, StartError> {
    Ok(quic::server_crypto(
        &files.cert,
        &files.key,
        zero_rtt_tickets,
    )?)
}
