//! Bulk erasure: ShredStream with 10,000 subjects, resumed after a dropped stream without
//! double work, and the `piiguard shred --file` command.

use std::collections::HashSet;
use std::process::Command;

use crate::common::*;
use piiguard::ops::erasure::certificate::Certificate;
use piiguard::pb;

const N: usize = 10_000;

fn subject(i: usize) -> String {
    format!("bulk-{i:05}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_stream_of_10000_subjects_resumes_without_double_work() {
    let env = TestEnv::start().await;
    let server = env.server("bulk", "").await;
    let mut c = env.client(&server, "orders").await;

    // Give every subject a key (EncryptBatch of 1,000 subjects at a time).
    let mut cts = Vec::with_capacity(N);
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        let items = chunk
            .iter()
            .map(|i| enc("orders", &subject(*i), "email", b"bulk@example.com"))
            .collect();
        let res = c
            .encrypt_batch(pb::EncryptBatchRequest { items })
            .await
            .unwrap()
            .into_inner();
        for r in res.results {
            match r.result.unwrap() {
                pb::encrypt_result::Result::Ciphertext(ct) => cts.push(ct),
                pb::encrypt_result::Result::Error(e) => panic!("encrypt: {}", e.reason),
            }
        }
    }

    let req = |i: usize| pb::ShredRequest {
        subject: subject(i),
        keyspace: "orders".into(),
        reason: "bulk erasure".into(),
        request_id: format!("bulk-req-{i}"),
    };

    // First stream: send 3,000, read 1,000 responses, then drop the connection.
    let mut e = env.erasure(&server).await;
    let mut first = e
        .shred_stream(tokio_stream::iter((0..3000).map(req)))
        .await
        .unwrap()
        .into_inner();
    for i in 0..1000 {
        let r = first.message().await.unwrap().unwrap();
        assert_eq!(r.request_id, format!("bulk-req-{i}"), "in order");
    }
    drop(first);
    drop(e);

    // Second stream: everything again. Each subject is shredded exactly once overall.
    let mut e = env.erasure(&server).await;
    let mut second = e
        .shred_stream(tokio_stream::iter((0..N).map(req)))
        .await
        .unwrap()
        .into_inner();
    let mut shredded = 0;
    let mut already = 0;
    let mut cert_ids = HashSet::new();
    let mut i = 0;
    while let Some(r) = second.message().await.unwrap() {
        assert_eq!(
            r.request_id,
            format!("bulk-req-{i}"),
            "responses in request order"
        );
        let k = &r.keyspaces[0];
        match pb::ShredOutcome::try_from(k.outcome).unwrap() {
            pb::ShredOutcome::Shredded => shredded += 1,
            pb::ShredOutcome::AlreadyShredded => {
                assert!(
                    i < 3000,
                    "only subjects of the first stream can be already shredded"
                );
                already += 1;
            }
            other => panic!("subject {i}: {other:?} {:?}", k.error),
        }
        let cert = Certificate::parse(&k.certificate).unwrap();
        let p: serde_json::Value = serde_json::from_str(&cert.payload).unwrap();
        cert_ids.insert(p["certificate_id"].as_str().unwrap().to_string());
        i += 1;
    }
    assert_eq!(i, N);
    assert_eq!(shredded + already, N);
    assert!(
        already >= 1000,
        "the first 1,000 answered subjects were done before the drop"
    );
    assert_eq!(cert_ids.len(), N, "one certificate per subject");

    // The store holds exactly one certificate per subject: no double work.
    assert_eq!(env.certificate_counts().await, (N as i64, N as i64));
    assert!(
        env.list_key_ids("orders").await.is_empty(),
        "every DEK destroyed"
    );

    // Sampled ciphertexts are dead.
    for i in [0, 999, 1000, 2999, 5000, N - 1] {
        let e = c
            .decrypt(dec("email", &cts[i]))
            .await
            .err()
            .expect("shredded");
        assert_eq!(reason(&e), "SUBJECT_SHREDDED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_file_command_with_summary_and_certificates() {
    let env = TestEnv::start().await;
    let server = env.server("cli", "").await;
    let mut c = env.client(&server, "orders").await;
    for i in 0..20 {
        c.encrypt(enc("orders", &format!("file-{i}"), "email", b"f"))
            .await
            .unwrap();
    }
    let d = env.dir.path();
    let mut file = String::from("# subject,keyspace,request_id\n");
    for i in 0..20 {
        file.push_str(&format!("file-{i},orders,ticket-{i}\n"));
    }
    file.push_str("file-never,orders\n");
    std::fs::write(d.join("subjects.csv"), &file).unwrap();
    let (cert, key) = env.pki.client("erasure");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .arg("shred")
            .arg("--file")
            .arg(d.join("subjects.csv"))
            .args([
                "--endpoint",
                &server.addr.to_string(),
                "--reason",
                "ticket batch",
            ])
            .arg("--ca")
            .arg(&env.pki.ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--certificates-dir")
            .arg(d.join("certs"))
            .output()
            .unwrap()
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("21 requests"), "{err}");
    assert!(
        err.contains("20 shredded, 0 already shredded, 0 scheduled, 1 never existed, 0 failed"),
        "{err}"
    );
    let certs: Vec<_> = std::fs::read_dir(d.join("certs")).unwrap().collect();
    assert_eq!(certs.len(), 20);
    // Running it again does no new work.
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0 shredded, 20 already shredded"), "{err}");
}

/// Security review finding 7: a ShredStream names in the audit log every subject it shredded
/// (and tried to): a `progress` record per `audit.max_refs_per_record` subjects as the stream
/// runs, each listing them all with their digest, and the final record listing the rest; no
/// raw subject id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_stream_names_every_subject_it_shredded_in_the_audit_log() {
    use crate::audit::{set_digest, strings};
    const N: usize = 30;
    const BOUND: usize = 8;
    let env = TestEnv::start().await;
    let server = env
        .server_env(
            "stream-audit",
            "",
            vec![(
                "PIIGUARD_AUDIT__MAX_REFS_PER_RECORD".into(),
                BOUND.to_string(),
            )],
        )
        .await;
    let mut c = env.client(&server, "orders").await;
    let subject = |i: usize| format!("gone-subject-{i:02}");
    for i in 0..N {
        c.encrypt(enc("orders", &subject(i), "email", b"x@example.com"))
            .await
            .unwrap();
    }
    let mut requests: Vec<pb::ShredRequest> = (0..N)
        .map(|i| pb::ShredRequest {
            subject: subject(i),
            keyspace: "orders".into(),
            reason: "bulk erasure".into(),
            request_id: format!("audit-req-{i}"),
        })
        .collect();
    // An invalid item: failed, and names no subject.
    requests.push(pb::ShredRequest {
        subject: String::new(),
        keyspace: "orders".into(),
        reason: "bulk erasure".into(),
        request_id: "audit-req-bad".into(),
    });
    let mut e = env.erasure(&server).await;
    let mut out = e
        .shred_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while let Some(r) = out.message().await.unwrap() {
        if answered < N {
            assert_eq!(
                pb::ShredOutcome::try_from(r.keyspaces[0].outcome).unwrap(),
                pb::ShredOutcome::Shredded
            );
        }
        answered += 1;
    }
    assert_eq!(answered, N + 1);

    // The final record is written when the stream ends, just after its last response.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let recs = loop {
        let recs = server.audit_records();
        if recs
            .iter()
            .any(|r| r["method"] == "ShredStream" && r["outcome"] != "progress")
        {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no final ShredStream record"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let shredded: Vec<String> = recs
        .iter()
        .filter(|r| r["method"] == "Encrypt")
        .map(|r| r["subject_ref"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shredded.len(), N);
    let stream: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["method"] == "ShredStream")
        .collect();
    let outcomes: Vec<&str> = stream
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["progress", "progress", "progress", "partial"],
        "a part record per {BOUND} subjects, then the final one"
    );
    let cid = &stream[0]["correlation_id"];
    let mut listed = Vec::new();
    for r in &stream {
        assert_eq!(&r["correlation_id"], cid, "one call");
        let l = strings(&r["subject_refs"]);
        // Every record of a stream lists all its subjects (none left out) and digests them.
        assert_eq!(r["subject_refs_omitted"], 0, "{r}");
        assert_eq!(r["subject_refs_total"], l.len(), "{r}");
        assert_eq!(r["subject_refs_digest"], set_digest(&l), "{r}");
        listed.extend(l);
    }
    let last = stream.last().unwrap();
    assert_eq!(last["items"], N + 1);
    assert_eq!(last["failed_items"], 1);
    listed.sort();
    let mut want = shredded.clone();
    want.sort();
    assert_eq!(listed, want, "every subject shredded is named once");

    let text: String = server
        .audit_files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        !text.contains("gone-subject-"),
        "a raw subject id is in the audit log"
    );
}
