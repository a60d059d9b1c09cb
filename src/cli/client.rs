//! The connection arguments every client command shares (`shred`, `admin`, ...), flattened into
//! each with `#[command(flatten)]`, and the one way they become an mTLS channel
//! ([`crate::tls::client`]).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::Channel;

use crate::tls::client::{ClientError, ClientSettings};

/// Where the server is and who we are. Certificate and key default to the dev PKI's client of
/// the command's identity (`certs/dev/client-<identity>.pem`).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// piiguard's mTLS address (`host:port` or `https://host:port`).
    #[arg(long, visible_alias = "address", default_value = "127.0.0.1:7443")]
    pub endpoint: String,
    /// CA that issued the server certificate (PEM).
    #[arg(long, default_value = "certs/dev/ca.pem")]
    pub ca: PathBuf,
    /// Client certificate (PEM) [default: certs/dev/client-<identity>.pem, where <identity> is
    /// `erasure` for shred and `admin` for admin].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) [default: certs/dev/client-<identity>.key]. Read into a buffer
    /// that is wiped after use; never printed.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Seconds allowed for the TCP connection and the TLS handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds allowed for each call until its response starts (streams are not cut).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub request_timeout: u64,
}

/// Folder of the dev PKI that `piiguard dev` and `piiguard certs` write by default.
pub const DEV_PKI_DIR: &str = "certs/dev";

impl ConnArgs {
    /// The settings, with the dev client certificate of `identity` (a dev PKI file stem such
    /// as `erasure` or `admin`) where no `--cert` / `--key` was given.
    pub fn settings(&self, identity: &str) -> ClientSettings {
        let dev = PathBuf::from(DEV_PKI_DIR);
        ClientSettings {
            endpoint: self.endpoint.clone(),
            ca: self.ca.clone(),
            cert: self
                .cert
                .clone()
                .unwrap_or_else(|| dev.join(format!("client-{identity}.pem"))),
            key: self
                .key
                .clone()
                .unwrap_or_else(|| dev.join(format!("client-{identity}.key"))),
            server_name: self.server_name.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            request_timeout: Duration::from_secs(self.request_timeout),
        }
    }

    /// Connects as `identity` (see [`settings`](Self::settings)).
    pub async fn connect(&self, identity: &str) -> Result<Channel, ClientError> {
        self.settings(identity).connect().await
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        conn: ConnArgs,
    }

    #[test]
    fn defaults_are_the_dev_files_of_the_identity() {
        let t = T::parse_from(["t"]);
        let s = t.conn.settings("admin");
        assert_eq!(s.ca, PathBuf::from("certs/dev/ca.pem"));
        assert_eq!(s.cert, PathBuf::from("certs/dev/client-admin.pem"));
        assert_eq!(s.key, PathBuf::from("certs/dev/client-admin.key"));
        assert_eq!(s.endpoint, "127.0.0.1:7443");
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn address_is_an_alias_of_endpoint() {
        let t = T::parse_from(["t", "--address", "127.0.0.1:9", "--cert", "c.pem"]);
        let s = t.conn.settings("erasure");
        assert_eq!(s.endpoint, "127.0.0.1:9");
        assert_eq!(s.cert, PathBuf::from("c.pem"));
        assert_eq!(s.key, PathBuf::from("certs/dev/client-erasure.key"));
    }
}
