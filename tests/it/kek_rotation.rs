//! KEK rotation (docs/KEYS.md): Keys.RotateKek under a running load, the background rewrap of
//! every wrapped DEK, key status, RetireKekVersions, the rewrap job after a `kill -9`, one
//! replica at a time, and the KEK's auto-rotation period from the config. Real OpenBao, real
//! `piiguard serve` over mTLS; the replica test runs on a real PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use piiguard::pb;
use piiguard::pb::keys_client::KeysClient;
use piiguard::vault::Vault;
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// Fast job settings for tests: poll every second, small batches (several steps even for a
/// few dozen records), a short lease (a dead replica's is taken over quickly), and a short
/// Vault timeout (RetireKekVersions waits 2 × it + 5 s after a rotation).
fn fast_env() -> Vec<(String, String)> {
    [
        ("PIIGUARD_KEK__POLL_SECS", "1"),
        ("PIIGUARD_KEK__BATCH", "5"),
        ("PIIGUARD_KEK__LEASE_SECS", "3"),
        ("PIIGUARD_VAULT__REQUEST_TIMEOUT_SECS", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn with_audit(env: &TestEnv, name: &str, mut vars: Vec<(String, String)>) -> Vec<(String, String)> {
    vars.push((
        "PIIGUARD_AUDIT__DIR".into(),
        env.audit_dir(name).display().to_string(),
    ));
    vars
}

async fn keys(env: &TestEnv, server: &Server) -> KeysClient<Channel> {
    KeysClient::new(env.channel(server, "admin").await)
}

async fn status(k: &mut KeysClient<Channel>, ks: &str) -> pb::GetKeyStatusResponse {
    k.get_key_status(pb::GetKeyStatusRequest {
        keyspace: ks.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Waits (at most 120 s) until the rewrap to `version` has finished.
async fn wait_rewrapped(
    k: &mut KeysClient<Channel>,
    ks: &str,
    version: u32,
) -> pb::GetKeyStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(k, ks).await;
        let r = s.rewrap.clone().unwrap();
        if !r.running && r.target_kek_version == version && !s.counts_scanned_at.is_empty() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "rewrap to v{version} did not finish: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn root(env: &TestEnv) -> Vault {
    env.bao.client().unwrap().with_token(env.bao.root_token())
}

/// KEK version of every wrapped value in Vault for `ks` (index key, DEK records, subject
/// records), read as an operator would, with the root token.
async fn wrapped_versions(env: &TestEnv, ks: &str) -> Vec<u32> {
    wrapped_versions_in(env, ks, &["deks", "subjects"], true).await
}

/// The same, of the records under `prefixes` only (and the index key if `index`).
async fn wrapped_versions_in(env: &TestEnv, ks: &str, prefixes: &[&str], index: bool) -> Vec<u32> {
    let v = root(env);
    let mut paths = Vec::new();
    if index {
        paths.push(format!("keyspaces/{ks}/index-key"));
    }
    for prefix in prefixes {
        for k in env.kv_list(&format!("{prefix}/{ks}")).await {
            paths.push(format!("{prefix}/{ks}/{k}"));
        }
    }
    let mut out = Vec::new();
    for p in paths {
        let Some(e) = v.kv_read(&p, None).await.unwrap() else {
            continue;
        };
        let mut push = |w: &Value| {
            let s = w.as_str().unwrap();
            out.push(piiguard::vault::parse_vault_blob(s).unwrap().0);
        };
        if let Some(vs) = e.data["versions"].as_object() {
            vs.values().for_each(|x| push(&x["wrapped"]));
        } else {
            push(&e.data["wrapped"]);
        }
    }
    out
}

fn old_on_status(s: &pb::GetKeyStatusResponse) -> u64 {
    s.deks_by_kek_version
        .iter()
        .filter(|c| c.kek_version < s.kek_latest_version)
        .map(|c| c.deks)
        .sum()
}

/// RotateKek during a load of Encrypt (new and known subjects) and Decrypt from three tasks:
/// no call fails; the job ends with no wrapped value on the old KEK version (status and Vault
/// agree); RetireKekVersions is refused while a value needs the old version (right after the
/// rotation, and with a planted old-version record) and accepted after; every ciphertext made
/// before or during the rotation decrypts on a restarted server (cold cache: every DEK is
/// unwrapped by Vault with the old version retired). Also: `kek_rotate_days` of the config
/// reaches the KEK's `auto_rotate_period` in Vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_under_load_loses_nothing_and_retires_after_the_rewrap() {
    let env = TestEnv::start().await;
    let mut server = env
        .server_custom("kek", "", with_audit(&env, "kek", fast_env()), |t| {
            t.replace(
                "[keyspaces.orders]\n",
                "[keyspaces.orders]\nkek_rotate_days = 7\n",
            )
        })
        .await;
    let mut k = keys(&env, &server).await;
    let mut c = env.client(&server, "orders").await;

    // The config's rotation period reached Vault (bootstrap had set the 90-day default).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = root(&env).kek_info("kek-orders").await.unwrap();
        if info.auto_rotate_period_secs == 7 * 86_400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto_rotate_period not applied: {info:?}\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Subjects before the rotation; the first scan counts them on KEK v1.
    let mut cts: Vec<Vec<u8>> = Vec::new();
    for i in 0..24 {
        let r = c
            .encrypt(enc(
                "orders",
                &format!("kek-{i}"),
                "email",
                format!("p{i}@example.com").as_bytes(),
            ))
            .await
            .unwrap();
        cts.push(r.into_inner().ciphertext);
    }
    let s = wait_rewrapped(&mut k, "orders", 1).await;
    let on_v1 = s
        .deks_by_kek_version
        .iter()
        .find(|c| c.kek_version == 1)
        .unwrap()
        .deks;
    assert_eq!(on_v1, 25, "24 DEKs and the index key: {s:?}");
    assert_eq!(s.subjects, 24);

    // The load: each task encrypts a new subject, a known one, and decrypts a known ciphertext.
    let failures = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let mut tasks = Vec::new();
    for t in 0..3 {
        let mut c = env.client(&server, "orders").await;
        let (failures, calls, stop, made, cts) = (
            failures.clone(),
            calls.clone(),
            stop.clone(),
            made.clone(),
            cts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            // Bounded: at most 2 minutes or until stopped.
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let new = c
                    .encrypt(enc(
                        "orders",
                        &format!("load-{t}-{i}"),
                        "email",
                        b"x@example.com",
                    ))
                    .await;
                let known = c
                    .encrypt(enc(
                        "orders",
                        &format!("kek-{}", i % 24),
                        "email",
                        b"y@example.com",
                    ))
                    .await;
                let d = c.decrypt(dec("email", &cts[i % cts.len()])).await;
                for r in [new.as_ref().err(), known.as_ref().err(), d.as_ref().err()] {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if let Some(e) = r {
                        eprintln!("failed call during the rotation: {e:?}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if let Ok(r) = new {
                    made.lock().unwrap().push(r.into_inner().ciphertext);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = k
        .rotate_kek(pb::RotateKekRequest {
            keyspace: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.new_version, 2);
    assert!(r.to_rewrap >= 25, "{r:?}");
    // Refused right away: the job has not run (and v2 is too new for wraps in flight).
    let e = k
        .retire_kek_versions(pb::RetireKekVersionsRequest {
            keyspace: "orders".into(),
            min_decryption_version: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "KEK_VERSION_IN_USE");

    let s = wait_rewrapped(&mut k, "orders", 2).await;
    // Keep the load going a little past the rewrap, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "calls failed during the rotation"
    );
    assert!(calls.load(Ordering::SeqCst) >= 30, "the load ran");
    assert_eq!(old_on_status(&s), 0, "status: DEKs left on v1: {s:?}");
    assert!(
        s.deks_by_kek_version
            .iter()
            .any(|c| c.kek_version == 2 && c.deks >= 25)
    );
    let versions = wrapped_versions(&env, "orders").await;
    assert!(versions.len() > 2 * 24, "{versions:?}");
    assert!(
        versions.iter().all(|v| *v == 2),
        "Vault still holds v1 wraps: {versions:?}"
    );

    // A planted record wrapped by v1 (as a replica's in-flight write would be): refused, and
    // nothing changed in Vault; accepted once it is gone.
    let v = root(&env);
    let planted = "deks/orders/00000000000000000000000000000000";
    assert!(v.kv_read(planted, None).await.unwrap().is_none());
    // A wrap by v1 from before the rotation: the index key's first KV version.
    let e = v
        .kv_read("keyspaces/orders/index-key", Some(1))
        .await
        .unwrap()
        .unwrap();
    let wrapped_v1 = e.data["wrapped"].as_str().unwrap().to_string();
    assert!(wrapped_v1.starts_with("vault:v1:"));
    let data = serde_json::json!({
        "format": 2, "subject_ref": "00", "alg": "aes-256-gcm", "created_at": 1, "current": 1,
        "versions": {"1": {"wrapped": wrapped_v1, "created_at": 1}}
    });
    v.kv_write_cas(planted, &data, 0).await.unwrap();
    // Wait until v2 is old enough that only the planted record can be the reason.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let e = k
        .retire_kek_versions(pb::RetireKekVersionsRequest {
            keyspace: "orders".into(),
            min_decryption_version: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "KEK_VERSION_IN_USE");
    assert!(e.message().contains("1 wrapped DEK"), "{}", e.message());
    assert_eq!(
        root(&env)
            .kek_info("kek-orders")
            .await
            .unwrap()
            .min_decryption_version,
        1
    );
    v.kv_delete_metadata(planted).await.unwrap();
    let r = k
        .retire_kek_versions(pb::RetireKekVersionsRequest {
            keyspace: "orders".into(),
            min_decryption_version: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.min_decryption_version, 2);
    assert_eq!(
        root(&env)
            .kek_info("kek-orders")
            .await
            .unwrap()
            .min_decryption_version,
        2
    );
    let st = status(&mut k, "orders").await;
    assert_eq!(st.kek_min_decryption_version, 2);
    // The DEK usage counts: the configured limit (default 2^30), and the most used version has
    // at least one reserved block.
    assert_eq!(st.dek_use_limit, 1 << 30);
    assert!(st.max_dek_uses > 0, "{:?}", st.max_dek_uses);

    // A restart empties the cache: every ciphertext, from before and during the rotation,
    // decrypts with DEKs unwrapped by Vault, v1 retired.
    server.stop();
    server.start().await;
    let mut c = env.client(&server, "orders").await;
    let during = made.lock().unwrap().clone();
    assert!(!during.is_empty());
    for ct in cts.iter().chain(during.iter()) {
        c.decrypt(dec("email", ct)).await.unwrap();
    }
    // Invalid requests: a clear error, nothing changed.
    let mut k = keys(&env, &server).await;
    for bad in [0, 3] {
        let e = k
            .retire_kek_versions(pb::RetireKekVersionsRequest {
                keyspace: "orders".into(),
                min_decryption_version: bad,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
    }
    let e = k
        .rotate_kek(pb::RotateKekRequest {
            keyspace: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "UNKNOWN_KEYSPACE");
    // The orders service may not rotate keys.
    let mut denied = KeysClient::new(env.channel(&server, "orders").await);
    let e = denied
        .rotate_kek(pb::RotateKekRequest {
            keyspace: "orders".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "POLICY_DENIED");
    assert_eq!(
        root(&env)
            .kek_info("kek-orders")
            .await
            .unwrap()
            .latest_version,
        2
    );
    server.stop();
}

/// A KEK rotated by Vault itself (as `auto_rotate_period` does) is found by polling; the job
/// is killed with SIGKILL after its first batch of subject records (each holding its subject's
/// only DEK: none was rotated); after a restart, with a second
/// replica on the same PostgreSQL store, exactly one replica resumes the job after the saved
/// key (not from the start) and it ends with no wrapped value on the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rewrap_resumes_after_kill_9_on_one_replica_only() {
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let mut a = env
        .server_env("a", "", with_audit(&env, "a", fast_env()))
        .await;
    let mut c = env.client(&a, "orders").await;
    let mut cts = Vec::new();
    for i in 0..30 {
        cts.push(
            c.encrypt(enc(
                "orders",
                &format!("kill-{i}"),
                "email",
                b"k@example.com",
            ))
            .await
            .unwrap()
            .into_inner()
            .ciphertext,
        );
    }
    let mut k = keys(&env, &a).await;
    wait_rewrapped(&mut k, "orders", 1).await;
    a.stop();

    // Vault rotates the KEK on its own; a replica that pauses after its first batch finds it.
    let v = root(&env);
    assert_eq!(v.rotate_kek("kek-orders").await.unwrap().latest_version, 2);
    let mut vars = fast_env();
    vars.push((
        "PIIGUARD_FAILPOINT".into(),
        "pause:kek-rewrap-after-batch".into(),
    ));
    let dir = env.dir.path().join("fp-kek");
    std::fs::create_dir_all(&dir).unwrap();
    vars.push(("PIIGUARD_FAILPOINT_DIR".into(), dir.display().to_string()));
    a.set_env(with_audit(&env, "a", vars));
    a.start().await;
    wait_reached(&dir, "kek-rewrap-after-batch").await;
    let mut k = keys(&env, &a).await;
    let s = status(&mut k, "orders").await;
    let r = s.rewrap.clone().unwrap();
    assert!(
        r.running && r.target_kek_version == 2 && r.done > 0 && r.remaining > 0,
        "{s:?}"
    );
    let part = wrapped_versions(&env, "orders").await;
    assert!(part.contains(&1) && part.contains(&2), "{part:?}");
    // The status counts what Vault holds: the subjects made after the last scan are on the
    // old version until the run moves them (they were once counted on the new one at once).
    // Subjects never rotated: their subject records hold their only DEK (no DEK records).
    let deks = wrapped_versions_in(&env, "orders", &["subjects"], false).await;
    let on_old = deks.iter().filter(|v| **v == 1).count() as u64;
    assert!(on_old >= 20, "{deks:?}");
    assert!(
        old_on_status(&s) >= on_old - 2 && old_on_status(&s) <= on_old + 2,
        "status {} on the old version, Vault {on_old}: {s:?}",
        old_on_status(&s)
    );
    std::process::Command::new("kill")
        .args(["-KILL", &a.pid().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.exited() {
        assert!(Instant::now() < deadline, "process did not die");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two replicas: the restarted one and a second one.
    a.set_env(with_audit(&env, "a", fast_env()));
    a.start().await;
    let mut b = env
        .server_env("b", "", with_audit(&env, "b", fast_env()))
        .await;
    let mut k = keys(&env, &b).await;
    let s = wait_rewrapped(&mut k, "orders", 2).await;
    assert_eq!(old_on_status(&s), 0, "{s:?}");
    let versions = wrapped_versions(&env, "orders").await;
    assert!(versions.iter().all(|v| *v == 2), "{versions:?}");
    // Exactly one replica ran the resumed job, and it resumed after the saved key.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|s| {
            s.log_text()
                .lines()
                .filter(|l| {
                    l.contains("KEK rewrap run began") && l.contains(r#""keyspace":"orders""#)
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    // The killed run's first line is in a's log too (same log file across restarts).
    let resumed: Vec<&String> = runs.iter().filter(|l| l.contains("subjects/")).collect();
    assert_eq!(resumed.len(), 1, "one replica resumed the job: {runs:#?}");
    assert_eq!(
        runs.len(),
        3,
        "first scan, killed run, resumed run: {runs:#?}"
    );
    // Every ciphertext decrypts on both replicas (cold caches).
    for s in [&a, &b] {
        let mut c = env.client(s, "orders").await;
        for ct in &cts {
            c.decrypt(dec("email", ct)).await.unwrap();
        }
    }
    // The command line: rotate with progress until the rewrap ends, then the status.
    let (cert, key) = env.pki.client("admin");
    let conn = |cmd: &[&str]| {
        let mut args: Vec<String> = vec!["keys".into(), "--endpoint".into(), b.addr.to_string()];
        for (f, p) in [("--ca", &env.pki.ca), ("--cert", &cert), ("--key", &key)] {
            args.push(f.into());
            args.push(p.display().to_string());
        }
        args.extend(cmd.iter().map(|x| x.to_string()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(&args)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let out = conn(&["rotate-kek", "orders", "--wait", "--every", "1"]);
    assert!(out.contains("KEK of orders is now version 3"), "{out}");
    assert!(
        out.contains("rewrap to KEK v3") && out.contains("finished"),
        "{out}"
    );
    let out = conn(&["status", "orders"]);
    assert!(out.contains("latest version 3"), "{out}");
    assert!(
        out.contains("  v3\t31"),
        "30 DEKs and the index key on v3:\n{out}"
    );
    a.stop();
    b.stop();
}

/// A store restored from a backup older than Vault lacks the key ids of subjects created
/// since (a subject never rotated is found by key id only through the registry): a Decrypt on
/// a cold cache answers UNKNOWN_KEY. The KEK rewrap scan, which reads every subject record,
/// records them again; after a `RotateKek` the data decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_rewrap_scan_re_records_key_ids_a_restored_store_lacks() {
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let mut a = env.server_env("a", "", fast_env()).await;
    let mut c = env.client(&a, "orders").await;
    let mut cts = Vec::new();
    for s in ["restored-1", "restored-2", "restored-3"] {
        cts.push(
            c.encrypt(enc("orders", s, "email", s.as_bytes()))
                .await
                .unwrap()
                .into_inner()
                .ciphertext,
        );
    }
    let mut k = keys(&env, &a).await;
    wait_rewrapped(&mut k, "orders", 1).await;
    a.stop();
    // The "restore": one subject's row gone, one without its key id.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&pg.url).await.unwrap();
    let rows: Vec<String> = sqlx::query("SELECT subject_ref FROM subjects ORDER BY subject_ref")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get::<String, _>(r, "subject_ref"))
        .collect();
    assert_eq!(rows.len(), 3);
    sqlx::query("DELETE FROM subjects WHERE subject_ref = $1")
        .bind(&rows[0])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE subjects SET key_id = NULL WHERE subject_ref = $1")
        .bind(&rows[1])
        .execute(&pool)
        .await
        .unwrap();

    let b = env.server_env("b", "", fast_env()).await;
    let mut cb = env.client(&b, "orders").await;
    let mut unknown = 0;
    for ct in &cts {
        if let Err(e) = cb.decrypt(dec("email", ct)).await {
            assert_eq!(reason(&e), "UNKNOWN_KEY", "{e:?}");
            unknown += 1;
        }
    }
    assert_eq!(unknown, 2, "the two subjects the registry lost");

    let mut k = keys(&env, &b).await;
    k.rotate_kek(pb::RotateKekRequest {
        keyspace: "orders".into(),
    })
    .await
    .unwrap();
    wait_rewrapped(&mut k, "orders", 2).await;
    let with_key: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM subjects WHERE keyspace = 'orders' AND key_id IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .map(|r| sqlx::Row::get(&r, "n"))
    .unwrap();
    assert_eq!(with_key, 3);
    let fresh = env.server_env("c", "", fast_env()).await;
    let mut cc = env.client(&fresh, "orders").await;
    for (ct, s) in cts.iter().zip(["restored-1", "restored-2", "restored-3"]) {
        let pt = cc.decrypt(dec("email", ct)).await.unwrap().into_inner();
        assert_eq!(pt.plaintext, s.as_bytes());
    }
}

/// Waits (at most 60 s) until every wrapped value of `orders` in Vault is on KEK `version`
/// (the rewrap run has been through every record it listed).
async fn wait_all_on(env: &TestEnv, version: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = wrapped_versions(env, "orders").await;
        if v.iter().all(|x| *x == version) {
            return;
        }
        assert!(Instant::now() < deadline, "not all on v{version}: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new subject whose DEK was wrapped with the old KEK version just before a rotation, and
/// whose record lands after the rewrap job listed the keyspace: the job waits out the
/// in-flight bound before it reports the run finished, lists again and rewraps it. (Before:
/// the run finished with that value on the old version, and the status said none was left;
/// `kek_rotation_under_load` caught it now and then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_lands_after_the_listing_is_rewrapped_before_the_run_ends() {
    const POINT: &str = "create-after-wrap";
    let env = TestEnv::start().await;
    let (server, dir) = env
        .paused_server("late", POINT, with_audit(&env, "late", fast_env()))
        .await;
    let mut k = keys(&env, &server).await;
    wait_rewrapped(&mut k, "orders", 1).await;
    let mut c = env.client(&server, "orders").await;
    let late = tokio::spawn(async move {
        c.encrypt(enc("orders", "cust-late", "email", b"late@example.com"))
            .await
            .map(|r| r.into_inner().ciphertext)
    });
    wait_reached(&dir, POINT).await;
    k.rotate_kek(pb::RotateKekRequest {
        keyspace: "orders".into(),
    })
    .await
    .unwrap();
    // The run for version 2 has been through everything it listed.
    wait_all_on(&env, 2).await;
    release(&dir, POINT);
    let ct = late.await.unwrap().unwrap();
    let s = wait_rewrapped(&mut k, "orders", 2).await;
    let versions = wrapped_versions(&env, "orders").await;
    assert!(versions.iter().all(|v| *v == 2), "{versions:?} {s:?}");
    assert_eq!(old_on_status(&s), 0, "{s:?}");
    let mut c = env.client(&server, "orders").await;
    c.decrypt(dec("email", &ct)).await.unwrap();
}

/// A subject key rotation whose new DEK was wrapped with the old KEK version, and whose DEK
/// record the rewrap job rewrote meanwhile: its check-and-set fails, and it wraps again (with
/// the latest version) instead of adding the old-version value the job has already passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_loses_to_the_rewrap_wraps_its_new_dek_again() {
    const POINT: &str = "rotate-before-dek-record-write";
    let env = TestEnv::start().await;
    let mut vars = with_audit(&env, "rot", fast_env());
    vars.push((
        "PIIGUARD_FAILPOINT".into(),
        format!("pause:{POINT},flag:dek-record-at-creation"),
    ));
    let (server, dir) = env.paused_server("rot", POINT, vars).await;
    let mut k = keys(&env, &server).await;
    let mut c = env.client(&server, "orders").await;
    let ct = c
        .encrypt(enc("orders", "cust-rot", "email", b"rot@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    wait_rewrapped(&mut k, "orders", 1).await;
    let mut k2 = keys(&env, &server).await;
    let rotation = tokio::spawn(async move {
        k2.rotate_subject_key(pb::RotateSubjectKeyRequest {
            keyspace: "orders".into(),
            subject: "cust-rot".into(),
        })
        .await
    });
    wait_reached(&dir, POINT).await;
    k.rotate_kek(pb::RotateKekRequest {
        keyspace: "orders".into(),
    })
    .await
    .unwrap();
    wait_all_on(&env, 2).await;
    release(&dir, POINT);
    rotation.await.unwrap().unwrap();
    wait_rewrapped(&mut k, "orders", 2).await;
    let versions = wrapped_versions(&env, "orders").await;
    assert!(versions.iter().all(|v| *v == 2), "{versions:?}");
    c.decrypt(dec("email", &ct)).await.unwrap();
}
