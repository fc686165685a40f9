//! Why the relay could not start. Each variant says what to fix; the
//! binary prints it and exits non-zero.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum StartError {
    /// A setting is out of its range, or settings contradict each other:
    /// fix the configuration (flag, `PTT_*` variable or TOML key).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file (the configuration, a key, the token secret, the token keys)
    /// could not be read or written: check the path and its permissions.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is wrong: fix or replace it.
    #[error("{}: {why}", path.display())]
    BadFile { path: PathBuf, why: String },
    /// The self-signed development certificate could not be made.
    #[error("generating the self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The certificate and key cannot be used for TLS: replace them.
    #[error("TLS certificate or key: {0}")]
    Tls(#[from] quic::TlsError),
    /// A listener could not bind its address (in use, or not allowed).
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The clip store could not be opened (its directory, or recovery).
    #[error("opening the clip store: {0}")]
    Store(#[from] StoreError),
    /// The cluster's NATS could not be joined.
    #[error("joining the cluster: {0}")]
    Cluster(#[from] ClusterError),
}

impl StartError {
    /// A file operation `what` on `path` failed.
    pub fn file(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StartError::File { what, path, source }
    }
}

/// A boxed source error (NATS's errors come in many types).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a cluster operation failed. None of them stops the relay: it serves
/// on its own and the cluster work is redone when the link is back.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A `cluster` URL does not parse: fix the setting.
    #[error("cluster URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: BoxError,
    },
    /// Cut off from NATS right now: the caller goes on alone (this relay
    /// keeps the clip; the floor is decided here).
    #[error("not connected to NATS")]
    NotConnected,
    /// NATS or JetStream failed a request (`what`): retried later.
    #[error("{what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: BoxError,
    },
    /// Other relays changed the channel's floor at the same moment on every
    /// try: the relay decides alone this time.
    #[error("floor of {0} contended")]
    Contended(String),
    /// This region's JetStream has the clip, but fewer other regions than
    /// `replicas_in_other_regions` took a copy (they are unreachable): the
    /// clip is held and copied again when they answer.
    #[error("a copy in {reached} other region(s) of the {wanted} wanted")]
    TooFewRegions { wanted: usize, reached: usize },
}
