//! `piiguard admin ...`: the Admin RPCs from the command line, over mutual TLS.

use base64::Engine as _;
use clap::Subcommand;

use crate::cli::CommandError;
use crate::cli::client::ConnArgs;
use crate::pb;
use crate::pb::admin_client::AdminClient;

/// The dev PKI identity `admin` connects as unless `--cert` / `--key` say otherwise.
pub const IDENTITY: &str = "admin";

/// Admin commands.
#[derive(Subcommand, Debug, Clone)]
pub enum AdminCmd {
    /// Lists locked-out identities.
    Lockouts,
    /// Lifts the lockout of an identity.
    Lift {
        /// The locked-out identity (as `lockouts` prints it).
        identity: String,
    },
    /// Creates a canary record and prints its ciphertext (base64) to plant among real data.
    CreateCanary {
        /// Keyspace of the canary.
        #[arg(long)]
        keyspace: String,
        /// Field of the canary.
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

/// Connects (as [`IDENTITY`] unless `--cert` / `--key` are given) and runs one command.
pub async fn run(conn: ConnArgs, cmd: AdminCmd) -> Result<(), CommandError> {
    crate::tls::install_default_provider();
    let mut c = AdminClient::new(conn.connect(IDENTITY).await?);
    let status = |method: &'static str| move |status| CommandError::Rpc { method, status };
    match cmd {
        AdminCmd::Lockouts => {
            let r = c
                .list_lockouts(pb::ListLockoutsRequest {})
                .await
                .map_err(status("ListLockouts"))?
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
                .map_err(status("LiftLockout"))?
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
                .map_err(status("CreateCanary"))?
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
                .map_err(status("ListCanaries"))?
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
                .map_err(status("GetAuditSigningKeys"))?
                .into_inner();
            for k in r.keys {
                println!("# version {}\n{}", k.version, k.public_key_pem.trim_end());
            }
        }
    }
    Ok(())
}
