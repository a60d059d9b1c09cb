//! Security review findings (docs/THREAT-MODEL.md, "Security review findings"), each shown
//! against a live server: real OpenBao over HTTPS, `piiguard serve` over mutual TLS.

use crate::common::*;
use piiguard::pb;
use piiguard::pb::admin_client::AdminClient;
use tonic::Code;

fn shred_req(subject: &str, request_id: &str, reason: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
        reason: reason.into(),
        request_id: request_id.into(),
    }
}

async fn status_of(
    e: &mut pb::erasure_client::ErasureClient<tonic::transport::Channel>,
    s: &str,
) -> i32 {
    e.get_shred_status(pb::GetShredStatusRequest {
        subject: s.into(),
        keyspace: "orders".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .keyspaces[0]
        .state
}

/// Finding 14: `reason` and `request_id` go into permanent signed certificates: bounded and
/// plain, refused with INVALID_ARGUMENT and nothing shredded; and ShredStream counts every
/// item against the call-rate limit (it was one call for any number of subjects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_notes_are_bounded_and_streams_are_rate_limited_per_item() {
    let env = TestEnv::start().await;
    let server = env
        .server(
            "r14",
            r#"
[limits.identity."spiffe://shop.local/erasure"]
calls = ["6/1h"]
"#,
        )
        .await;
    let mut orders = env.client(&server, "orders").await;
    orders
        .encrypt(enc("orders", "cust-r14", "email", b"a@example.com"))
        .await
        .unwrap();
    let mut e = env.erasure(&server).await;
    let active = status_of(&mut e, "cust-r14").await;
    for (id, why) in [
        ("req-1", "line one\nline two"),
        (&*"r".repeat(129), "GDPR"),
        ("req 1 with spaces", "GDPR"),
        ("req-1", &*"x".repeat(300)),
    ] {
        let err = e.shred(shred_req("cust-r14", id, why)).await.unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::InvalidArgument, "INVALID_REQUEST"),
            "{id:?} {why:?}"
        );
    }
    assert_eq!(
        status_of(&mut e, "cust-r14").await,
        active,
        "nothing shredded"
    );

    // A stream is one call and each of its items one more: with 3 calls per hour, a stream
    // of 5 shreds gets 2 done and 3 refused (it used to get all 5 for one call).
    let server2 = env
        .server(
            "r14b",
            r#"
[limits.identity."spiffe://shop.local/erasure"]
calls = ["3/1h"]
"#,
        )
        .await;
    let mut e2 = env.erasure(&server2).await;
    let reqs: Vec<pb::ShredRequest> = (0..5)
        .map(|i| shred_req(&format!("cust-s{i}"), &format!("bulk-{i}"), "GDPR"))
        .collect();
    let mut stream = e2
        .shred_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut limited = 0;
    let mut done = 0;
    while let Some(r) = stream.message().await.unwrap() {
        let k = &r.keyspaces[0];
        match k.error.as_ref() {
            Some(err) if err.reason == "RATE_LIMITED" => limited += 1,
            Some(err) => panic!("unexpected item error {err:?}"),
            None => done += 1,
        }
    }
    assert_eq!(
        (done, limited),
        (2, 3),
        "1 call for the stream + 2 items fit 3/1h"
    );
}

fn admin_client(ch: tonic::transport::Channel) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(ch)
}

/// Finding 8: a locked-out identity was still served by Admin and could lift its own lockout.
/// Now every call of a locked-out identity is refused, nobody lifts their own lockout, and only
/// a configured break-glass identity may use Admin while locked out (a critical alarm each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_out_identities_cannot_use_admin_or_lift_themselves() {
    let env = TestEnv::start().await;
    env.write_policy(
        r#"
[[grant]]
identity = "spiffe://shop.local/breakglass"
operations = ["admin"]
"#,
    );
    let server = env
        .server(
            "r8",
            r#"
[lockout]
max_failures = 2
window_secs = 3600
cooldown_secs = 3600
break_glass = ["spiffe://shop.local/breakglass"]
"#,
        )
        .await;
    let ca = env.ca();
    let issued_admin = ca.issue_client_now(&spiffe("admin")).unwrap();
    let issued_bg = ca.issue_client_now(&spiffe("breakglass")).unwrap();

    // Lock both out with denied data calls (neither may encrypt).
    for issued in [&issued_admin, &issued_bg] {
        let mut c = server.client_issued(issued).await.unwrap();
        for _ in 0..2 {
            let err = c
                .encrypt(enc("orders", "x", "email", b"x"))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied);
        }
        let err = c
            .encrypt(enc("orders", "x", "email", b"x"))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "LOCKED_OUT");
    }

    let mut admin = admin_client(
        server
            .channel(Some((&issued_admin.cert_pem, &issued_admin.key_pem)))
            .await
            .unwrap(),
    );
    let err = admin
        .list_lockouts(pb::ListLockoutsRequest {})
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOCKED_OUT", "Admin is refused too");
    let err = admin
        .lift_lockout(pb::LiftLockoutRequest {
            identity: "spiffe://shop.local/admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOCKED_OUT");

    let mut bg = admin_client(
        server
            .channel(Some((&issued_bg.cert_pem, &issued_bg.key_pem)))
            .await
            .unwrap(),
    );
    let err = bg
        .lift_lockout(pb::LiftLockoutRequest {
            identity: "spiffe://shop.local/breakglass".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "no self-lift, even break-glass"
    );
    // Break-glass is for lifting lockouts: the Keys calls that need `admin` (rotating the
    // signing key here) stay refused (exploratory testing: a locked-out break-glass identity
    // rotated the signing key).
    let mut bg_keys = pb::keys_client::KeysClient::new(
        server
            .channel(Some((&issued_bg.cert_pem, &issued_bg.key_pem)))
            .await
            .unwrap(),
    );
    let err = bg_keys
        .rotate_public_key(pb::RotatePublicKeyRequest {
            purpose: pb::KeyPurpose::Signing as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOCKED_OUT");
    let lifted = bg
        .lift_lockout(pb::LiftLockoutRequest {
            identity: "spiffe://shop.local/admin".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lifted;
    assert!(lifted);
    assert!(
        admin
            .list_lockouts(pb::ListLockoutsRequest {})
            .await
            .is_ok()
    );
    let records = server.audit_records();
    let uses = records
        .iter()
        .filter(|r| {
            r["event"] == "break_glass_used" && r["caller"] == "spiffe://shop.local/breakglass"
        })
        .count();
    assert_eq!(uses, 2, "one critical alarm per break-glass call");
}
