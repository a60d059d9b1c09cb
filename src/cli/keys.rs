//! `piiguard keys ...`: the Keys RPCs from the command line, over mutual TLS.

use clap::Subcommand;

use crate::cli::CommandError;
use crate::cli::client::ConnArgs;
use crate::pb;
use crate::pb::keys_client::KeysClient;

/// The dev PKI identity `keys` connects as unless `--cert` / `--key` say otherwise (it needs
/// the `keys` grant on the keyspace).
pub const IDENTITY: &str = "admin";

/// Key lifecycle commands.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysCmd {
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

/// Connects (as [`IDENTITY`] unless `--cert` / `--key` are given) and runs one command.
pub async fn run(conn: ConnArgs, cmd: KeysCmd) -> Result<(), CommandError> {
    crate::tls::install_default_provider();
    let mut c = KeysClient::new(conn.connect(IDENTITY).await?);
    match cmd {
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
