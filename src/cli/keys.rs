//! `piiguard keys ...`: the Keys service from the command line, over mutual TLS: public keys
//! (sealing, signing; rotation and retirement need `admin`) and a keyspace's key lifecycle
//! (needs the `keys` grant on the keyspace). docs/KEYS.md.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;

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

/// Key commands.
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
    /// KEK versions, wrapped DEKs per KEK version, and the rewrap's progress.
    Status {
        /// The keyspace.
        keyspace: String,
    },
    /// Makes a new KEK version; the servers rewrap every wrapped DEK to it in the background.
    RotateKek {
        /// The keyspace.
        keyspace: String,
        /// Waits for the rewrap to finish, printing its progress.
        #[arg(long)]
        wait: bool,
        /// Seconds between progress lines with `--wait`.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        every: u64,
    },
    /// Raises the KEK's minimum decryption version (refused with KEK_VERSION_IN_USE while a
    /// wrapped DEK still needs an older version).
    RetireVersion {
        /// The keyspace.
        keyspace: String,
        /// Versions below this one stop decrypting.
        #[arg(long)]
        min_version: u32,
    },
    /// Gives one subject a new DEK version (old versions keep decrypting until a shred).
    RotateSubject {
        /// Keyspace of the subject.
        #[arg(long)]
        keyspace: String,
        /// The subject id (sent to the server only; never printed).
        #[arg(long)]
        subject: String,
    },
}

fn status_err(method: &'static str) -> impl Fn(tonic::Status) -> CommandError {
    move |status| CommandError::Rpc { method, status }
}

async fn status(
    c: &mut KeysClient<Channel>,
    keyspace: &str,
) -> Result<pb::GetKeyStatusResponse, CommandError> {
    Ok(c.get_key_status(pb::GetKeyStatusRequest {
        keyspace: keyspace.to_string(),
    })
    .await
    .map_err(status_err("GetKeyStatus"))?
    .into_inner())
}

/// One line of progress: done / total and percent.
pub fn progress_line(s: &pb::GetKeyStatusResponse) -> String {
    let r = s.rewrap.clone().unwrap_or_default();
    let total = r.done + r.remaining;
    let pct = if total == 0 {
        100.0
    } else {
        r.done as f64 * 100.0 / total as f64
    };
    let old: u64 = s
        .deks_by_kek_version
        .iter()
        .filter(|c| c.kek_version < s.kek_latest_version)
        .map(|c| c.deks)
        .sum();
    format!(
        "rewrap to KEK v{}: {} of {} records ({pct:.1}%), {old} wrapped DEK(s) on older versions{}",
        r.target_kek_version,
        r.done,
        total,
        if r.running { "" } else { ", finished" }
    )
}

fn print_status(s: &pb::GetKeyStatusResponse) {
    println!("keyspace: {}", s.keyspace);
    println!(
        "KEK: latest version {}, min decryption version {}",
        s.kek_latest_version, s.kek_min_decryption_version
    );
    let as_of = if s.counts_scanned_at.is_empty() {
        "scan in progress".to_string()
    } else {
        format!("scan of {}, adjusted since", s.counts_scanned_at)
    };
    println!("wrapped DEKs by KEK version ({as_of}):");
    for c in &s.deks_by_kek_version {
        println!("  v{}\t{}", c.kek_version, c.deks);
    }
    println!("subjects: {}", s.subjects);
    let r = s.rewrap.clone().unwrap_or_default();
    println!("{}", progress_line(s));
    if !r.started_at.is_empty() {
        println!("  started {}", r.started_at);
    }
    if !r.finished_at.is_empty() {
        println!("  finished {}", r.finished_at);
    }
}

/// Connects (as [`IDENTITY`] unless `--cert` / `--key` are given) and runs one command.
pub async fn run(conn: ConnArgs, cmd: KeysCmd) -> Result<(), CommandError> {
    crate::tls::install_default_provider();
    let mut c = KeysClient::new(conn.connect(IDENTITY).await?);
    match cmd {
        KeysCmd::PublicKey { purpose, current } => {
            let r = c
                .get_public_key(pb::GetPublicKeyRequest {
                    purpose: purpose.pb(),
                })
                .await
                .map_err(status_err("GetPublicKey"))?
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
                .map_err(status_err("RotatePublicKey"))?
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
                .map_err(status_err("RetirePublicKeyVersions"))?
                .into_inner();
            println!("versions below {} retired", r.min_version);
        }
        KeysCmd::Status { keyspace } => print_status(&status(&mut c, &keyspace).await?),
        KeysCmd::RotateKek {
            keyspace,
            wait,
            every,
        } => {
            let r = c
                .rotate_kek(pb::RotateKekRequest {
                    keyspace: keyspace.clone(),
                })
                .await
                .map_err(status_err("RotateKek"))?
                .into_inner();
            println!(
                "KEK of {keyspace} is now version {}; {} wrapped DEK(s) to rewrap (as last counted)",
                r.new_version, r.to_rewrap
            );
            if wait {
                loop {
                    let s = status(&mut c, &keyspace).await?;
                    println!("{}", progress_line(&s));
                    let r2 = s.rewrap.unwrap_or_default();
                    if !r2.running && r2.target_kek_version >= r.new_version {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(every.max(1))).await;
                }
            }
        }
        KeysCmd::RetireVersion {
            keyspace,
            min_version,
        } => {
            let r = c
                .retire_kek_versions(pb::RetireKekVersionsRequest {
                    keyspace: keyspace.clone(),
                    min_decryption_version: min_version,
                })
                .await
                .map_err(status_err("RetireKekVersions"))?
                .into_inner();
            println!(
                "KEK of {keyspace}: versions below {} no longer decrypt",
                r.min_decryption_version
            );
        }
        KeysCmd::RotateSubject { keyspace, subject } => {
            let r = c
                .rotate_subject_key(pb::RotateSubjectKeyRequest {
                    keyspace: keyspace.clone(),
                    subject,
                })
                .await
                .map_err(|status| CommandError::Rpc {
                    method: "RotateSubjectKey",
                    status,
                })?
                .into_inner();
            println!(
                "keyspace {keyspace}: key {} now at DEK version {}",
                r.key_id, r.dek_version
            );
        }
    }
    Ok(())
}
