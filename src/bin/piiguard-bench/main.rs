//! `piiguard-bench`: the load generator of piiguard (bench/README.md).
//!
//! It drives a running piiguard over mutual TLS with a tonic client (many HTTP/2 connections,
//! many concurrent streams, closed loop or fixed rate, bounded in time and count), drives the
//! same server's no-op `grpc.health.v1.Health/Check` as the transport ceiling and OpenBao transit
//! over HTTPS as the anchor, and prints throughput, latency percentiles, server CPU per call and
//! the ratios between scenarios of one run. `ghz-data` writes the generated ghz data files.

#![forbid(unsafe_code)]

mod ghz;
mod kek;
mod keys;
mod raw;
mod scenario;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load generator for piiguard (and OpenBao transit, as the anchor).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run scenarios and print throughput, latency, CPU per call and ratios.
    Run(RunArgs),
    /// Write the generated ghz data files (warm sets, batches, ciphertexts to decrypt).
    GhzData(GhzDataArgs),
    /// One-shot: N new subjects, RotateKek, seconds until the background rewrap is done, and
    /// the same transit rewraps made directly (issue 12).
    KekRewrap(kek::KekRewrapArgs),
}

/// Where the server and OpenBao are, and the credentials to reach them.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// `piiguard dev` folder: default for the OpenBao token path below.
    #[arg(long, default_value = ".dev")]
    pub dev_dir: PathBuf,
    /// Dev PKI folder (`piiguard dev --pki-dir`): default for every certificate and key below.
    #[arg(long, default_value = "certs/dev")]
    pub pki_dir: PathBuf,
    /// piiguard mTLS address; several replicas comma-separated (`a:1,b:2`): connection i goes
    /// to address i mod n (give --connections a multiple of n).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub addr: String,
    /// TLS server name to verify (the dev server certificate is for localhost and 127.0.0.1).
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// CA certificate of the server (default: <pki-dir>/ca.pem).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (default: <pki-dir>/client-orders.pem).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client key (default: <pki-dir>/client-orders.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Client certificate of the set-up calls that need the `keys` grant (RotateSubjectKey,
    /// RotateKek, GetKeyStatus; default: <pki-dir>/client-admin.pem, the dev `admin` identity).
    #[arg(long)]
    pub admin_cert: Option<PathBuf>,
    /// Key of --admin-cert (default: <pki-dir>/client-admin.key).
    #[arg(long)]
    pub admin_key: Option<PathBuf>,
    /// OpenBao/Vault address (needed by the bao-* scenarios).
    #[arg(long, default_value = "https://127.0.0.1:8200")]
    pub vault_addr: String,
    /// CA bundle of OpenBao (default: <pki-dir>/ca.pem).
    #[arg(long)]
    pub vault_ca: Option<PathBuf>,
    /// File holding an OpenBao token allowed to use transit and KV (default:
    /// <dev-dir>/bao/root-token).
    #[arg(long)]
    pub vault_token_file: Option<PathBuf>,
    /// Run the bao-* scenarios with a child token holding only this policy (e.g. `piiguard`,
    /// the policy piiguard itself runs with) instead of the token of --vault-token-file:
    /// the like-for-like anchor, since OpenBao evaluates a policy on every request and the
    /// root token skips that.
    #[arg(long)]
    pub vault_policy: Option<String>,
    /// Transit mount.
    #[arg(long, default_value = "piiguard-transit")]
    pub transit_mount: String,
    /// KV v2 mount (bao-cold writes its records under `bench/` there).
    #[arg(long, default_value = "piiguard-kv")]
    pub kv_mount: String,
    /// Keyspace of the piiguard scenarios; the transit key is `kek-<keyspace>`.
    #[arg(long, default_value = "orders")]
    pub keyspace: String,
    /// Field name of the piiguard scenarios.
    #[arg(long, default_value = "email")]
    pub field: String,
}

