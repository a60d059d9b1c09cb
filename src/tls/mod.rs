//! The mTLS front door: our own rustls `ServerConfig` (aws-lc-rs, TLS 1.2 and 1.3 only, client
//! certificate mandatory and verified against the configured CA, optional CRLs), an accept loop
//! with a handshake timeout that takes the config in force from a `watch` channel (fed by
//! `app::reload` on file change and SIGHUP), the caller identity taken once per connection from
//! the client certificate, and [`client`], the one mTLS client of piiguard's own commands.
//!
//! **Architecture Invariant:** there is no code path that builds a server config without a
//! client-certificate verifier; a connection without a verified client certificate never
//! reaches a gRPC handler.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::Connected;

use crate::config::TlsFiles;

pub mod client;

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
    /// SPIFFE URI SAN, else DNS SAN, else subject CN.
    pub identity: Arc<str>,
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
/// required and verified against the client CA (and CRLs), TLS 1.3 and 1.2, ALPN `h2`.
/// Errors name the file and never contain key material.
pub fn build_server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
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
            crls.push(crl.map_err(pem)?);
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
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Refused {
            path: files.cert.clone(),
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The files a server config is built from, in the order a reload names them.
pub fn files_of(files: &TlsFiles) -> Vec<PathBuf> {
    [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .chain(files.crl.iter())
        .cloned()
        .collect()
}

/// Extracts the caller identity from a DER client certificate.
pub fn identity_of(cert: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let mut dns = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) if u.starts_with("spiffe://") => return Some(u.to_string()),
                GeneralName::DNSName(d) if dns.is_none() => dns = Some(d.to_string()),
                _ => {}
            }
        }
    }
    if dns.is_some() {
        return dns;
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
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
/// (a reload publishes a new one there); established connections keep theirs.
pub fn incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
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
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
            let tx = tx.clone();
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
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| identity_of(c));
                let Some(identity) = identity else {
                    tracing::info!(%remote, "client certificate names no identity (no URI/DNS SAN, no CN); connection closed");
                    return;
                };
                let info = ConnInfo {
                    caller: Caller {
                        identity: identity.into(),
                    },
                    remote,
                    metrics: Arc::default(),
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
