//! The mTLS front door: our own rustls `ServerConfig` (aws-lc-rs, TLS 1.2 and 1.3 only, client
//! certificate mandatory and verified against the configured CA, optional CRLs), an accept loop
//! with a handshake timeout that takes the config in force from a `watch` channel (fed by
//! `app::reload` on file change and SIGHUP), the caller identity taken once per connection from
//! the client certificate (typed: `spiffe://…`, `dns:<name>`, `cn:<CN>` only when
//! `tls.allow_cn_identity`), the chain kept so that each call re-checks it against the CRLs in
//! force ([`Peer::recheck`]). piiguard's own client commands connect through the
//! `piiguard-client` crate (`client/`).
//!
//! **Architecture Invariant:** there is no code path that builds a server config without a
//! client-certificate verifier; a connection without a verified client certificate never
//! reaches a gRPC handler.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::Connected;

use crate::config::TlsFiles;
use crate::domain::identity::{Identity, IdentityError, IdentityKind};

/// The crypto provider of the whole process. Installed as the process default at start so
/// that no dependency can silently pick another one.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Why TLS files cannot be used. Every variant names the file it is about; none carries key
/// material (PEM errors name a line kind or a base64 position, never the bytes of a key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file cannot be read or parsed.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The private key file cannot be read or holds no private key.
    #[error("{}: cannot read private key: {source}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong reading it.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A file holds no PEM item of the expected kind.
    #[error("{}: no PEM {what} found", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// `certificate` or `CRL`.
        what: &'static str,
    },
    /// rustls refused what a file holds (a CA it cannot use, a certificate that does not go
    /// with the key, ...).
    #[error("{}: {source}", path.display())]
    Refused {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// A CRL file holds a list whose `nextUpdate` has passed: revocations since then are
    /// unknown, so it is refused (a fresh CRL must be installed).
    #[error("{}: CRL expired at {next_update} (nextUpdate has passed; install a fresh CRL)", path.display())]
    CrlExpired {
        /// The CRL file.
        path: PathBuf,
        /// Its `nextUpdate`, RFC 3339.
        next_update: String,
    },
    /// A CRL cannot be parsed.
    #[error("{}: not a valid CRL: {problem}", path.display())]
    CrlInvalid {
        /// The CRL file.
        path: PathBuf,
        /// What the parser said.
        problem: String,
    },
    /// The client-certificate verifier cannot be built from the client CA and CRLs.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The protocol versions are not supported by the provider (a build problem).
    #[error("TLS versions: {0}")]
    Versions(#[source] rustls::Error),
}

/// The authenticated caller of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The canonical identity (`spiffe://…`, `dns:<name>`, `cn:<CN>`; see
    /// [`crate::domain::identity`]): what the policy, limits, audit and logs name.
    pub identity: Arc<str>,
    /// Which part of the certificate named it.
    pub kind: IdentityKind,
}

/// Per-connection information that tonic puts into every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Who is calling (from the verified client certificate).
    pub caller: Caller,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Metric handles of this connection's calls.
    pub metrics: Arc<crate::metrics::ConnMetrics>,
    /// The client certificate chain, re-checked against the TLS config in force
    /// ([`Peer::recheck`]) so that a reloaded CRL applies to open connections.
    pub peer: Arc<Peer>,
}

/// The TLS configuration in force: the rustls server config of new handshakes and the
/// client-certificate verifier it was built with (which open connections are re-checked
/// against). Published by the reloader (`app::reload`) in a `watch` channel.
pub struct ServerTls {
    /// The rustls server config of new handshakes.
    pub config: Arc<rustls::ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    /// Distinct for every config built in this process (a reload makes a new one).
    generation: u64,
    allow_cn_identity: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("generation", &self.generation)
            .field("allow_cn_identity", &self.allow_cn_identity)
            .finish_non_exhaustive()
    }
}

/// How long a successful re-check of a connection's certificate is trusted while the TLS
/// config in force does not change (so that a certificate, or the CRL in force, that expires
/// during a connection is noticed).
pub const RECHECK_INTERVAL_SECS: u64 = 30;