impl Target {
    /// The addresses of --addr (one per replica).
    pub fn addrs(&self) -> Vec<&str> {
        self.addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect()
    }
    pub fn ca(&self) -> PathBuf {
        self.ca
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("ca.pem"))
    }
    pub fn cert(&self) -> PathBuf {
        self.cert
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("client-orders.pem"))
    }
    pub fn key(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("client-orders.key"))
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.admin_cert
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("client-admin.pem"))
    }
    pub fn admin_key(&self) -> PathBuf {
        self.admin_key
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("client-admin.key"))
    }
    pub fn vault_ca(&self) -> PathBuf {
        self.vault_ca
            .clone()
            .unwrap_or_else(|| self.pki_dir.join("ca.pem"))
    }
    pub fn vault_token_file(&self) -> PathBuf {
        self.vault_token_file
            .clone()
            .unwrap_or_else(|| self.dev_dir.join("bao/root-token"))
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,
    /// Comma-separated scenarios, run in this order. piiguard: health, encrypt-hot,
    /// encrypt-warm, encrypt-cold, decrypt-hot, decrypt-warm, encrypt-batch, encrypt-batch-hot,
    /// encrypt-batch-cold, decrypt-batch, tokenize-random, tokenize-det, detokenize, blind-index, encrypt-index,
    /// decrypt-masked, unseal, unseal-direct, unseal-batch, rewrap, rewrap-batch. OpenBao
    /// transit (anchor): bao-encrypt, bao-decrypt, bao-encrypt-batch, bao-decrypt-batch,
    /// bao-cold (the Vault calls of one piiguard cold encrypt, made directly), bao-hmac,
    /// bao-rsa-decrypt, bao-rsa-decrypt-batch, bao-rewrap. `all-unary`, `all-batch`,
    /// `all-cold`, `all-tokens`, `all-search`, `all-keys` and `all` expand to groups
    /// (bench/README.md).
    #[arg(
        long,
        short,
        default_value = "health,encrypt-hot,encrypt-warm,decrypt-hot,bao-encrypt"
    )]
    pub scenarios: String,
    /// HTTP/2 connections (gRPC) or HTTP clients (OpenBao).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Concurrent requests in flight in total (spread over the connections).
    #[arg(long, short, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured time per scenario, in seconds.
    #[arg(long, short, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop a scenario after this many calls (whichever of duration/count comes first).
    #[arg(long, short = 'n', default_value_t = 10_000_000)]
    pub requests: u64,
    /// Unmeasured warm-up per scenario, in seconds (same load, results discarded).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Fixed rate in calls per second (open loop; latency counted from the scheduled send
    /// time). 0 = closed loop, as fast as the server answers.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// After each closed-loop unary piiguard scenario, run it again at half its measured rate and report
    /// that run's latency (the "p99 at half of peak" figure).
    #[arg(long)]
    pub half_rate: bool,
    /// Plaintext size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Items per batch (EncryptBatch/DecryptBatch/RewrapBatch).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Items per transit batch_input in bao-*-batch (OpenBao refuses JSON bodies with more
    /// than about 1,000 strings, so 1,000-item batches are not possible there).
    #[arg(long, default_value_t = 100)]
    pub bao_batch_size: usize,
    /// Envelopes per UnsealBatch (and per transit batch_input of bao-rsa-decrypt-batch, its
    /// anchor): each envelope costs one RSA-2048 private operation in OpenBao, which bounds
    /// both.
    #[arg(long, default_value_t = 100)]
    pub unseal_batch_size: usize,
    /// Calls in flight of unseal-batch, bao-rsa-decrypt-batch and rewrap-batch (instead of
    /// --concurrency): 100 RSA-2048 decrypts per UnsealBatch, 64 of them in flight, would
    /// queue in OpenBao for longer than the server's Vault timeout.
    #[arg(long, default_value_t = 4)]
    pub keys_batch_concurrency: usize,
    /// Calls in flight of encrypt-batch-cold (instead of --concurrency): each call creates
    /// --batch-size new subjects, and the server loads half its Vault admission bound of them
    /// at a time.
    #[arg(long, default_value_t = 2)]
    pub cold_batch_concurrency: usize,
    /// Distinct subjects of the warm working set (all cached before measuring).
    #[arg(long, default_value_t = 1000)]
    pub warm_subjects: usize,
    /// piiguard server pid: report its CPU time per call and its RSS. Several replicas:
    /// comma-separated pids, summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// OpenBao pid: report its CPU time per call too.
    #[arg(long)]
    pub vault_pid: Option<u32>,
    /// PostgreSQL postmaster pid: report the CPU per call of the store (the postmaster, its
    /// live backends, and the backends it has reaped).
    #[arg(long)]
    pub store_pid: Option<u32>,
    /// Print one JSON document instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Label stored in the JSON output (e.g. "pinned" or "unpinned").
    #[arg(long, default_value = "")]
    pub label: String,
}

#[derive(Args, Debug, Clone)]
pub struct GhzDataArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output folder (ignored by git).
    #[arg(long, default_value = "bench/out")]
    pub out: PathBuf,
    /// Distinct subjects of the warm working set.
    #[arg(long, default_value_t = 1000)]
    pub warm_subjects: usize,
    /// Items per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Plaintext size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Envelopes per UnsealBatch (unseal-batch.json).
    #[arg(long, default_value_t = 100)]
    pub unseal_batch_size: usize,
}

/// Hard limit on any single call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    piiguard::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("piiguard-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.command {
            Cmd::Run(a) => scenario::run(a).await,
            Cmd::GhzData(a) => ghz::write_data(a).await,
            Cmd::KekRewrap(a) => kek::run(a).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("piiguard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
