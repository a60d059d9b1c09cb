//! The audit log of a real server: one record per call, hash chain, signed checkpoints,
//! rotation, crash and restart, fail closed, and `verify` against every kind of tampering.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::audit::verify::{Options, Report, verify_files};
use serde_json::Value;
use tonic::Code;

fn env_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until a record matching `pred` is in the server's audit files.
async fn wait_for_record(server: &Server, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = server.audit_records().into_iter().find(|r| pred(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} record in the audit log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_files(files: &[PathBuf], to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    files
        .iter()
        .map(|f| {
            let d = to.join(f.file_name().unwrap());
            std::fs::copy(f, &d).unwrap();
            d
        })
        .collect()
}

fn lines(f: &Path) -> Vec<String> {
    std::fs::read_to_string(f)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(f: &Path, l: &[String]) {
    std::fs::write(f, l.join("\n") + "\n").unwrap();
}

fn errors(r: &Report) -> String {
    r.errors()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn findings(r: &Report) -> String {
    r.findings
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Re-hashes lines `from..` of a file so that the chain is consistent again (what a careful
/// forger would do), optionally also fixing the `covers_hash` of checkpoints.
fn rechain(l: &mut [String], from: usize, fix_checkpoints: bool) {
    use std::collections::HashMap;
    let mut prev = {
        let v: Value = serde_json::from_str(&l[from - 1]).unwrap();
        v["hash"].as_str().unwrap().to_string()
    };
    let mut new_hash: HashMap<u64, String> = HashMap::new();
    for line in l.iter_mut().skip(from) {
        let mut v: Value = serde_json::from_str(line).unwrap();
        v.as_object_mut().unwrap().remove("hash");
        v["prev"] = Value::String(prev.clone());
        if fix_checkpoints
            && let Some(c) = v["covers_seq"].as_u64()
            && let Some(h) = new_hash.get(&c)
        {
            v["covers_hash"] = Value::String(h.clone());
        }
        let body = serde_json::to_vec(&v).unwrap();
        let (sealed, h) = piiguard::audit::seal_line(&body);
        prev = hex::encode(h);
        new_hash.insert(v["seq"].as_u64().unwrap(), prev.clone());
        *line = String::from_utf8(sealed).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_checkpoints_and_verify_detects_each_kind_of_tampering() {
    let env = TestEnv::start().await;
    let mut server = env
        .server_env("a", "", env_of(&[("PIIGUARD_AUDIT__CHECKPOINT_SECS", "1")]))
        .await;
    let mut c = env.client(&server, "orders").await;
    let mut shipping = env.client(&server, "shipping").await;
    let ct = c
        .encrypt(enc("orders", "cust-a1", "address", b"1 Main St"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    for _ in 0..5 {
        c.decrypt(dec("address", &ct)).await.unwrap();
    }
    assert_eq!(
        shipping
            .encrypt(enc("orders", "cust-a1", "address", b"x"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // A signed checkpoint appears while the server runs.
    let cp = wait_for_record(&server, "checkpoint", |r| r["kind"] == "checkpoint").await;
    assert!(cp["signature"].as_str().unwrap().len() > 300);
    for _ in 0..5 {
        c.decrypt(dec("address", &ct)).await.unwrap();
    }

    // One record per call, with the fields the issue lists and no request content.
    let recs = server.audit_records();
    let calls: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "call").collect();
    assert_eq!(calls.len(), 12, "{calls:#?}");
    let e = calls[0];
    assert_eq!(e["method"], "Encrypt");
    assert_eq!(e["operation"], "encrypt");
    assert_eq!(e["caller"], "spiffe://shop.local/orders");
    assert_eq!(e["keyspace"], "orders");
    assert_eq!(e["field"], "address");
    assert_eq!(e["outcome"], "ok");
    assert_eq!(e["code"], "OK");
    assert_eq!(e["subject_ref"].as_str().unwrap().len(), 64);
    assert_eq!(e["correlation_id"].as_str().unwrap().len(), 16);
    assert!(e["latency_us"].as_u64().is_some());
    assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    let d = calls[1];
    assert_eq!(d["method"], "Decrypt");
    assert_eq!(d["key_id"], e["key_id"], "decrypt names the same key id");
    let denied = calls
        .iter()
        .find(|r| r["outcome"] == "denied")
        .expect("denial audited");
    assert_eq!(denied["caller"], "spiffe://shop.local/shipping");
    assert_eq!(denied["reason"], "POLICY_DENIED");
    assert_eq!(denied["code"], "PERMISSION_DENIED");
    assert!(recs.iter().any(|r| r["event"] == "start"));

    // Verifying a running server's log: the chain is fine, the tail is (rightly) open.
    let keys = env.signing_public_keys().await;
    let live = verify_files(
        &server.audit_files(),
        &Options {
            public_keys: keys.clone(),
            ..Options::default()
        },
    );
    assert!(!live.ok() && live.open_tail() && !live.tampered());
    assert!(findings(&live).contains("open tail"), "{}", findings(&live));
    let live_ok = verify_files(
        &server.audit_files(),
        &Options {
            public_keys: keys.clone(),
            allow_open_tail: true,
            ..Options::default()
        },
    );
    assert!(live_ok.ok(), "{}", errors(&live_ok));

    // The signing keys, as an administrator gets them (CLI over mTLS).
    let (cert, key) = env.pki.client("admin");
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .arg("admin")
        .args(["--address", &server.addr.to_string()])
        .arg("--ca")
        .arg(&env.pki.ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("signing-keys")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = env.dir.path().join("signing.pem");
    std::fs::write(&pem, &out.stdout).unwrap();

    // Clean stop: `stop` event and a final seal; the whole log verifies.
    server.stop();
    let files = server.audit_files();
    let opts = Options {
        public_keys: keys.clone(),
        ..Options::default()
    };
    let clean = verify_files(&files, &opts);
    assert!(clean.ok(), "{}", errors(&clean));
    assert!(clean.checkpoints_verified >= 2, "{clean:?}");
    let all = server.audit_records();
    assert_eq!(all.last().unwrap()["final_seal"], true);
    assert!(all.iter().any(|r| r["event"] == "stop"));

    // The CLI agrees, with the public key file from `piiguard admin signing-keys`.
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify", "--public-key"])
        .arg(&pem)
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": OK"), "{text}");

    // Tampering, each on a fresh copy. The file has one segment here.
    assert_eq!(files.len(), 1);
    let orig = lines(&files[0]);
    let n = orig.len();
    let mid = orig
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"method\":\"Decrypt\"") && l.contains("\"outcome\":\"ok\""))
        .nth(2)
        .unwrap()
        .0;
    assert!(mid + 3 < n);
    let case = |name: &str, f: &dyn Fn(&mut Vec<String>)| -> (Report, PathBuf) {
        let dir = env.dir.path().join(format!("tamper-{name}"));
        let copy = copy_files(&files, &dir);
        let mut l = orig.clone();
        f(&mut l);
        write_lines(&copy[0], &l);
        (verify_files(&copy, &opts), copy[0].clone())
    };
    let at = |file: &Path, line: usize| format!("{}:{line}", file.display());

    let (r, f) = case("edit", &|l| {
        l[mid] = l[mid].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
    });
    let e = errors(&r);
    assert!(!r.ok() && e.contains("record edited"), "{e}");
    assert!(e.contains(&at(&f, mid + 1)), "edit located: {e}");

    let (r, f) = case("delete", &|l| {
        l.remove(mid);
    });
    let e = errors(&r);
    assert!(!r.ok() && e.contains("records missing"), "{e}");
    assert!(e.contains(&at(&f, mid + 1)), "deletion located: {e}");

    let (r, f) = case("insert", &|l| {
        let dup = l[mid].clone();
        l.insert(mid + 1, dup);
    });
    let e = errors(&r);
    assert!(!r.ok() && e.contains("inserted"), "{e}");
    assert!(e.contains(&at(&f, mid + 2)), "insertion located: {e}");

    let (r, f) = case("reorder", &|l| l.swap(mid, mid + 1));
    let e = errors(&r);
    assert!(!r.ok(), "reorder undetected");
    assert!(e.contains(&at(&f, mid + 1)), "reorder located: {e}");

    let (r, _) = case("truncate", &|l| l.truncate(n - 3));
    let e = findings(&r);
    assert!(r.open_tail() && e.contains("open tail"), "{e}");
    assert!(e.contains(&format!("ends at seq {}", n - 3)), "{e}");

    // A forger who re-hashes the whole chain after an edit is caught by the checkpoints...
    let (r, _) = case("rechain", &|l| {
        l[mid] = l[mid].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
        rechain(l, mid, false);
    });
    let e = errors(&r);
    assert!(!r.ok() && e.contains("were rewritten"), "{e}");
    // ... and one who also rewrites what the checkpoints cover, by their signatures.
    let (r, _) = case("rechain-sig", &|l| {
        l[mid] = l[mid].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
        rechain(l, mid, true);
    });
    let e = errors(&r);
    assert!(!r.ok() && e.contains("signature does not verify"), "{e}");
    // Without the public key the chain alone cannot tell: verify refuses to say OK unless
    // asked explicitly, and then says so loudly.
    let copy = {
        let dir = env.dir.path().join("tamper-nokey");
        let copy = copy_files(&files, &dir);
        let mut l = orig.clone();
        l[mid] = l[mid].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
        rechain(&mut l, mid, true);
        write_lines(&copy[0], &l);
        copy
    };
    let r = verify_files(&copy, &Options::default());
    assert!(r.tampered() && errors(&r).contains("no public key given"));
    let r = verify_files(
        &copy,
        &Options {
            no_signature_check: true,
            ..Options::default()
        },
    );
    assert!(r.ok() && findings(&r).contains("SIGNATURES NOT CHECKED"));
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify"])
        .args(&copy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no key, no flag: a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-signature-check"));

    // The CLI fails on a tampered file and names the line (even with only the chain checked).
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify", "--no-signature-check"])
        .arg(
            env.dir
                .path()
                .join("tamper-edit")
                .join(files[0].file_name().unwrap()),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(":{} (", mid + 1))
            && text.contains("FAILED")
            && text.contains("SIGNATURES NOT CHECKED"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGNATURES NOT CHECKED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_crash_restart_and_fail_closed() {
    let env = TestEnv::start().await;
    let small = env_of(&[
        ("PIIGUARD_AUDIT__ROTATE_BYTES", "2048"),
        ("PIIGUARD_AUDIT__CHECKPOINT_SECS", "1"),
    ]);
    let mut server = env.server_env("r", "", small.clone()).await;
    let mut c = env.client(&server, "orders").await;
    for i in 0..20 {
        c.encrypt(enc("crm", &format!("cust-r{i}"), "email", b"r@example.com"))
            .await
            .unwrap();
    }
    wait_for_record(&server, "checkpoint", |r| r["kind"] == "checkpoint").await;
    // Crash: no final seal.
    let pid = server.pid();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    server.stop();
    server.start().await;
    let mut c = env.client(&server, "orders").await;
    for i in 0..5 {
        c.encrypt(enc("crm", &format!("cust-s{i}"), "email", b"s@example.com"))
            .await
            .unwrap();
    }
    let files = server.audit_files();
    assert!(files.len() >= 3, "rotation made several files: {files:?}");
    let recs = server.audit_records();
    let restart = recs
        .iter()
        .find(|r| r["kind"] == "segment_start" && r["prev_clean"] == false)
        .expect("the restart records the unclean end of the previous run");
    assert!(
        restart["detail"]
            .as_str()
            .unwrap()
            .contains("without a final checkpoint")
    );

    // Fail closed: the audit folder becomes unwritable (replaced by a file), so the next
    // rotation fails; data calls are refused with UNAVAILABLE / AUDIT_UNAVAILABLE.
    let moved = env.dir.path().join("audit-r.moved");
    std::fs::rename(&server.audit_dir, &moved).unwrap();
    std::fs::write(&server.audit_dir, b"not a folder").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match c
            .encrypt(enc("crm", "cust-f", "email", b"f@example.com"))
            .await
        {
            Ok(_) => {}
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline, "calls never failed closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused), "AUDIT_UNAVAILABLE");
    assert!(server.log_text().contains("audit_unavailable"));

    // The folder comes back: writing resumes, calls succeed again, the chain continues.
    std::fs::remove_file(&server.audit_dir).unwrap();
    std::fs::create_dir(&server.audit_dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .encrypt(enc("crm", "cust-g", "email", b"g@example.com"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "calls never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop();
    let mut all = piiguard::audit::writer::list_files(&moved);
    all.extend(server.audit_files());
    let opts = Options {
        public_keys: env.signing_public_keys().await,
        ..Options::default()
    };
    let r = verify_files(&all, &opts);
    assert!(r.ok(), "{}", errors(&r));
    // verify reports the crash (warning) and where.
    assert!(
        r.findings.iter().any(|f| f
            .message
            .contains("previous file ended without a final checkpoint")),
        "{:?}",
        r.findings
    );
    let records: Vec<Value> = all
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "alarm" && r["event"] == "audit_unavailable")
    );
    assert!(records.iter().any(|r| r["event"] == "audit_recovered"));

    // A whole file missing from the middle is found.
    let mut gap = all.clone();
    gap.remove(1);
    let r = verify_files(&gap, &opts);
    assert!(errors(&r).contains("records missing"), "{}", errors(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_files_and_verify_notes_the_cut() {
    let env = TestEnv::start().await;
    let short = env_of(&[
        ("PIIGUARD_AUDIT__RETENTION_DAYS", "1"),
        ("PIIGUARD_AUDIT__ALLOW_RETENTION_UNDER_90_DAYS", "true"),
    ]);
    let mut server = env.server_env("t", "", short.clone()).await;
    let mut c = env.client(&server, "orders").await;
    c.encrypt(enc("crm", "cust-t", "email", b"t@example.com"))
        .await
        .unwrap();
    server.stop();
    let first = server.audit_files();
    assert_eq!(first.len(), 1);
    // Make the first file three days old; the next start prunes it.
    let st = Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(&first[0])
        .status()
        .unwrap();
    assert!(st.success());
    server.start().await;
    wait_for_record(&server, "audit_retention", |r| {
        r["event"] == "audit_retention"
    })
    .await;
    assert!(!first[0].exists(), "old file removed");
    server.stop();
    let r = verify_files(
        &server.audit_files(),
        &Options {
            public_keys: env.signing_public_keys().await,
            ..Options::default()
        },
    );
    assert!(r.ok(), "{}", errors(&r));
    assert!(
        r.findings
            .iter()
            .any(|f| f.message.contains("not at its beginning")),
        "{:?}",
        r.findings
    );

    // Under 90 days without the override: refused before binding any port (exit 78).
    let cfg = env.dir.path().join("t.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PIIGUARD_AUDIT__RETENTION_DAYS", "30")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("under the 90 days"));
}

/// Checkpoints in a server's audit files.
fn checkpoint_count(server: &Server) -> usize {
    server
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "checkpoint")
        .count()
}

async fn wait_checkpoints(server: &Server, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while checkpoint_count(server) < n {
        assert!(Instant::now() < deadline, "fewer than {n} checkpoints");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// Re-numbers and re-hashes lines `from..` of a file after `before` (the line before the first
/// one, from this file or the previous one): what a forger does after moving or adding lines.
fn reseal(l: &mut [String], from: usize, before: &str) {
    let before = parse(before);
    let mut prev = before["hash"].as_str().unwrap().to_string();
    let mut seq = before["seq"].as_u64().unwrap();
    for line in l.iter_mut().skip(from) {
        let mut v = parse(line);
        v.as_object_mut().unwrap().remove("hash");
        seq += 1;
        v["seq"] = seq.into();
        v["prev"] = Value::String(prev.clone());
        let (sealed, h) = piiguard::audit::seal_line(&serde_json::to_vec(&v).unwrap());
        prev = hex::encode(h);
        *line = String::from_utf8(sealed).unwrap();
    }
}

/// Finding 1 of the security review: every way of cutting, re-sealing, dropping, reordering or
/// replaying a real server's log fails verification (with the signing keys, and with the
/// anchor the server recorded in its store where the log was shortened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_on_cut_resealed_dropped_deleted_reordered_and_replayed_logs() {
    let env = TestEnv::start().await;
    let mut server = env
        .server_env(
            "v",
            "",
            env_of(&[
                ("PIIGUARD_AUDIT__CHECKPOINT_SECS", "1"),
                ("PIIGUARD_AUDIT__ROTATE_BYTES", "4096"),
            ]),
        )
        .await;
    // Two runs, each with several checkpoints and files, each stopped cleanly.
    for run in 0..2 {
        if run == 1 {
            server.start().await;
        }
        let mut c = env.client(&server, "orders").await;
        let ct = c
            .encrypt(enc(
                "orders",
                &format!("cust-v{run}"),
                "address",
                b"1 Main St",
            ))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        for _ in 0..3 {
            let before = checkpoint_count(&server);
            for _ in 0..6 {
                c.decrypt(dec("address", &ct)).await.unwrap();
            }
            wait_checkpoints(&server, before + 1).await;
        }
        for _ in 0..3 {
            c.decrypt(dec("address", &ct)).await.unwrap();
        }
        server.stop();
    }
    let files = server.audit_files();
    assert!(files.len() >= 4, "rotation made several files: {files:?}");
    let keys = env.signing_public_keys().await;
    let pem = env.dir.path().join("signing-v.pem");
    std::fs::write(&pem, keys.concat()).unwrap();
    let records = server.audit_records();
    let instance = records[0]["instance"].as_str().unwrap().to_string();

    // What the writer wrote: v2 checkpoints, each right after what it covers and naming the
    // one before; the newest (the final seal) anchored in the store.
    let cps: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "checkpoint")
        .collect();
    assert!(cps.len() >= 8, "{}", cps.len());
    for c in &cps {
        assert_eq!(c["message"], "piiguard-audit-checkpoint-v2");
        assert_eq!(
            c["covers_seq"].as_u64().unwrap() + 1,
            c["seq"].as_u64().unwrap()
        );
    }
    for w in cps.windows(2) {
        assert_eq!(w[1]["prev_checkpoint"], w[0]["seq"]);
    }
    let store = piiguard::store::Store::open(&env.store_url).await.unwrap();
    let anchor = store
        .audit_anchor(&instance)
        .await
        .unwrap()
        .expect("the newest checkpoint is anchored in the store");
    let last = records.last().unwrap();
    assert_eq!(last["final_seal"], true);
    assert_eq!(anchor.checkpoint_seq, last["seq"].as_u64().unwrap());
    assert!(anchor.final_seal);

    let opts = |with_anchor: bool, allow_open_tail: bool| Options {
        public_keys: keys.clone(),
        allow_open_tail,
        anchor: with_anchor.then(|| anchor.clone()),
        ..Options::default()
    };
    let intact = verify_files(&files, &opts(true, false));
    assert!(intact.ok() && intact.sealed, "{}", findings(&intact));
    let cli = |dir: &Path, extra: &[&str]| -> (Option<i32>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["audit", "verify", "--public-key"])
            .arg(&pem)
            .arg("--anchor-from-config")
            .arg(&server.config)
            .args(extra)
            .arg(dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = cli(&server.audit_dir, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("anchor checked: OK"), "{text}");

    // Each tampering on a copy of the folder; an emptied file is a deleted file.
    let originals: Vec<Vec<String>> = files.iter().map(|f| lines(f)).collect();
    let tamper = |name: &str, edit: &dyn Fn(&mut Vec<Vec<String>>)| -> PathBuf {
        let dir = env.dir.path().join(format!("tamper-v-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut l = originals.clone();
        edit(&mut l);
        for (f, l) in files.iter().zip(&l) {
            if !l.is_empty() {
                write_lines(&dir.join(f.file_name().unwrap()), l);
            }
        }
        dir
    };
    let check = |dir: &Path, with_anchor: bool, allow_open_tail: bool| {
        verify_files(
            &piiguard::audit::writer::list_files(dir),
            &opts(with_anchor, allow_open_tail),
        )
    };
    // The last periodic checkpoint followed by at least two records in its file.
    let (kf, ki) = originals
        .iter()
        .enumerate()
        .flat_map(|(f, l)| (0..l.len()).map(move |i| (f, i)))
        .rfind(|&(f, i)| {
            let v = parse(&originals[f][i]);
            v["kind"] == "checkpoint" && v["final_seal"] == false && i + 2 < originals[f].len()
        })
        .expect("a periodic checkpoint with records after it");
    let cut_after = |l: &mut Vec<Vec<String>>, f: usize, keep: usize| {
        l[f].truncate(keep);
        for later in l.iter_mut().skip(f + 1) {
            later.clear();
        }
    };

    // 1. Cut tail: everything after the last periodic checkpoint removed. Without the anchor
    // it is an open tail (a crash looks the same); with it, truncation, even when open tails
    // are allowed.
    let d = tamper("cut", &|l| cut_after(l, kf, ki + 1));
    let r = check(&d, false, false);
    assert!(r.open_tail() && !r.tampered(), "{}", findings(&r));
    let r = check(&d, true, true);
    assert!(r.tampered(), "{}", findings(&r));
    assert!(errors(&r).contains("TRUNCATED"), "{}", errors(&r));
    let (code, text) = cli(&d, &["--allow-open-tail"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("TRUNCATED") && text.contains("FAILED"),
        "{text}"
    );

    // 2. The finding as shown: cut there, the checkpoint re-marked final, its hash recomputed.
    let d = tamper("resealed", &|l| {
        cut_after(l, kf, ki + 1);
        l[kf][ki] = l[kf][ki].replace("\"final_seal\":false", "\"final_seal\":true");
        let before = l[kf][ki - 1].clone();
        reseal(&mut l[kf], ki, &before);
    });
    let r = check(&d, false, false);
    assert!(r.tampered(), "{}", findings(&r));
    assert!(
        errors(&r).contains("signature does not verify"),
        "{}",
        errors(&r)
    );

    // 3. A segment dropped from the middle.
    let d = tamper("dropped-middle", &|l| l[1].clear());
    let r = check(&d, true, false);
    assert!(errors(&r).contains("records missing"), "{}", errors(&r));

    // 4. The newest segment deleted, verified as a running server's log would be.
    let d = tamper("deleted-newest", &|l| l.last_mut().unwrap().clear());
    let r = check(&d, true, true);
    assert!(errors(&r).contains("TRUNCATED"), "{}", findings(&r));
    let (code, text) = cli(&d, &["--allow-open-tail"]);
    assert_eq!(code, Some(1), "{text}");

    // 5. The whole folder deleted (or emptied).
    let d = tamper("deleted-all", &|l| l.iter_mut().for_each(Vec::clear));
    let (code, text) = cli(&d, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("TRUNCATED"), "{text}");
    let r = verify_files(&[], &opts(true, true));
    assert!(errors(&r).contains("TRUNCATED"), "{}", findings(&r));
    let (code, text) = cli(&env.dir.path().join("no-such-folder"), &[]);
    assert_eq!(code, Some(1), "{text}");

    // 6. Reordered lines: two calls swapped; a checkpoint moved after the records that
    // followed it, with the chain recomputed and the log cut there (what an open tail allows).
    let (cf, ci) = originals
        .iter()
        .enumerate()
        .flat_map(|(f, l)| (1..l.len()).map(move |i| (f, i)))
        .find(|&(f, i)| {
            parse(&originals[f][i])["kind"] == "call"
                && parse(&originals[f][i - 1])["kind"] == "call"
        })
        .expect("two calls in a row");
    let d = tamper("swapped", &|l| l[cf].swap(ci - 1, ci));
    assert!(check(&d, true, false).tampered());
    let d = tamper("moved-checkpoint", &|l| {
        cut_after(l, kf, ki + 3);
        let cp = l[kf].remove(ki);
        l[kf].push(cp);
        let before = l[kf][ki - 1].clone();
        reseal(&mut l[kf], ki, &before);
    });
    let r = check(&d, false, true);
    assert!(r.tampered(), "{}", findings(&r));
    assert!(
        errors(&r).contains("covers exactly the record before it"),
        "{}",
        errors(&r)
    );

    // 7. A replayed checkpoint: the first run's final seal appended after the start of the
    // second run (cut before its first checkpoint), renumbered and re-chained.
    let f2 = (1..originals.len())
        .find(|&f| parse(originals[f - 1].last().unwrap())["final_seal"] == true)
        .expect("the second run's first file");
    let d = tamper("replayed", &|l| {
        let seal = l[f2 - 1].last().unwrap().clone();
        cut_after(l, f2, 1);
        l[f2].push(seal);
        let before = l[f2][0].clone();
        reseal(&mut l[f2], 1, &before);
    });
    let r = check(&d, false, false);
    assert!(r.tampered(), "{}", findings(&r));
    let e = errors(&r);
    assert!(e.contains("replayed"), "{e}");
}

/// The documented digest of a set of subject references or key ids (docs/OPERATIONS.md
/// "Audit log"): SHA-256 of the distinct lowercase hex values, sorted, each followed by a line
/// feed; what `LC_ALL=C sort -u | sha256sum` gives. Recomputed here from the unary records,
/// independently of the server's code.
pub(crate) fn set_digest(hex_values: &[String]) -> String {
    let mut v: Vec<&str> = hex_values.iter().map(String::as_str).collect();
    v.sort_unstable();
    v.dedup();
    let text: String = v.iter().map(|h| format!("{h}\n")).collect();
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        text.as_bytes(),
    ))
}

pub(crate) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Asserts that `rec` lists `name` (`subject_refs` or `key_ids`) as the first `bound` distinct
/// values of `touched` (in request order), counts them all and digests them all.
fn assert_lists(rec: &Value, name: &str, touched: &[String], bound: usize) {
    let mut first = Vec::new();
    for t in touched {
        if first.len() < bound && !first.contains(t) {
            first.push(t.clone());
        }
    }
    let mut distinct = touched.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(strings(&rec[name]), first, "{name} of {rec}");
    assert_eq!(rec[format!("{name}_total")], distinct.len(), "{rec}");
    assert_eq!(
        rec[format!("{name}_omitted")],
        distinct.len() - first.len(),
        "{rec}"
    );
    assert_eq!(rec[format!("{name}_digest")], set_digest(touched), "{rec}");
}

/// Security review finding 7: a DecryptBatch or DetokenizeBatch over many subjects names, in
/// its one audit record, the key ids and subject references it read (a bounded list, the
/// count and a digest of them all), so an insider's bulk read is visible; raw subject ids
/// never appear, and the log still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_name_the_subjects_and_keys_they_read() {
    const N: usize = 100;
    const BOUND: usize = 10;
    let env = TestEnv::start().await;
    let server = env
        .server_env(
            "bulk",
            "",
            env_of(&[("PIIGUARD_AUDIT__MAX_REFS_PER_RECORD", "10")]),
        )
        .await;
    let mut c = env.client(&server, "orders").await;
    let mut t =
        piiguard::pb::tokens_client::TokensClient::new(env.channel(&server, "orders").await);
    let subject = |i: usize| format!("bulk-read-{i:03}");

    // One unary Encrypt per subject: its record names the subject reference and key id, the
    // facts the batch records below must list.
    let mut cts = Vec::new();
    for i in 0..N {
        cts.push(
            c.encrypt(enc("orders", &subject(i), "email", b"someone@example.com"))
                .await
                .unwrap()
                .into_inner()
                .ciphertext,
        );
    }
    let tokens: Vec<String> = t
        .tokenize_batch(piiguard::pb::TokenizeBatchRequest {
            items: (0..N)
                .map(|i| piiguard::pb::TokenizeRequest {
                    keyspace: "orders".into(),
                    subject: subject(i),
                    field: "email".into(),
                    value: format!("someone{i}@example.com"),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.result.unwrap() {
            piiguard::pb::tokenize_result::Result::Token(t) => t.token,
            piiguard::pb::tokenize_result::Result::Error(e) => panic!("tokenize: {}", e.reason),
        })
        .collect();

    // Read back in reverse order (so "first in request order" is not "first created"), with
    // one subject twice (counted once) and one ciphertext that does not parse (no key id).
    let order: Vec<usize> = (0..N).rev().chain([7]).collect();
    let mut items: Vec<_> = order.iter().map(|&i| dec("email", &cts[i])).collect();
    items.push(dec("email", b"not a ciphertext"));
    let res = c
        .decrypt_batch(piiguard::pb::DecryptBatchRequest { items })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.results.len(), N + 2);
    let res = t
        .detokenize_batch(piiguard::pb::DetokenizeBatchRequest {
            items: order
                .iter()
                .map(|&i| piiguard::pb::DetokenizeRequest {
                    keyspace: "orders".into(),
                    token: tokens[i].clone(),
                    reveal: 0,
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(res.results.iter().all(|r| matches!(
        r.result,
        Some(piiguard::pb::detokenize_result::Result::Value(_))
    )));

    let recs = server.audit_records();
    let encrypts: Vec<&Value> = recs.iter().filter(|r| r["method"] == "Encrypt").collect();
    assert_eq!(encrypts.len(), N);
    let sref = |i: usize| encrypts[i]["subject_ref"].as_str().unwrap().to_string();
    let kid = |i: usize| encrypts[i]["key_id"].as_str().unwrap().to_string();
    let read_refs: Vec<String> = order.iter().map(|&i| sref(i)).collect();
    let read_keys: Vec<String> = order.iter().map(|&i| kid(i)).collect();

    let batch = recs
        .iter()
        .find(|r| r["method"] == "DecryptBatch")
        .expect("DecryptBatch audited");
    assert_eq!(batch["items"], N + 2);
    assert_eq!(batch["failed_items"], 1);
    assert_lists(batch, "key_ids", &read_keys, BOUND);
    assert_eq!(batch["key_ids_total"], N);
    assert_eq!(batch["key_ids_omitted"], N - BOUND);

    let batch = recs
        .iter()
        .find(|r| r["method"] == "DetokenizeBatch")
        .expect("DetokenizeBatch audited");
    assert_eq!(batch["items"], N + 1);
    assert_lists(batch, "subject_refs", &read_refs, BOUND);
    assert_lists(batch, "key_ids", &read_keys, BOUND);
    assert_eq!(batch["subject_refs_total"], N);

    // TokenizeBatch lists the subjects it wrote for, too.
    let batch = recs
        .iter()
        .find(|r| r["method"] == "TokenizeBatch")
        .expect("TokenizeBatch audited");
    let written: Vec<String> = (0..N).map(sref).collect();
    assert_lists(batch, "subject_refs", &written, BOUND);

    // No raw subject id, value or token anywhere in the audit files.
    let text: String = server
        .audit_files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        !text.contains("bulk-read-"),
        "a raw subject id is in the audit log"
    );
    assert!(!text.contains("@example.com"));
    assert!(tokens.iter().all(|tk| !text.contains(tk.as_str())));

    // The log with the new members still verifies.
    let report = verify_files(
        &server.audit_files(),
        &Options {
            public_keys: env.signing_public_keys().await,
            allow_open_tail: true,
            ..Options::default()
        },
    );
    assert!(report.ok(), "{}", errors(&report));
}
