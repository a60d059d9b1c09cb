//! `piiguard serve` processes of a [`TestEnv`]: the dev config plus the test settings, every
//! listener on port 0, the bound addresses read from the server's ready file
//! (`server.ready_file`, see `piiguard::app::ready`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use piiguard::app::ready::{self, Ready};
use piiguard::setup::dev::{dev_config_toml, write_dev_policy};
use piiguard::setup::pki::write_file;

use super::bao::TestEnv;

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
identities = ["spiffe://shop.local/good", "spiffe://shop.local/old", "spiffe://shop.local/fresh", "dns:reports.shop.local"]
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["email"]
"#;

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

/// Every listener of a test server binds this: the kernel picks a free port at bind time.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// How long a server may take from spawn to its ready file (Vault login, key loading).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl TestEnv {
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

    /// The dev config of this env with the test settings and `extra` appended; the gRPC and
    /// health listeners bind port 0 ([`ANY_PORT`]).
    pub fn config_toml(&self, extra: &str) -> String {
        dev_config_toml(
            ANY_PORT,
            ANY_PORT,
            &self.pki,
            &self.bao,
            &self.role_id,
            &self.secret_id,
            &self.store_url,
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

    /// A server whose process pauses at failpoint `point` (first arrival, see
    /// `piiguard::config::failpoint`) until [`release`]d; returns it and the failpoint folder.
    /// `env` is added to the process environment.
    pub async fn paused_server(
        &self,
        name: &str,
        point: &str,
        env: Vec<(String, String)>,
    ) -> (Server, PathBuf) {
        let dir = self.dir.path().join(format!("fp-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut all = vec![
            ("PIIGUARD_FAILPOINT".into(), format!("pause:{point}")),
            ("PIIGUARD_FAILPOINT_DIR".into(), dir.display().to_string()),
        ];
        all.extend(env);
        (self.server_env(name, "", all).await, dir)
    }

    /// Like [`server_env`](Self::server_env), with the config text passed through `edit`.
    pub async fn server_custom(
        &self,
        name: &str,
        extra: &str,
        env: Vec<(String, String)>,
        edit: impl FnOnce(String) -> String,
    ) -> Server {
        let cfg = self.dir.path().join(format!("{name}.toml"));
        write_file(&cfg, edit(self.config_toml(extra)).as_bytes(), false).unwrap();
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
        let unbound = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut s = Server {
            child: None,
            addr: unbound,
            health_addr: unbound,
            config: cfg,
            log,
            ready_file: self.dir.path().join(format!("{name}.ready.json")),
            ca: self.pki.ca.clone(),
            env,
            audit_dir,
            metrics_addr: None,
        };
        s.start().await;
        s
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
}

/// A running `piiguard serve` process. Killed on drop.
///
/// Its listeners bind port 0; the addresses below are the ones its ready file reported at the
/// last [`start`](Self::start), so a restart gets new ports: connect again after one.
pub struct Server {
    child: Option<Child>,
    /// The mutual-TLS gRPC listener.
    pub addr: SocketAddr,
    /// The plaintext health-only listener.
    pub health_addr: SocketAddr,
    /// The config file.
    pub config: PathBuf,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    /// Where the server reports its bound addresses (`PIIGUARD_SERVER__READY_FILE`).
    pub ready_file: PathBuf,
    pub(super) ca: PathBuf,
    env: Vec<(String, String)>,
    /// The audit folder of this server.
    pub audit_dir: PathBuf,
    /// The metrics listener, when the config or the environment turns it on
    /// (e.g. `PIIGUARD_METRICS__LISTEN=127.0.0.1:0`).
    pub metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Spawns the process and waits until its ready file reports the addresses it bound.
    pub async fn start(&mut self) {
        // A file left by the previous run (e.g. after SIGKILL) is not this run's report.
        ready::remove(&self.ready_file).unwrap();
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
            .env("PIIGUARD_SERVER__READY_FILE", &self.ready_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ready = self.wait_ready().await;
        self.addr = ready.listen;
        self.health_addr = ready
            .health_listen
            .expect("the test config has a health listener");
        self.metrics_addr = ready.metrics_listen;
    }

    /// Waits for this run's ready file (written once every listener is bound).
    async fn wait_ready(&mut self) -> Ready {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = self.pid();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("piiguard exited early ({st}); log:\n{}", self.log_text());
            }
            match Ready::read(&self.ready_file) {
                Ok(Some(r)) if r.pid == pid => return r,
                Ok(Some(r)) => panic!("ready file of pid {}, expected {pid}", r.pid),
                Ok(None) => {}
                Err(e) => panic!("{e}; log:\n{}", self.log_text()),
            }
            if Instant::now() > deadline {
                panic!("piiguard did not become ready; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the process wrote to stdout and stderr so far.
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

    /// SIGKILL (no drain, no audit seal: a crash), then wait for the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Process id of the running process.
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
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (at most 30 s) until a paused server reached failpoint `point` (see
/// [`TestEnv::paused_server`]).
pub async fn wait_reached(dir: &Path, point: &str) {
    let f = dir.join(format!("{point}.reached"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f.exists() {
        assert!(Instant::now() < deadline, "failpoint {point} never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets a server paused at failpoint `point` go on.
pub fn release(dir: &Path, point: &str) {
    std::fs::write(dir.join(format!("{point}.release")), b"").unwrap();
}
