//! Hot reload of file-backed values (the access policy, the TLS server certificate) over real
//! mTLS: a broken new file keeps the old value in force and raises an alarm in the audit log;
//! a fixed file is picked up without a restart and without dropping connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::common::*;

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn alarms(server: &Server, kind: &str) -> Vec<serde_json::Value> {
    server
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "alarm" && r["event"] == kind)
        .collect()
}

const STRANGER_GRANT: &str = r#"
[[grant]]
identity = "spiffe://shop.local/stranger"
operations = ["encrypt"]
keyspaces = ["crm"]
fields = ["email"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_keeps_the_old_one_with_an_alarm_and_a_fixed_one_is_picked_up() {
    let env = TestEnv::start().await;
    env.write_policy(STRANGER_GRANT);
    let fast = vec![(
        "PIIGUARD_POLICY__RELOAD_INTERVAL_SECS".to_string(),
        "1".to_string(),
    )];
    let server = env.server_env("rp", "", fast).await;
    let stranger = env.ca().issue_client_now(&spiffe("stranger")).unwrap();
    let mut s = server.client_issued(&stranger).await.unwrap();
    let call = enc("crm", "cust-rp", "email", b"x");
    assert!(s.encrypt(call.clone()).await.is_ok());

    // Broken: the grant stays in force (old and new connections), one alarm names the file.
    std::fs::write(
        env.policy_path(),
        "[[grant]]\nidentity = \"x\"\noperations = [\"peek\"]\n",
    )
    .unwrap();
    wait_until("the broken policy is refused", async || {
        !alarms(&server, "policy_reload_failed").is_empty()
    })
    .await;
    assert!(s.encrypt(call.clone()).await.is_ok(), "old policy lost");
    let mut fresh = server.client_issued(&stranger).await.unwrap();
    assert!(fresh.encrypt(call.clone()).await.is_ok(), "old policy lost");
    // Polled every second: the same broken content is not refused (and alarmed) again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let a = alarms(&server, "policy_reload_failed");
    assert_eq!(a.len(), 1, "{a:#?}");
    let detail = a[0]["detail"].as_str().unwrap();
    let file = env.policy_path().display().to_string();
    assert!(
        detail.contains(&file) && detail.contains("unknown operation"),
        "{detail}"
    );
    assert_eq!(a[0]["severity"], "warning");

    // Fixed (without the stranger's grant): picked up on the same connection.
    env.write_policy("");
    wait_until("the fixed policy applies", async || {
        s.encrypt(call.clone()).await.is_err()
    })
    .await;
    let reloads: Vec<_> = server
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "policy_reload")
        .collect();
    assert_eq!(reloads.len(), 1, "{reloads:#?}");
}

/// The DER of the first certificate of a PEM file.
fn der_of(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Completes a TLS handshake as the `orders` client and returns the server certificate
/// presented (DER).
async fn presented_certificate(env: &TestEnv, server: &Server) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&env.pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let (cert, key) = env.pki.client("orders");
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(piiguard::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_server_certificate_keeps_the_old_one_with_an_alarm_and_a_new_one_is_presented() {
    let env = TestEnv::start().await;
    // The server's own copies (OpenBao uses the dev PKI's server certificate too).
    let dir = env.dir.path().join("server-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::copy(&env.pki.server_cert, &cert).unwrap();
    std::fs::copy(&env.pki.server_key, &key).unwrap();
    let old = der_of(&std::fs::read(&cert).unwrap());
    let server = env
        .server_env(
            "rt",
            "",
            vec![
                ("PIIGUARD_TLS__CERT".into(), cert.display().to_string()),
                ("PIIGUARD_TLS__KEY".into(), key.display().to_string()),
                (
                    "PIIGUARD_SERVER__TLS_RELOAD_INTERVAL_SECS".into(),
                    "1".into(),
                ),
            ],
        )
        .await;
    let mut existing = env.client(&server, "orders").await;
    let call = enc("orders", "cust-rt", "email", b"x");
    assert!(existing.encrypt(call.clone()).await.is_ok());
    assert_eq!(presented_certificate(&env, &server).await.unwrap(), old);

    // Broken certificate file: old certificate still presented, connections served, one alarm.
    write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    wait_until("the broken certificate is refused", async || {
        !alarms(&server, "tls_reload_failed").is_empty()
    })
    .await;
    assert!(existing.encrypt(call.clone()).await.is_ok());
    let mut fresh = env.client(&server, "orders").await;
    assert!(fresh.encrypt(call.clone()).await.is_ok());
    assert_eq!(presented_certificate(&env, &server).await.unwrap(), old);
    let a = alarms(&server, "tls_reload_failed");
    assert_eq!(a.len(), 1, "{a:#?}");
    let detail = a[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("TLS reload failed") && detail.contains(&cert.display().to_string()),
        "{detail}"
    );
    assert!(!detail.contains("PRIVATE KEY"), "{detail}");
    let log = server.log_text();
    assert!(log.contains("tls_reload_failed"), "{log}");

    // A new valid certificate and key: new handshakes present it; old connections go on.
    let issued = env.ca().issue_server().unwrap();
    let new = der_of(issued.cert_pem.as_bytes());
    assert_ne!(new, old);
    write(&key, &issued.key_pem);
    write(&cert, &issued.cert_pem);
    wait_until("the new certificate is presented", async || {
        presented_certificate(&env, &server).await.as_ref() == Ok(&new)
    })
    .await;
    assert!(existing.encrypt(call.clone()).await.is_ok());
    let mut newer = env.client(&server, "orders").await;
    assert!(newer.encrypt(call.clone()).await.is_ok());
    assert!(
        server
            .audit_records()
            .iter()
            .any(|r| r["event"] == "tls_reload")
    );
}
