//! `piiguard admin ...`: the Admin RPCs from the command line, over mutual TLS.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::pb;
use crate::pb::admin_client::AdminClient;

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// Server address (IP:PORT or host:port).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub address: String,
    /// CA certificate of the server.
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate (an identity with the `admin` grant).
    #[arg(long)]
    pub cert: PathBuf,
    /// Client private key.
    #[arg(long)]
    pub key: PathBuf,
    /// Server name to verify (default: localhost).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

/// Admin commands.
#[derive(Subcommand, Debug, Clone)]
pub enum AdminCmd {
    /// Lists locked-out identities.
    Lockouts,
    /// Lifts the lockout of an identity.
    Lift { identity: String },
    /// Creates a canary record and prints its ciphertext (base64) to plant among real data.
    CreateCanary {
        #[arg(long)]
        keyspace: String,
        #[arg(long)]
        field: String,
        /// Where it will be planted (free text, not PII).
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Lists canaries.
    Canaries,
    /// Prints the PEM public keys of the audit checkpoint signing key.
    SigningKeys,
}

/// Connects and runs one command.
pub async fn run(conn: Connection, cmd: AdminCmd) -> Result<(), String> {
    crate::tls::install_default_provider();
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&conn.ca)?))
        .identity(Identity::from_pem(read(&conn.cert)?, read(&conn.key)?))
        .domain_name(conn.server_name.clone());
    let ch = Endpoint::from_shared(format!("https://{}", conn.address))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", conn.address))?;
    let mut c = AdminClient::new(ch);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match cmd {
        AdminCmd::Lockouts => {
            let r = c
                .list_lockouts(pb::ListLockoutsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if r.lockouts.is_empty() {
                println!("no lockouts");
            }
            for l in r.lockouts {
                println!(
                    "{}\tsince {}\tuntil {}\t{}",
                    l.identity, l.since, l.until, l.reason
                );
            }
        }
        AdminCmd::Lift { identity } => {
            let r = c
                .lift_lockout(pb::LiftLockoutRequest {
                    identity: identity.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if r.lifted {
                println!("lockout of {identity} lifted");
            } else {
                println!("{identity} was not locked out");
            }
        }
        AdminCmd::CreateCanary {
            keyspace,
            field,
            label,
        } => {
            let r = c
                .create_canary(pb::CreateCanaryRequest {
                    keyspace,
                    field,
                    decoy: Vec::new(),
                    label,
                    encoding: pb::CiphertextEncoding::Unspecified as i32,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "ciphertext (base64): {}\nkey id: {}\nsubject ref: {}",
                base64::engine::general_purpose::STANDARD.encode(&r.ciphertext),
                r.key_id,
                r.subject_ref
            );
        }
        AdminCmd::Canaries => {
            let r = c
                .list_canaries(pb::ListCanariesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for k in r.canaries {
                println!(
                    "{}\t{}\t{}\t{}",
                    k.keyspace, k.key_id, k.subject_ref, k.label
                );
            }
        }
        AdminCmd::SigningKeys => {
            let r = c
                .get_audit_signing_keys(pb::GetAuditSigningKeysRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for k in r.keys {
                println!("# version {}\n{}", k.version, k.public_key_pem.trim_end());
            }
        }
    }
    Ok(())
}
