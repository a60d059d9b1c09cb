//! The one mutual-TLS client of piiguard's own commands (`shred`, `admin`, and any later one):
//! a tonic [`Channel`] to a piiguard server, built from CA, client certificate and key files.
//!
//! The key file is read into a [`Zeroizing`] buffer that is wiped once tonic has taken its
//! copy; neither its path's content nor any part of it ever appears in an error or a log.
//! Errors name the file or the endpoint and, for the usual handshake failures (wrong CA, wrong
//! server name, a client certificate the server refuses), say what to check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

/// How to reach a piiguard server over mutual TLS, and who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// `host:port` or `https://host:port`.
    pub endpoint: String,
    /// CA that issued the server certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM), the identity the server authorises.
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
    /// Name the server certificate must carry.
    pub server_name: String,
    /// Limit on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Limit on each call until its response starts (a stream's messages are not cut).
    pub request_timeout: Duration,
}

/// Why a client connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A CA, certificate or key file cannot be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// `CA certificate`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint is not a usable URI.
    #[error("invalid endpoint {endpoint:?}: {detail}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// The parser's reason.
        detail: String,
    },
    /// The CA, certificate or key cannot be used for TLS (not PEM, no key, ...).
    #[error("TLS setup ({}, {}, {}): {detail}", ca.display(), cert.display(), key.display())]
    Tls {
        /// The CA file.
        ca: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// tonic's reason (never key bytes).
        detail: String,
    },
    /// The connection or the TLS handshake failed.
    #[error("cannot connect to {endpoint}: {detail}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The chain of causes, outermost first.
        detail: String,
        /// What to check, for the failures we recognise.
        hint: Option<&'static str>,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| ClientError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// An error and its causes as one line, without repeating a cause its parent already quotes.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = c.source();
    }
    out
}

/// What to check for a handshake failure we recognise.
fn hint_for(detail: &str) -> Option<&'static str> {
    if detail.contains("received fatal alert") {
        // The server sent the alert: it refused what we presented.
        Some("the server refused the client certificate given with --cert")
    } else if detail.contains("UnknownIssuer") || detail.contains("BadSignature") {
        Some("the server certificate is not issued by the CA given with --ca")
    } else if detail.contains("NotValidForName") {
        Some("the server certificate does not carry the name given with --server-name")
    } else if detail.contains("Expired") || detail.contains("NotValidYet") {
        Some("the server certificate has expired or is not yet valid")
    } else if detail.contains("Connection refused") {
        Some("is piiguard listening there?")
    } else {
        None
    }
}

impl ClientSettings {
    /// The endpoint with TLS and timeouts configured, not yet connected (for callers that
    /// add their own HTTP/2 settings, such as the load generator).
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let ca = read("CA certificate", &self.ca)?;
        let cert = read("client certificate", &self.cert)?;
        let key = read("client key", &self.key)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&*ca))
            .identity(Identity::from_pem(&*cert, &*key))
            .domain_name(self.server_name.clone());
        let url = if self.endpoint.starts_with("https://") {
            self.endpoint.clone()
        } else {
            format!("https://{}", self.endpoint)
        };
        Endpoint::from_shared(url)
            .map_err(|e| ClientError::Endpoint {
                endpoint: self.endpoint.clone(),
                detail: causes(&e),
            })?
            .tls_config(tls)
            .map_err(|e| ClientError::Tls {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
                detail: causes(&e),
            })
            .map(|ep| {
                ep.connect_timeout(self.connect_timeout)
                    .timeout(self.request_timeout)
            })
    }

    /// Connects (TCP and TLS handshake) and returns the channel.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| self.connect_error(&e))
    }

    /// Describes a failed connection to this endpoint (with a hint for known TLS failures).
    pub fn connect_error(&self, e: &dyn std::error::Error) -> ClientError {
        let detail = causes(e);
        ClientError::Connect {
            endpoint: self.endpoint.clone(),
            hint: hint_for(&detail),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> ClientSettings {
        ClientSettings {
            endpoint: "127.0.0.1:1".into(),
            ca: dir.join("ca.pem"),
            cert: dir.join("c.pem"),
            key: dir.join("c.key"),
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = settings(dir.path()).endpoint().unwrap_err();
        let m = e.to_string();
        assert!(m.contains("CA certificate") && m.contains("ca.pem"), "{m}");
    }

    #[test]
    fn known_handshake_failures_get_a_hint() {
        assert!(
            hint_for("invalid peer certificate: UnknownIssuer")
                .unwrap()
                .contains("--ca")
        );
        assert!(
            hint_for("invalid peer certificate: NotValidForName")
                .unwrap()
                .contains("--server-name")
        );
        assert!(
            hint_for("received fatal alert: CertificateExpired")
                .unwrap()
                .contains("--cert")
        );
        assert_eq!(hint_for("something else"), None);
    }
}
