//! `piiguard keys ...`: the public-key calls of the Keys service over mutual TLS.

use clap::{Subcommand, ValueEnum};

use crate::cli::CommandError;
use crate::cli::client::ConnArgs;
use crate::pb;
use crate::pb::keys_client::KeysClient;

/// The dev PKI identity `keys` connects as unless `--cert` / `--key` say otherwise.
pub const IDENTITY: &str = "admin";

/// What an RSA-2048 public key is for.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Purpose {
    /// The key producers seal PII to (`piiguard seal`).
    Sealing,
    /// The key of certificates of destruction and audit checkpoints.
    Signing,
}

impl Purpose {
    fn pb(self) -> i32 {
        match self {
            Purpose::Sealing => pb::KeyPurpose::Sealing as i32,
            Purpose::Signing => pb::KeyPurpose::Signing as i32,
        }
    }
}

/// Public-key commands.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysCmd {
    /// Prints the still-valid public keys of a purpose, newest first: a `#` line (version,
    /// current, SHA-256 fingerprint of the DER SubjectPublicKeyInfo, creation time) before each
    /// PEM. With --current, only the current key's PEM (its version on stderr).
    PublicKey {
        /// Sealing or signing.
        #[arg(long, value_enum)]
        purpose: Purpose,
        /// Only the current version's PEM.
        #[arg(long)]
        current: bool,
    },
    /// Makes a new version of the purpose's key (needs `admin`).
    RotatePublicKey {
        /// Sealing or signing.
        #[arg(long, value_enum)]
        purpose: Purpose,
    },
    /// Retires the versions below --min-version (needs `admin`): envelopes sealed to them no
    /// longer open, and they are no longer published.
    RetirePublicKeyVersions {
        /// Sealing or signing.
        #[arg(long, value_enum)]
        purpose: Purpose,
        /// The oldest version that stays valid.
        #[arg(long)]
        min_version: u32,
    },
}

/// Connects (as [`IDENTITY`] unless `--cert` / `--key` are given) and runs one command.
pub async fn run(conn: ConnArgs, cmd: KeysCmd) -> Result<(), CommandError> {
    crate::tls::install_default_provider();
    let mut c = KeysClient::new(conn.connect(IDENTITY).await?);
    let status = |method: &'static str| move |status| CommandError::Rpc { method, status };
    match cmd {
        KeysCmd::PublicKey { purpose, current } => {
            let r = c
                .get_public_key(pb::GetPublicKeyRequest {
                    purpose: purpose.pb(),
                })
                .await
                .map_err(status("GetPublicKey"))?
                .into_inner();
            for k in r.keys {
                if current {
                    if k.current {
                        eprintln!("{} version {}", k.key_name, k.version);
                        print!("{}", k.public_key_pem);
                    }
                    continue;
                }
                println!(
                    "# {} version {}{} sha256:{} created {}",
                    k.key_name,
                    k.version,
                    if k.current { " (current)" } else { "" },
                    k.fingerprint_sha256,
                    k.created_at
                );
                print!("{}", k.public_key_pem);
            }
        }
        KeysCmd::RotatePublicKey { purpose } => {
            let r = c
                .rotate_public_key(pb::RotatePublicKeyRequest {
                    purpose: purpose.pb(),
                })
                .await
                .map_err(status("RotatePublicKey"))?
                .into_inner();
            println!("new version {}", r.new_version);
        }
        KeysCmd::RetirePublicKeyVersions {
            purpose,
            min_version,
        } => {
            let r = c
                .retire_public_key_versions(pb::RetirePublicKeyVersionsRequest {
                    purpose: purpose.pb(),
                    min_version,
                })
                .await
                .map_err(status("RetirePublicKeyVersions"))?
                .into_inner();
            println!("versions below {} retired", r.min_version);
        }
    }
    Ok(())
}
