//! Certificates and the token secret in the data dir, and the rustls
//! configuration of the QUIC endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use quinn::crypto::rustls::QuicServerConfig;

/// Names the generated certificate is valid for.
pub const SELF_SIGNED_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Files the relay keeps in its data dir.
#[derive(Debug, Clone)]
pub struct DataFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: PathBuf,
}

impl DataFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            secret: dir.join("token.secret"),
        }
    }
}

/// What [`ensure_data_dir`] created on this start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Created {
    pub cert: bool,
    pub secret: bool,
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
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
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<(DataFiles, Created)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = DataFiles::new(dir);
    let mut created = Created::default();
    if !files.cert.exists() && !files.key.exists() {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).context("generating certificate")?;
        write_private(&files.key, ck.signing_key.serialize_pem().as_bytes())
            .with_context(|| format!("writing {}", files.key.display()))?;
        std::fs::write(&files.cert, ck.cert.pem())
            .with_context(|| format!("writing {}", files.cert.display()))?;
        created.cert = true;
    }
    if !files.secret.exists() {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&files.secret, format!("{hex}\n").as_bytes())
            .with_context(|| format!("writing {}", files.secret.display()))?;
        created.secret = true;
    }
    Ok((files, created))
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server config for QUIC with our ALPN.
pub fn server_crypto(files: &DataFiles) -> anyhow::Result<QuicServerConfig> {
    Ok(quic::server_crypto(&files.cert, &files.key)?)
}
