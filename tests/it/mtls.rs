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

    // A DNS-SAN identity is accepted (`dns:reports.shop.local` is granted).
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

/// Waits (bounded) until `f` holds.
async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hangup(server: &Server) {
    Command::new("kill")
        .arg("-HUP")
        .arg(server.pid().to_string())
        .status()
        .unwrap();
}

/// Grants of the identity-kind tests: a CN identity and a CN grant that a DNS SAN of the same
/// text must not match.
const KIND_GRANTS: &str = r#"
[[grant]]
identity = "cn:legacy-batch"
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["email"]

[[grant]]
identity = "cn:other.shop.local"
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["email"]
"#;

async fn admin_call(
    server: &Server,
    who: &Issued,
) -> Result<piiguard::pb::ListLockoutsResponse, tonic::Status> {
    let ch = server
        .channel(Some((&who.cert_pem, &who.key_pem)))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    piiguard::pb::admin_client::AdminClient::new(ch)
        .list_lockouts(piiguard::pb::ListLockoutsRequest {})
        .await
        .map(|r| r.into_inner())
}

async fn encrypt_status(server: &Server, who: &Issued) -> Result<(), tonic::Status> {
    let mut c = server
        .client_issued(who)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    c.encrypt(enc("orders", "kind-subject", "email", b"x"))
        .await
        .map(|_| ())
}

/// Finding 2: a certificate whose only name is the CN `spiffe://shop.local/admin` was taken for
/// the SPIFFE identity `spiffe://shop.local/admin` and got the admin grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cn_that_reads_like_a_spiffe_id_never_gets_that_identitys_grants() {
    let env = TestEnv::start().await;
    env.write_policy(KIND_GRANTS);
    let ca = env.ca();
    let forged = ca
        .issue_client_now(&ClientName::CommonName("spiffe://shop.local/admin".into()))
        .unwrap();
    let legacy = ca
        .issue_client_now(&ClientName::CommonName("legacy-batch".into()))
        .unwrap();
    // Control: the real admin identity (SPIFFE URI SAN) does get Admin.
    let admin = ca.issue_client_now(&spiffe("admin")).unwrap();

    // Default (CN identities off): the forged certificate is refused outright, with a log line.
    let server = env.server("kinds", "").await;
    assert!(admin_call(&server, &admin).await.is_ok());
    let r = admin_call(&server, &forged).await;
    assert!(r.is_err(), "CN-only certificate got the admin grant: {r:?}");
    assert!(encrypt_status(&server, &legacy).await.is_err());
    wait_until("the refusal is logged", async || {
        server.log_text().contains("tls.allow_cn_identity")
    })
    .await;

    // Opted in: the CN is the identity `cn:spiffe://shop.local/admin`, which no `spiffe://`
    // grant matches; a `cn:` grant does.
    let cn_on = vec![(
        "PIIGUARD_TLS__ALLOW_CN_IDENTITY".to_string(),
        "true".to_string(),
    )];
    let server = env.server_env("kinds-cn", "", cn_on).await;
    let denied = admin_call(&server, &forged).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(reason(&denied), "POLICY_DENIED");
    assert!(
        denied.message().contains("cn:spiffe://shop.local/admin"),
        "{}",
        denied.message()
    );
    encrypt_status(&server, &legacy)
        .await
        .expect("cn:legacy-batch is granted encrypt");
    assert!(admin_call(&server, &admin).await.is_ok());
    let audit = server.audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r["caller"] == "cn:legacy-batch" && r["outcome"] == "ok"),
        "the audit names the CN identity with its kind"
    );
}

/// Finding 2: a DNS SAN is the identity `dns:<name>`, matched only by a `dns:` grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_san_matches_only_a_dns_grant() {
    let env = TestEnv::start().await;
    env.write_policy(KIND_GRANTS);
    let ca = env.ca();
    let server = env.server("dns", "").await;
    // `dns:reports.shop.local` is granted (TEST_GRANTS); the SAN's case does not matter.
    let reports = ca
        .issue_client_now(&ClientName::Dns("Reports.Shop.Local".into()))
        .unwrap();
    encrypt_status(&server, &reports)
        .await
        .expect("dns:reports.shop.local is granted encrypt");
    // Only `cn:other.shop.local` is granted: a DNS SAN of the same text is not that.
    let other = ca
        .issue_client_now(&ClientName::Dns("other.shop.local".into()))
        .unwrap();
    let denied = encrypt_status(&server, &other).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("dns:other.shop.local"),
        "{}",
        denied.message()
    );
    // A policy with a bare name (no kind) is refused at reload; the old one stays in force.
    std::fs::write(
        env.policy_path(),
        "[[grant]]\nidentity = \"reports.shop.local\"\noperations = [\"encrypt\"]\nkeyspaces = [\"orders\"]\n",
    )
    .unwrap();
    hangup(&server);
    wait_until("the kindless policy is refused", async || {
        server
            .audit_records()
            .iter()
            .any(|r| r["event"] == "policy_reload_failed")
    })
    .await;
    let a: Vec<_> = server
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "policy_reload_failed")
        .collect();
    assert!(
        a[0]["detail"]
            .as_str()
            .unwrap()
            .contains("does not name its kind"),
        "{a:#?}"
    );
    encrypt_status(&server, &reports).await.unwrap();
}

