//! The mTLS front door: our own rustls `ServerConfig` (aws-lc-rs, TLS 1.2 and 1.3 only, client
//! certificate mandatory and verified against the configured CA, optional CRLs), an accept loop
//! with a handshake timeout, hot reload of certificate/key/CA/CRL, and the caller identity taken
//! once per connection from the client certificate.
//!
//! **Architecture Invariant:** there is no code path that builds a server config without a
//! client-certificate verifier; a connection without a verified client certificate never
//! reaches a gRPC handler.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;

use crate::config::TlsFiles;

/// The crypto provider of the whole process. Installed as the process default at start so
/// that no dependency can silently pick another one.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
    pub caller: Caller,
    pub remote: SocketAddr,
    /// Metric handles of this connection's calls.
    pub metrics: Arc<crate::metrics::ConnMetrics>,
}

/// Reads every PEM certificate of a file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// Builds the server config from files. Errors name the file and never contain key material.
pub fn build_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: cannot read private key: {e}", files.key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", files.client_ca.display()))?;
    }
    let mut crls = Vec::new();
    for path in &files.crl {
        let mut n = 0;
        for crl in CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            crls.push(crl.map_err(|e| format!("{}: {e}", path.display()))?);
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: no PEM CRL found", path.display()));
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
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

/// The current server config, swapped atomically on reload.
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

impl TlsState {
    /// Loads the files; fails if any is unusable.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let cfg = build_server_config(&files)?;
        let stamp = file_stamps(&files);
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(cfg),
            stamp: RwLock::new(stamp),
        }))
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Rebuilds the config from the files. A broken new set keeps the old config.
    pub fn reload(&self) -> Result<(), String> {
        let cfg = build_server_config(&self.files)?;
        let stamp = file_stamps(&self.files);
        match self.current.write() {
            Ok(mut g) => *g = cfg,
            Err(p) => *p.into_inner() = cfg,
        }
        if let Ok(mut s) = self.stamp.write() {
            *s = stamp;
        }
        Ok(())
    }

    /// Reloads if any file's modification time changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let now = file_stamps(&self.files);
        let changed = self.stamp.read().map(|s| *s != now).unwrap_or(true);
        changed.then(|| self.reload())
    }

    /// Reloads on SIGHUP and, if `interval` is set, when a file changes.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Option<Duration>) {
        let state = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = interval.map(tokio::time::interval);
            loop {
                let forced = tokio::select! {
                    _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
                    _ = async { match tick.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => false,
                };
                let result = if forced {
                    Some(state.reload())
                } else {
                    state.reload_if_changed()
                };
                match result {
                    Some(Ok(())) => {
                        tracing::info!("TLS certificate, key, client CA and CRLs reloaded")
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the previous configuration")
                    }
                    None => {}
                }
            }
        });
    }
}

fn file_stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    std::iter::once(&files.cert)
        .chain([&files.key, &files.client_ca])
        .chain(files.crl.iter())
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
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
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsState>,
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
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
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
