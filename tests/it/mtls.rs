//! The TLS front door: who gets in and who does not, over real sockets.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::setup::pki::{Ca, ClientName, Issued};
use time::OffsetDateTime;

async fn rpc_ok(server: &Server, who: Option<&Issued>) -> bool {
    let c = match who {
        Some(i) => server.client_issued(i).await,
        None => server.client_with(None).await,
    };
    let Ok(mut c) = c else { return false };
    c.encrypt(enc("orders", "tls-subject", "email", b"x"))
        .await
        .is_ok()
}

fn s_client(server: &Server, env: &TestEnv, version_flag: &str) -> (bool, String) {
    let (cert, key) = env.pki.client("orders");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &server.addr.to_string(),
            version_flag,
        ])
        .args(["-cipher", "DEFAULT@SECLEVEL=0", "-alpn", "h2"])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(&env.pki.ca)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success() && text.contains("Verify return code: 0"),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_valid_certificate_from_our_ca_get_in() {
    let env = TestEnv::start().await;
    let ca = env.ca();
    let crl = env.dir.path().join("clients.crl.pem");
    std::fs::write(&crl, ca.crl(&[]).unwrap()).unwrap();
    let server = env
        .server_env(
            "tls",
            "",
            vec![(
                "PIIGUARD_TLS__CRL".into(),
                format!("[\"{}\"]", crl.display()),
            )],
        )
        .await;

    let good = ca.issue_client_now(&spiffe("good")).unwrap();
    assert!(
        rpc_ok(&server, Some(&good)).await,
        "a valid client must get in"
    );

    // No certificate.
    assert!(
        !rpc_ok(&server, None).await,
        "client without certificate accepted"
    );

    // A certificate from another CA with the same identity.
    let (other_ca, _) = Ca::generate().unwrap();
    let foreign = other_ca.issue_client_now(&spiffe("good")).unwrap();
    assert!(
        !rpc_ok(&server, Some(&foreign)).await,
        "foreign CA accepted"
    );

    // An expired certificate from our CA.
    let now = OffsetDateTime::now_utc();
    let expired = ca
        .issue_client(
            &spiffe("old"),
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    assert!(
        !rpc_ok(&server, Some(&expired)).await,
        "expired certificate accepted"
    );

    // DNS-SAN and CN-only identities are accepted (identity falls back in that order).
    let dns = ca
        .issue_client_now(&ClientName::Dns("reports.shop.local".into()))
        .unwrap();
    assert!(rpc_ok(&server, Some(&dns)).await);

    // TLS 1.2 with a client certificate works (control); TLS 1.1 and 1.0 are refused.
    let (ok12, text12) = s_client(&server, &env, "-tls1_2");
    assert!(
        ok12 && text12.contains("TLSv1.2"),
        "TLS 1.2 refused:\n{text12}"
    );
    for flag in ["-tls1_1", "-tls1"] {
        let before = server.log_text().matches("TLS handshake refused").count();
        let (ok, text) = s_client(&server, &env, flag);
        assert!(!ok, "{flag} accepted:\n{text}");
        // The client did offer the old version and the server refused it (the log line is
        // written asynchronously: wait for it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.log_text().matches("TLS handshake refused").count() <= before {
            assert!(
                Instant::now() < deadline,
                "{flag}: no handshake refusal logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Revoke `good` in the CRL and reload with SIGHUP: new connections are refused.
    std::fs::write(&crl, ca.crl(std::slice::from_ref(&good.serial)).unwrap()).unwrap();
    Command::new("kill")
        .arg("-HUP")
        .arg(server.pid().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rpc_ok(&server, Some(&good)).await {
        assert!(
            Instant::now() < deadline,
            "revoked certificate still accepted after reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = ca.issue_client_now(&spiffe("fresh")).unwrap();
    assert!(
        rpc_ok(&server, Some(&fresh)).await,
        "unrevoked client refused after reload"
    );

    // A broken CRL file keeps the previous configuration.
    std::fs::write(&crl, "not a crl").unwrap();
    Command::new("kill")
        .arg("-HUP")
        .arg(server.pid().to_string())
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rpc_ok(&server, Some(&fresh)).await);
    assert!(!rpc_ok(&server, Some(&good)).await);
    assert!(server.log_text().contains("TLS reload failed"));
}