/// A connection's client certificate chain and when it last verified.
pub struct Peer {
    chain: Vec<CertificateDer<'static>>,
    tls: watch::Receiver<Arc<ServerTls>>,
    /// Generation of the config the chain last verified against (0: none / refused).
    checked_generation: AtomicU64,
    /// Unix seconds of that check.
    checked_at: AtomicU64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The connection's client certificate no longer verifies against the TLS config in force.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the client certificate of this connection is no longer accepted ({0}); reconnect with a valid certificate"
)]
pub struct PeerRejected(#[source] rustls::Error);

impl Peer {
    /// A chain that has just verified in a handshake with `tls`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        tls: watch::Receiver<Arc<ServerTls>>,
        verified_with: &ServerTls,
    ) -> Self {
        Self {
            chain,
            tls,
            checked_generation: AtomicU64::new(verified_with.generation),
            checked_at: AtomicU64::new(UnixTime::now().as_secs()),
        }
    }

    /// Verifies the chain again against the client CA and CRLs in force, if they changed since
    /// the last check or that check is older than [`RECHECK_INTERVAL_SECS`]; otherwise two
    /// atomic loads. A revoked (or expired) certificate is refused from the first call after
    /// the reload that revoked it.
    pub fn recheck(&self) -> Result<(), PeerRejected> {
        let now = UnixTime::now();
        // A short read lock on the watch slot; never held across an await. The fast path (the
        // usual call) takes nothing out of it: no Arc clone per call.
        let (generation, verifier) = {
            let tls = self.tls.borrow();
            let checked = self.checked_generation.load(Ordering::Acquire);
            let at = self.checked_at.load(Ordering::Acquire);
            if checked == tls.generation && now.as_secs().saturating_sub(at) < RECHECK_INTERVAL_SECS
            {
                return Ok(());
            }
            (tls.generation, tls.verifier.clone())
        };
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(PeerRejected(rustls::Error::NoCertificatesPresented));
        };
        match verifier.verify_client_cert(leaf, intermediates, now) {
            Ok(_) => {
                self.checked_at.store(now.as_secs(), Ordering::Release);
                self.checked_generation.store(generation, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.checked_generation.store(0, Ordering::Release);
                Err(PeerRejected(e))
            }
        }
    }
}

/// Reads every PEM certificate of a file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<_, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Builds the server config from files: the certificate chain and key, client certificates
/// required and verified against the client CA (and CRLs, whose expiry is enforced: a CRL past
/// its `nextUpdate` is refused here, and one that expires while in force fails every check
/// that needs it), TLS 1.3 and 1.2, ALPN `h2`. Errors name the file and never contain key
/// material.
pub fn build_server_config(files: &TlsFiles) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Key {
        path: files.key.clone(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.client_ca)? {
        roots.add(ca).map_err(|source| TlsError::Refused {
            path: files.client_ca.clone(),
            source,
        })?;
    }
    let mut crls = Vec::new();
    for path in &files.crl {
        let pem = |source| TlsError::Pem {
            path: path.clone(),
            source,
        };
        let mut n = 0;
        for crl in CertificateRevocationListDer::pem_file_iter(path).map_err(pem)? {
            let crl = crl.map_err(pem)?;
            check_crl_current(path, &crl)?;
            crls.push(crl);
            n += 1;
        }
        if n == 0 {
            return Err(TlsError::Empty {
                path: path.clone(),
                what: "CRL",
            });
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .enforce_revocation_expiration()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Versions)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Refused {
            path: files.cert.clone(),
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    static GENERATION: AtomicU64 = AtomicU64::new(1);
    Ok(ServerTls {
        config: Arc::new(cfg),
        verifier,
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        allow_cn_identity: files.allow_cn_identity,
    })
}

/// Refuses a CRL whose `nextUpdate` has passed.
fn check_crl_current(path: &Path, crl: &CertificateRevocationListDer<'_>) -> Result<(), TlsError> {
    use x509_parser::prelude::FromDer as _;
    use x509_parser::revocation_list::CertificateRevocationList;
    let (_, parsed) =
        CertificateRevocationList::from_der(crl.as_ref()).map_err(|e| TlsError::CrlInvalid {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
    if let Some(next) = parsed.next_update()
        && next.timestamp() <= UnixTime::now().as_secs() as i64
    {
        return Err(TlsError::CrlExpired {
            path: path.to_path_buf(),
            next_update: crate::domain::time::rfc3339_secs(next.timestamp()),
        });
    }
    Ok(())
}

/// The files a server config is built from, in the order a reload names them.
pub fn files_of(files: &TlsFiles) -> Vec<PathBuf> {
    [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .chain(files.crl.iter())
        .cloned()
        .collect()
}

/// Why a verified client certificate names no identity piiguard accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoIdentity {
    /// The certificate cannot be parsed (it verified, so this should not happen).
    #[error("the client certificate cannot be parsed")]
    Unparseable,
    /// No SPIFFE URI or DNS SAN, and CN identities are off (`tls.allow_cn_identity`).
    #[error(
        "the client certificate has no SPIFFE URI SAN and no DNS SAN; a subject CN is not an identity unless tls.allow_cn_identity = true"
    )]
    CnNotAllowed,
    /// No SPIFFE URI SAN, no DNS SAN and no CN.
    #[error("the client certificate names no identity (no SPIFFE URI SAN, DNS SAN or CN)")]
    Nothing,
    /// The name it carries is not usable (empty, control characters).
    #[error("the client certificate's identity is not usable: {0}")]
    Invalid(#[from] IdentityError),
}

/// Extracts the caller identity from a DER client certificate: the first `spiffe://` URI
/// SAN, else the first DNS SAN (`dns:<name>`), else, only if `allow_cn`, the first subject CN
/// (`cn:<CN>`). The kinds never collide: a CN that reads like a SPIFFE ID stays a `cn:`.
pub fn identity_of(cert: &[u8], allow_cn: bool) -> Result<Identity, NoIdentity> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert).map_err(|_| NoIdentity::Unparseable)?;
    let mut dns = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) if u.starts_with(IdentityKind::Spiffe.prefix()) => {
                    return Ok(Identity::spiffe(u)?);
                }
                GeneralName::DNSName(d) if dns.is_none() => dns = Some(*d),
                _ => {}
            }
        }
    }
    if let Some(d) = dns {
        return Ok(Identity::dns(d)?);
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    match cn {
        Some(cn) if allow_cn => Ok(Identity::cn(cn)?),
        Some(_) => Err(NoIdentity::CnNotAllowed),
        None => Err(NoIdentity::Nothing),
    }
}

