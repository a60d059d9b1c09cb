//! Vault at start-up (security finding 13): `serve` never creates a keyspace's index key (the
//! HMAC key of its subject references); `bootstrap` creates it once and keeps it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::common::*;

const INDEX_KEY: &str = "keyspaces/orders/index-key";

/// `method` on `path` with the root token: (HTTP status, body).
async fn as_root(env: &TestEnv, method: Method, path: &str) -> (u16, Value) {
    let admin = env.bao.client().unwrap();
    let (s, v) = admin
        .raw(method, path, None, Some(env.bao.root_token()))
        .await
        .unwrap();
    (s.as_u16(), v)
}

/// The wrapped index key of `orders` as stored, if any.
async fn stored_index_key(env: &TestEnv) -> Option<String> {
    let (s, v) = as_root(env, Method::GET, &format!("piiguard-kv/data/{INDEX_KEY}")).await;
    match s {
        404 => None,
        200 => Some(v["data"]["data"]["wrapped"].as_str().unwrap().to_string()),
        other => panic!("reading the index key: HTTP {other}: {v}"),
    }
}

/// Runs `piiguard serve` with the environment's config until it exits (at most 60 s).
fn serve_until_exit(env: &TestEnv) -> (std::process::ExitStatus, String) {
    let cfg = env.dir.path().join("refused.toml");
    let toml = env.config_toml("");
    std::fs::write(&cfg, toml).unwrap();
    let log = env.dir.path().join("refused.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PIIGUARD_AUDIT__DIR", env.audit_dir("refused"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, std::fs::read_to_string(&log).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve started without the index key of \"orders\" (it must refuse); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_without_an_index_key_and_never_creates_one() {
    let env = TestEnv::start().await;
    // Bootstrap made the key.
    let made = stored_index_key(&env).await;
    assert!(made.is_some(), "bootstrap made no index key for \"orders\"");

    // A KV mount that lost it (or a wrong mount that never had it).
    let (s, v) = as_root(
        &env,
        Method::DELETE,
        &format!("piiguard-kv/metadata/{INDEX_KEY}"),
    )
    .await;
    assert!(s == 204 || s == 200, "delete: HTTP {s}: {v}");
    assert_eq!(stored_index_key(&env).await, None);

    // serve refuses, naming the keyspace and the command to run, and writes nothing.
    let (status, log) = serve_until_exit(&env);
    assert!(!status.success(), "serve exited with {status}; log:\n{log}");
    assert!(
        log.contains("keyspace \"orders\" has no index key"),
        "log:\n{log}"
    );
    assert!(log.contains("piiguard bootstrap"), "log:\n{log}");
    assert_eq!(
        stored_index_key(&env).await,
        None,
        "serve created an index key"
    );

    // bootstrap makes it again; a second bootstrap keeps it (a new key would change every
    // subject reference); then serve starts.
    let cfg = piiguard::config::parse(&env.config_toml(""), Vec::new()).unwrap();
    let admin = env.bao.client().unwrap();
    piiguard::setup::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
        .await
        .expect("bootstrap");
    let first = stored_index_key(&env)
        .await
        .expect("bootstrap made it again");
    assert_ne!(
        Some(&first),
        made.as_ref(),
        "a new key, not the deleted one"
    );
    piiguard::setup::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
        .await
        .expect("bootstrap again");
    assert_eq!(stored_index_key(&env).await, Some(first));
    let server = env.server("after-bootstrap", "").await;
    let mut c = env.client(&server, "orders").await;
    c.encrypt(enc("orders", "s-1", "email", b"a@b.example"))
        .await
        .expect("encrypt after bootstrap");
}