/// Finding 3: a client revoked by a CRL reload loses access on the connection it already has,
/// from its next call; another client keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_revoked_by_a_crl_reload_loses_access_on_its_open_connection() {
    let env = TestEnv::start().await;
    let ca = env.ca();
    let crl = env.dir.path().join("clients.crl.pem");
    std::fs::write(&crl, ca.crl(&[]).unwrap()).unwrap();
    let server = env
        .server_env(
            "revoke",
            "",
            vec![(
                "PIIGUARD_TLS__CRL".into(),
                format!("[\"{}\"]", crl.display()),
            )],
        )
        .await;
    let good = ca.issue_client_now(&spiffe("good")).unwrap();
    let fresh = ca.issue_client_now(&spiffe("fresh")).unwrap();
    let mut a = server.client_issued(&good).await.unwrap();
    let mut b = server.client_issued(&fresh).await.unwrap();
    let call = enc("orders", "revoke-subject", "email", b"x");
    a.encrypt(call.clone()).await.unwrap();
    b.encrypt(call.clone()).await.unwrap();

    std::fs::write(&crl, ca.crl(std::slice::from_ref(&good.serial)).unwrap()).unwrap();
    hangup(&server);
    // The same channel (the same connection), still open: refused from the next call on.
    let mut refused = None;
    wait_until(
        "the revoked client is refused on its open connection",
        async || match a.encrypt(call.clone()).await {
            Ok(_) => false,
            Err(s) => {
                refused = Some(s);
                true
            }
        },
    )
    .await;
    let s = refused.unwrap();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert_eq!(reason(&s), "CLIENT_CERTIFICATE_REJECTED");
    assert!(a.encrypt(call.clone()).await.is_err(), "stays refused");
    // The unrevoked client keeps working on its open connection, and can reconnect.
    b.encrypt(call.clone()).await.unwrap();
    encrypt_status(&server, &fresh).await.unwrap();
    // A new connection of the revoked client is refused at the handshake.
    assert!(encrypt_status(&server, &good).await.is_err());
    let audit = server.audit_records();
    assert!(
        audit
            .iter()
            .any(|r| r["caller"] == "spiffe://shop.local/good"
                && r["reason"] == "CLIENT_CERTIFICATE_REJECTED"
                && r["outcome"] == "refused"),
        "the refusal is audited, as a refusal (it was `error`)"
    );
}

/// Runs `piiguard serve` with `crl` and returns its exit code and stderr (`None`: still running
/// after 30 s, then killed).
fn serve_status(env: &TestEnv, name: &str, crl: &std::path::Path) -> (Option<i32>, String) {
    let cfg = env.dir.path().join(format!("{name}.toml"));
    std::fs::write(&cfg, env.config_toml("")).unwrap();
    let err = env.dir.path().join(format!("{name}.stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PIIGUARD_TLS__CRL", format!("[\"{}\"]", crl.display()))
        .env("PIIGUARD_AUDIT__DIR", env.audit_dir(name))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&err).unwrap_or_default())
}