/// An accepted, authenticated TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, runs each TLS handshake in its own task with a timeout, and yields
/// the connections whose client certificate verified and named an identity.
///
/// Each handshake uses the server config current in `tls` when its connection was accepted
/// (a reload publishes a new one there); every call on an established connection re-checks its
/// client certificate against the config in force then ([`Peer::recheck`], from the guard).
pub fn incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerTls>>,
    handshake_timeout: Duration,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let _ = tcp.set_nodelay(true);
            // A short read lock on the watch slot; never held across an await.
            let current = tls.borrow().clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(current.config.clone());
            let tx = tx.clone();
            let watch = tls.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let chain: Vec<CertificateDer<'static>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let identity = match chain.first() {
                    Some(leaf) => identity_of(leaf, current.allow_cn_identity),
                    None => Err(NoIdentity::Nothing),
                };
                let identity = match identity {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!(%remote, reason = %e, "client certificate refused: no usable identity; connection closed");
                        return;
                    }
                };
                let info = ConnInfo {
                    caller: Caller {
                        identity: identity.as_str().into(),
                        kind: identity.kind(),
                    },
                    remote,
                    metrics: Arc::default(),
                    peer: Arc::new(Peer::new(chain, watch, &current)),
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: stream,
                        info,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::pki::{Ca, ClientName};
    use time::{Duration as Days, OffsetDateTime};

    struct Files {
        _dir: tempfile::TempDir,
        files: TlsFiles,
        crl: PathBuf,
    }

    fn files(ca: &Ca) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let server = ca.issue_server().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("s.pem"), &server.cert_pem).unwrap();
        std::fs::write(p("s.key"), server.key_pem.as_bytes()).unwrap();
        std::fs::write(p("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(p("crl.pem"), ca.crl(&[]).unwrap()).unwrap();
        Files {
            files: TlsFiles {
                cert: p("s.pem"),
                key: p("s.key"),
                client_ca: p("ca.pem"),
                crl: vec![p("crl.pem")],
                allow_cn_identity: false,
                max_connection_age: Duration::from_secs(3600),
                max_connection_age_grace: Duration::from_secs(300),
            },
            crl: p("crl.pem"),
            _dir: dir,
        }
    }

    #[test]
    fn a_crl_reload_revokes_an_open_connection_at_its_next_recheck() {
        let (ca, _) = Ca::generate().unwrap();
        let f = files(&ca);
        let first = Arc::new(build_server_config(&f.files).unwrap());
        let (tx, rx) = watch::channel(first.clone());
        let client = ca
            .issue_client_now(&ClientName::Spiffe("spiffe://shop/a".into()))
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
        let peer = Peer::new(chain, rx, &first);
        assert!(peer.recheck().is_ok());
        // The same files again (a reload that changed nothing relevant): still accepted.
        tx.send_replace(Arc::new(build_server_config(&f.files).unwrap()));
        assert!(peer.recheck().is_ok());
        // A CRL revoking the client: refused from the next check on, and stays refused.
        std::fs::write(
            &f.crl,
            ca.crl(std::slice::from_ref(&client.serial)).unwrap(),
        )
        .unwrap();
        tx.send_replace(Arc::new(build_server_config(&f.files).unwrap()));
        let e = peer.recheck().unwrap_err();
        assert!(e.to_string().contains("Revoked"), "{e}");
        assert!(peer.recheck().is_err());
    }

    #[test]
    fn an_expired_crl_is_refused_when_the_files_are_loaded() {
        let (ca, _) = Ca::generate().unwrap();
        let f = files(&ca);
        let now = OffsetDateTime::now_utc();
        std::fs::write(
            &f.crl,
            ca.crl_between(&[], now - Days::days(8), now - Days::days(1))
                .unwrap(),
        )
        .unwrap();
        match build_server_config(&f.files) {
            Err(TlsError::CrlExpired { path, .. }) => assert_eq!(path, f.crl),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
