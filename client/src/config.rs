//! How to reach piiguard and who we are: endpoint, mutual-TLS files, timeouts, retries.
//!
//! The client key is read into a [`Zeroizing`] buffer that is wiped once tonic has taken its
//! copy; no error and no `Debug` output ever carries key bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::error::causes;
use crate::retry::RetryPolicy;

/// CA bundle file of a SPIFFE-style bundle folder ([`TlsSource::BundleDir`]).
pub const BUNDLE_CA: &str = "bundle.pem";
/// Certificate (chain) file of a bundle folder: the X.509 SVID.
pub const BUNDLE_CERT: &str = "svid.pem";
/// Private key file of a bundle folder.
pub const BUNDLE_KEY: &str = "svid_key.pem";

/// Where the mutual-TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsSource {
    /// Three PEM files.
    Files {
        /// CA that issued the server certificate.
        ca: PathBuf,
        /// Client certificate (chain): the identity piiguard authorises.
        cert: PathBuf,
        /// Client private key.
        key: PathBuf,
    },
    /// A folder laid out as a SPIFFE helper / spire-agent writes an X.509 SVID:
    /// [`BUNDLE_CA`] (`bundle.pem`, the trust bundle), [`BUNDLE_CERT`] (`svid.pem`, the SVID
    /// and its chain) and [`BUNDLE_KEY`] (`svid_key.pem`, its key). Read at connect time, so a
    /// client made after a rotation uses the new SVID.
    BundleDir(PathBuf),
}

impl TlsSource {
    /// The CA, certificate and key files.
    pub fn files(&self) -> (PathBuf, PathBuf, PathBuf) {
        match self {
            TlsSource::Files { ca, cert, key } => (ca.clone(), cert.clone(), key.clone()),
            TlsSource::BundleDir(d) => (d.join(BUNDLE_CA), d.join(BUNDLE_CERT), d.join(BUNDLE_KEY)),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
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
}

/// Everything [`Client::connect`](crate::Client::connect) needs. Build with
/// [`from_files`](Self::from_files) or [`from_bundle_dir`](Self::from_bundle_dir) and the
/// `with_*` methods; the defaults suit a service calling piiguard on a local network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` or `https://host:port`.
    pub endpoint: String,
    /// The mutual-TLS material.
    pub tls: TlsSource,
    /// Name the server certificate must carry (default `localhost`, the dev PKI's).
    pub server_name: String,
    /// Limit on TCP connect plus TLS handshake (default 10 s).
    pub connect_timeout: Duration,
    /// Default deadline of a call, retries included (default 10 s): each attempt gets what is
    /// left. Also the limit on a stream until its response starts.
    pub deadline: Duration,
    /// Retries of retryable failures.
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// mTLS from three PEM files.
    pub fn from_files(
        endpoint: impl Into<String>,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        Self::new(
            endpoint,
            TlsSource::Files {
                ca: ca.into(),
                cert: cert.into(),
                key: key.into(),
            },
        )
    }

    /// mTLS from a SPIFFE-style bundle folder (see [`TlsSource::BundleDir`]).
    pub fn from_bundle_dir(endpoint: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Self::new(endpoint, TlsSource::BundleDir(dir.into()))
    }

    /// The defaults with this endpoint and TLS source.
    pub fn new(endpoint: impl Into<String>, tls: TlsSource) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            tls,
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }

    /// Sets the name the server certificate must carry.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets the default deadline of a call (retries included).
    pub fn with_deadline(mut self, t: Duration) -> Self {
        self.deadline = t;
        self
    }

    /// Sets the retry policy ([`RetryPolicy::none`] to never retry).
    pub fn with_retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }

    /// The endpoint with TLS and timeouts configured, not connected yet (for callers that add
    /// their own HTTP/2 settings, or connect lazily).
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        let (ca_path, cert_path, key_path) = self.tls.files();
        let ca = read("CA certificate", &ca_path)?;
        let cert = read("client certificate", &cert_path)?;
        let key = read("client key", &key_path)?;
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
            .map_err(|e| ConfigError::Endpoint {
                endpoint: self.endpoint.clone(),
                detail: causes(&e),
            })?
            .tls_config(tls)
            .map_err(|e| ConfigError::Tls {
                ca: ca_path.clone(),
                cert: cert_path.clone(),
                key: key_path.clone(),
                detail: causes(&e),
            })
            .map(|ep| {
                ep.connect_timeout(self.connect_timeout)
                    .timeout(self.deadline)
            })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| ConfigError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = ClientConfig::from_files(
            "127.0.0.1:1",
            dir.path().join("ca.pem"),
            dir.path().join("c.pem"),
            dir.path().join("c.key"),
        );
        let m = c.endpoint().unwrap_err().to_string();
        assert!(m.contains("CA certificate") && m.contains("ca.pem"), "{m}");
    }

    #[test]
    fn a_bundle_folder_names_its_three_files() {
        let c = ClientConfig::from_bundle_dir("127.0.0.1:1", "/run/svid");
        let (ca, cert, key) = c.tls.files();
        assert_eq!(ca, Path::new("/run/svid/bundle.pem"));
        assert_eq!(cert, Path::new("/run/svid/svid.pem"));
        assert_eq!(key, Path::new("/run/svid/svid_key.pem"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(BUNDLE_CA), "x").unwrap();
        let m = ClientConfig::from_bundle_dir("127.0.0.1:1", dir.path())
            .endpoint()
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("client certificate") && m.contains("svid.pem"),
            "{m}"
        );
    }
}