/// Finding 3: a CRL past its nextUpdate was accepted silently (`ExpirationPolicy::Ignore`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_is_refused_at_start_and_at_reload() {
    let env = TestEnv::start().await;
    let ca = env.ca();
    let now = OffsetDateTime::now_utc();
    let expired_pem = ca
        .crl_between(
            &[],
            now - time::Duration::days(8),
            now - time::Duration::days(1),
        )
        .unwrap();
    let expired = env.dir.path().join("expired.crl.pem");
    std::fs::write(&expired, &expired_pem).unwrap();

    // Start-up: exit 78 before anything is bound, naming the file and the expiry.
    let (code, stderr) = serve_status(&env, "expired-start", &expired);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("CRL expired") && stderr.contains(&expired.display().to_string()),
        "{stderr}"
    );

    // Reload: the expired CRL is refused with the TLS reload alarm; the old one stays.
    let crl = env.dir.path().join("clients.crl.pem");
    std::fs::write(&crl, ca.crl(&[]).unwrap()).unwrap();
    let server = env
        .server_env(
            "expired-reload",
            "",
            vec![(
                "PIIGUARD_TLS__CRL".into(),
                format!("[\"{}\"]", crl.display()),
            )],
        )
        .await;
    let good = ca.issue_client_now(&spiffe("good")).unwrap();
    let mut open = server.client_issued(&good).await.unwrap();
    let call = enc("orders", "crl-subject", "email", b"x");
    open.encrypt(call.clone()).await.unwrap();
    std::fs::write(&crl, &expired_pem).unwrap();
    hangup(&server);
    wait_until("the expired CRL is refused", async || {
        server
            .audit_records()
            .iter()
            .any(|r| r["event"] == "tls_reload_failed")
    })
    .await;
    let alarm = server
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "tls_reload_failed")
        .unwrap();
    let detail = alarm["detail"].as_str().unwrap();
    assert!(detail.contains("CRL expired"), "{detail}");
    // The previous (current) CRL stays in force: open and new connections work.
    open.encrypt(call.clone()).await.unwrap();
    encrypt_status(&server, &good).await.unwrap();
}

/// Counts the TCP connections it forwards to `target`.
async fn counting_proxy(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, n)
}

async fn channel_via(
    env: &TestEnv,
    addr: std::net::SocketAddr,
    stem: &str,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let (c, k) = env.pki.client(stem);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&env.pki.ca).unwrap()))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

/// Finding 3: connections had no maximum age. Now a connection is told to go away at
/// `tls.max_connection_age_secs` (the client reconnects through a new handshake), a call in
/// flight may finish within `tls.max_connection_age_grace_secs`, and none outlives both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_replaced_at_their_maximum_age_and_streams_end_within_the_grace() {
    let env = TestEnv::start().await;
    let server = env
        .server_env(
            "age",
            "",
            vec![
                ("PIIGUARD_TLS__MAX_CONNECTION_AGE_SECS".into(), "2".into()),
                (
                    "PIIGUARD_TLS__MAX_CONNECTION_AGE_GRACE_SECS".into(),
                    "3".into(),
                ),
            ],
        )
        .await;
    let (proxy, connections) = counting_proxy(server.addr).await;
    let connections = move || connections.load(std::sync::atomic::Ordering::SeqCst);

    // A unary client: its connection is replaced after 2 s, transparently.
    let mut c =
        piiguard::pb::crypto_client::CryptoClient::new(channel_via(&env, proxy, "orders").await);
    let call = enc("orders", "age-subject", "email", b"x");
    c.encrypt(call.clone()).await.unwrap();
    assert_eq!(connections(), 1);
    wait_until("the client reconnected after the maximum age", async || {
        c.encrypt(call.clone()).await.is_ok() && connections() >= 2
    })
    .await;

    // A stream in flight across the age: items sent after the GOAWAY (age 2 s) are still
    // answered within the grace (3 s more); the connection is closed after age + grace.
    let req = |i: usize| piiguard::pb::ShredRequest {
        subject: format!("age-stream-{i}"),
        keyspace: "orders".into(),
        reason: "connection age test".into(),
        request_id: format!("age-{i}"),
    };
    let mut e =
        piiguard::pb::erasure_client::ErasureClient::new(channel_via(&env, proxy, "erasure").await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let started = Instant::now();
    tx.send(req(0)).await.unwrap();
    let mut stream = e
        .shred_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().request_id, "age-0");
    // Past the age, within the grace.
    tokio::time::sleep(Duration::from_millis(3000).saturating_sub(started.elapsed())).await;
    tx.send(req(1)).await.unwrap();
    assert_eq!(
        stream.message().await.unwrap().unwrap().request_id,
        "age-1",
        "a call in flight was cut within the grace"
    );
    // Past age + grace: the connection is gone, and the stream with it.
    tokio::time::sleep(Duration::from_millis(6500).saturating_sub(started.elapsed())).await;
    let _ = tx.send(req(2)).await;
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream outlived its connection's age and grace");
    assert!(
        !matches!(&end, Ok(Some(r)) if r.request_id == "age-2"),
        "a stream was served past the connection's age and grace: {end:?}"
    );
    // The same client works again on a new connection.
    let before = connections();
    c.encrypt(call.clone()).await.unwrap();
    assert!(connections() >= before);
}
