//! The connection arguments every client command shares (`shred`, `admin`, `keys`), flattened
//! into each with `#[command(flatten)]`, and the one way they become an mTLS channel: the
//! `piiguard-client` crate's [`ClientConfig`] and [`Client::connect`] (the same connection
//! setup and error mapping a calling service uses), with its hints said in terms of the flags.

use std::path::PathBuf;
use std::time::Duration;

use piiguard_client::{Client, ClientConfig, ConnectHint, RetryPolicy};
use tonic::transport::Channel;

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

/// Why a client command could not connect: the client crate's error, its hints naming the
/// flags to check.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct ConnectError(pub piiguard_client::Error);

fn describe(e: &piiguard_client::Error) -> String {
    match e {
        piiguard_client::Error::Connect {
            endpoint,
            detail,
            hint,
        } => format!(
            "cannot connect to {endpoint}: {detail}{}",
            hint.map(|h| format!(" ({})", flag_hint(h)))
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

/// A connection hint in terms of this command's flags.
fn flag_hint(h: ConnectHint) -> String {
    match h {
        ConnectHint::ClientCertificateRefused => {
            "the server refused the client certificate given with --cert".into()
        }
        ConnectHint::UnknownCa => {
            "the server certificate is not issued by the CA given with --ca".into()
        }
        ConnectHint::WrongServerName => {
            "the server certificate does not carry the name given with --server-name".into()
        }
        other => other.to_string(),
    }
}

impl ConnArgs {
    /// The client configuration, with the dev client certificate of `identity` (a dev PKI
    /// file stem such as `erasure` or `admin`) where no `--cert` / `--key` was given. No
    /// retries: a command reports a failure and the operator runs it again (`shred` skips done
    /// subjects); `--request-timeout` is each call's deadline.
    pub fn config(&self, identity: &str) -> ClientConfig {
        let dev = PathBuf::from(DEV_PKI_DIR);
        ClientConfig::from_files(
            self.endpoint.clone(),
            self.ca.clone(),
            self.cert
                .clone()
                .unwrap_or_else(|| dev.join(format!("client-{identity}.pem"))),
            self.key
                .clone()
                .unwrap_or_else(|| dev.join(format!("client-{identity}.key"))),
        )
        .with_server_name(self.server_name.clone())
        .with_connect_timeout(Duration::from_secs(self.connect_timeout))
        .with_deadline(Duration::from_secs(self.request_timeout))
        .with_retry(RetryPolicy::none())
    }

    /// Connects as `identity` (see [`config`](Self::config)).
    pub async fn connect(&self, identity: &str) -> Result<Channel, ConnectError> {
        Client::connect(self.config(identity))
            .await
            .map(|c| c.channel())
            .map_err(ConnectError)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use piiguard_client::TlsSource;

    use super::*;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        conn: ConnArgs,
    }

    fn files(c: &ClientConfig) -> (PathBuf, PathBuf, PathBuf) {
        c.tls.files()
    }

    #[test]
    fn defaults_are_the_dev_files_of_the_identity() {
        let t = T::parse_from(["t"]);
        let c = t.conn.config("admin");
        assert_eq!(
            files(&c),
            (
                PathBuf::from("certs/dev/ca.pem"),
                PathBuf::from("certs/dev/client-admin.pem"),
                PathBuf::from("certs/dev/client-admin.key")
            )
        );
        assert!(matches!(c.tls, TlsSource::Files { .. }));
        assert_eq!(c.endpoint, "127.0.0.1:7443");
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.deadline, Duration::from_secs(60));
        assert_eq!(c.retry.max_attempts, 1);
    }

    #[test]
    fn address_is_an_alias_of_endpoint() {
        let t = T::parse_from(["t", "--address", "127.0.0.1:9", "--cert", "c.pem"]);
        let c = t.conn.config("erasure");
        assert_eq!(c.endpoint, "127.0.0.1:9");
        let (_, cert, key) = files(&c);
        assert_eq!(cert, PathBuf::from("c.pem"));
        assert_eq!(key, PathBuf::from("certs/dev/client-erasure.key"));
    }

    #[test]
    fn hints_name_the_flags() {
        let e = ConnectError(piiguard_client::Error::Connect {
            endpoint: "127.0.0.1:1".into(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
            hint: Some(ConnectHint::UnknownCa),
        });
        let m = e.to_string();
        assert!(
            m.starts_with("cannot connect to 127.0.0.1:1: ")
                && m.ends_with("(the server certificate is not issued by the CA given with --ca)"),
            "{m}"
        );
    }
}
