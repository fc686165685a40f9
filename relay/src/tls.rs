//! Certificates and the token secret in the data dir, and the rustls
//! configuration of the QUIC endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::StartError;
use quic::lean_tls::LeanServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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

    /// Gives the data dir `to` (made if missing) this one's certificate,
    /// key and token secret: relays of one service share them (clients
    /// trust one certificate, a token is good at every relay).
    pub fn share_with(&self, to: &Path) -> std::io::Result<DataFiles> {
        std::fs::create_dir_all(to)?;
        let theirs = DataFiles::new(to);
        std::fs::copy(&self.cert, &theirs.cert)?;
        std::fs::copy(&self.key, &theirs.key)?;
        std::fs::copy(&self.secret, &theirs.secret)?;
        Ok(theirs)
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

/// Creates the data dir, a self-signed certificate (unless the operator
/// gave one: `operator` = certificate and key paths) and a random token
/// secret when they are missing. Existing files are never overwritten.
pub fn ensure_data_dir(
    dir: &Path,
    operator: Option<(&Path, &Path)>,
) -> Result<(DataFiles, Created), StartError> {
    std::fs::create_dir_all(dir).map_err(StartError::file("creating", dir))?;
    let mut files = DataFiles::new(dir);
    let mut created = Created::default();
    if let Some((cert, key)) = operator {
        files.cert = cert.to_path_buf();
        files.key = key.to_path_buf();
    } else if !files.cert.exists() && !files.key.exists() {
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
    hex(&bytes)
}

/// The endpoint's QUIC settings with the stateless-reset key read from the
/// data dir (HMAC-SHA256 over connection ids: the same key makes the same
/// reset tokens after a restart). The connection-id generator's key comes
/// from it too: quinn answers a packet for an unknown connection with a
/// reset only if its connection id carries this generator's checksum, so a
/// restarted relay must recognise the ids its previous run gave out.
pub fn endpoint_config(
    files: &DataFiles,
    cid_bytes: usize,
) -> Result<quinn::EndpointConfig, StartError> {
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
    cfg.cid_generator(move || Box::new(SignedCids::new(cid_key, cid_bytes)));
    Ok(cfg)
}

/// Connection ids of `len` bytes (4..=20): 3 random bytes (16 million ids,
/// far more than the connections a relay holds) then a keyed hash of them,
/// so the relay knows its own ids, also those of its previous run (it
/// answers a stateless reset only to those). Every packet from a client
/// carries one: 4 bytes instead of quinn's 8 spend 4 bytes less per
/// datagram, still enough to route a client that changes address.
struct SignedCids {
    key: u64,
    len: usize,
}

const CID_NONCE: usize = 3;
/// Longest connection id QUIC allows (RFC 9000 §17.2).
const MAX_CID: usize = 20;

impl SignedCids {
    fn new(key: u64, len: usize) -> Self {
        Self {
            key,
            len: len.clamp(CID_NONCE + 1, MAX_CID),
        }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; 8] {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.key.hash(&mut h);
        nonce.hash(&mut h);
        h.finish().to_le_bytes()
    }
}

impl quinn::ConnectionIdGenerator for SignedCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; MAX_CID];
        rand::Rng::fill(&mut rand::rng(), &mut id[..CID_NONCE]);
        let sig = self.signature(&id[..CID_NONCE]);
        for (i, b) in id[CID_NONCE..self.len].iter_mut().enumerate() {
            *b = sig[i % sig.len()];
        }
        quinn::ConnectionId::new(&id[..self.len])
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != self.len {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, sig) = cid.split_at(CID_NONCE);
        let want = self.signature(nonce);
        let ok = sig
            .iter()
            .enumerate()
            .all(|(i, b)| *b == want[i % want.len()]);
        if ok {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        self.len
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server config for QUIC, accepting 0-RTT with up to
/// `zero_rtt_tickets` single-use tickets (0: no 0-RTT). ALPN `ptt/1`, and
/// `h3` (WebTransport) too when `web` is given: browsers then get the
/// certificate `web` picks (see [`Certs`]). Each connection's TLS state is
/// dropped after its handshake, and its next key phase derived when used
/// ([`quic::lean_tls`]): ~5 KiB less per session.
pub fn server_crypto(
    files: &DataFiles,
    web: Option<WebCerts>,
    zero_rtt_tickets: usize,
) -> Result<LeanServerConfig, StartError> {
    let native = Arc::new(quic::certified_key(&files.cert, &files.key)?);
    let mut alpn = vec![codec::wire::ALPN.to_vec()];
    if web.is_some() {
        alpn.push(web_transport_quinn::ALPN.as_bytes().to_vec());
    }
    Ok(quic::lean_server_crypto_with(
        Arc::new(Certs { native, web }),
        alpn,
        zero_rtt_tickets,
    )?)
}

/// The certificate a handshake gets: ptt/1 clients the relay's
/// certificate (the operator's, or DATA_DIR/cert.pem that native clients
/// trust by file); browsers (ALPN `h3`) the one [`WebCerts`] holds.
#[derive(Debug)]
struct Certs {
    native: Arc<CertifiedKey>,
    web: Option<WebCerts>,
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h3 = hello
            .alpn()
            .is_some_and(|mut a| a.any(|p| p == web_transport_quinn::ALPN.as_bytes()));
        match &self.web {
            Some(WebCerts::Ephemeral(e)) if h3 => Some(e.current().key),
            _ => Some(self.native.clone()),
        }
    }
}

/// What browsers connecting over WebTransport are shown.
#[derive(Debug, Clone)]
pub enum WebCerts {
    /// The operator's certificate, as for every client: the page connects
    /// as to any HTTPS site.
    Operator,
    /// No operator certificate: a short-lived self-signed one the page
    /// pins by its hash (WebTransport's `serverCertificateHashes`).
    Ephemeral(Arc<EphemeralCert>),
}

/// Longest validity WebTransport's `serverCertificateHashes` accepts
/// (W3C WebTransport, "custom certificate requirements"): 14 days.
pub const WEB_CERT_LIFETIME: Duration = Duration::from_secs(13 * 24 * 3600);
/// A web certificate is replaced when this little of its life is left.
pub const WEB_CERT_RENEW_BEFORE: Duration = Duration::from_secs(3 * 24 * 3600);

/// One generated web certificate.
#[derive(Clone)]
pub struct WebCert {
    pub key: Arc<CertifiedKey>,
    /// SHA-256 of the certificate (DER): what the page pins.
    pub sha256: [u8; 32],
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WebCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCert")
            .field("sha256", &hex(&self.sha256))
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The current short-lived web certificate: ECDSA P-256, valid
/// [`WEB_CERT_LIFETIME`] (from an hour before it was made, for clocks a
/// little behind), for the self-signed names; replaced by
/// [`EphemeralCert::renew_if_due`].
#[derive(Debug)]
pub struct EphemeralCert {
    current: std::sync::RwLock<WebCert>,
}

impl EphemeralCert {
    pub fn new() -> Result<Self, StartError> {
        Ok(Self {
            current: std::sync::RwLock::new(make_web_cert(SystemTime::now())?),
        })
    }

    pub fn current(&self) -> WebCert {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes a new certificate when the current one has less than
    /// [`WEB_CERT_RENEW_BEFORE`] left at `now`; whether it did.
    pub fn renew_if_due(&self, now: SystemTime) -> Result<bool, StartError> {
        let due = self
            .current()
            .not_after
            .duration_since(now)
            .map_or(true, |left| left < WEB_CERT_RENEW_BEFORE);
        if due {
            let next = make_web_cert(now)?;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        }
        Ok(due)
    }
}

fn make_web_cert(now: SystemTime) -> Result<WebCert, StartError> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names)?;
    let start = now - Duration::from_secs(3600);
    let not_after = start + WEB_CERT_LIFETIME;
    params.not_before = time::OffsetDateTime::from(start);
    params.not_after = time::OffsetDateTime::from(not_after);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let der = cert.der().clone();
    let sha = ring::digest::digest(&ring::digest::SHA256, &der);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(sha.as_ref());
    let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| StartError::Config(format!("web certificate key: {e}")))?;
    let key = CertifiedKey::from_der(vec![der], private, &crypto_provider())
        .map_err(|e| StartError::Config(format!("web certificate: {e}")))?;
    Ok(WebCert {
        key: Arc::new(key),
        sha256,
        // Whole seconds, as the certificate holds it.
        not_after,
    })
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod web_cert_tests {
    use super::*;

    #[test]
    fn a_web_certificate_is_p256_short_lived_and_renewed_near_its_end() {
        let now = SystemTime::now();
        let certs = EphemeralCert::new().unwrap();
        let first = certs.current();
        let der = &first.key.cert[0];
        let life = first.not_after.duration_since(now).unwrap();
        assert!(life <= Duration::from_secs(14 * 24 * 3600) && life > WEB_CERT_RENEW_BEFORE);
        // ECDSA with SHA-256 (1.2.840.10045.4.3.2) over P-256 (1.2.840.10045.3.1.7).
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        assert!(has(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]));
        assert!(has(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]));
        let sha = ring::digest::digest(&ring::digest::SHA256, der);
        assert_eq!(sha.as_ref(), &first.sha256);
        assert!(!certs.renew_if_due(now).unwrap());
        assert_eq!(certs.current().sha256, first.sha256);
        let late = first.not_after - WEB_CERT_RENEW_BEFORE + Duration::from_secs(1);
        assert!(certs.renew_if_due(late).unwrap());
        let second = certs.current();
        assert_ne!(second.sha256, first.sha256);
        assert!(second.not_after > first.not_after);
    }
}

#[cfg(test)]
mod cid_tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    #[test]
    fn ids_have_their_length_and_are_known_across_runs() {
        for len in [4, 5, 8, 20] {
            let mut g = SignedCids::new(42, len);
            let id = g.generate_cid();
            assert_eq!(id.len(), len);
            // A restarted relay (same key) knows it; another key does not
            // (up to the chance of a 1-byte signature matching).
            assert!(SignedCids::new(42, len).validate(&id).is_ok());
            let other = SignedCids::new(43, len);
            let foreign = (0..64)
                .filter(|_| other.validate(&g.generate_cid()).is_ok())
                .count();
            assert!(foreign < 8, "{len}: {foreign} of 64 foreign ids pass");
        }
        // Too short to hold a signature: clamped.
        assert_eq!(SignedCids::new(1, 2).cid_len(), 4);
    }
}
