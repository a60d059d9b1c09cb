//! Encrypt/Decrypt over real mTLS against a real OpenBao.

use crate::common::*;
use piiguard::crypto::envelope;
use piiguard::pb;
use tonic::Code;

fn header(ct: &[u8]) -> (String, u8, [u8; 16]) {
    let mut s = Vec::new();
    let p = envelope::parse(ct, &mut s).expect("parse");
    (
        p.header.keyspace.to_string(),
        p.header.alg as u8,
        p.header.key_id.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_refusals_batches_health_and_reflection() {
    let env = TestEnv::start().await;
    let server = env.server("a", "").await;
    let mut c = env.client(&server, "orders").await;

    // AES-256 (orders) and AES-128 (crm) round trips.
    for (ks, alg) in [("orders", 1u8), ("crm", 2u8)] {
        let ct = c
            .encrypt(enc(ks, "cust-1", "email", b"alice@example.com"))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        let (hks, halg, _) = header(&ct);
        assert_eq!((hks.as_str(), halg), (ks, alg));
        assert!(
            !ct.windows(5).any(|w| w == b"alice"),
            "plaintext visible in ciphertext"
        );
        let pt = c
            .decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"alice@example.com");
    }

    // Unicode, empty, text encoding, context.
    for pt in ["Zoë Ünal — 東京都 🏠".as_bytes(), b"".as_slice()] {
        let mut req = enc("orders", "cust-2", "name", pt);
        req.encoding = pb::CiphertextEncoding::Text as i32;
        req.context.insert("order_id".into(), "o-77".into());
        let ct = c.encrypt(req).await.unwrap().into_inner().ciphertext;
        assert!(ct.starts_with(b"pg1."), "text form");
        let mut d = dec("name", &ct);
        d.context.insert("order_id".into(), "o-77".into());
        assert_eq!(c.decrypt(d).await.unwrap().into_inner().plaintext, pt);
    }

    // Refusals: wrong field, wrong context, other keyspace, tampered, truncated, garbage.
    let mut req = enc("orders", "cust-3", "phone", b"+44 20 7946 0000");
    req.context.insert("purpose".into(), "shipping".into());
    let ct = c.encrypt(req).await.unwrap().into_inner().ciphertext;
    let with_ctx = |field: &str, ct: &[u8], v: &str| {
        let mut d = dec(field, ct);
        d.context.insert("purpose".into(), v.into());
        d
    };
    let cases: Vec<(&str, pb::DecryptRequest, Code, &str)> = vec![
        (
            "wrong field",
            with_ctx("email", &ct, "shipping"),
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        ),
        (
            "wrong context",
            with_ctx("phone", &ct, "marketing"),
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        ),
        (
            "missing context",
            dec("phone", &ct),
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        ),
        (
            "other keyspace",
            {
                let mut d = with_ctx("phone", &ct, "shipping");
                d.keyspace = "crm".into();
                d
            },
            Code::InvalidArgument,
            "KEYSPACE_MISMATCH",
        ),
        (
            "tampered tag",
            {
                let mut t = ct.clone();
                *t.last_mut().unwrap() ^= 1;
                with_ctx("phone", &t, "shipping")
            },
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        ),
        (
            "tampered body",
            {
                let mut t = ct.clone();
                let n = t.len() - 20;
                t[n] ^= 0x80;
                with_ctx("phone", &t, "shipping")
            },
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        ),
        (
            "unknown key id",
            {
                let mut t = ct.clone();
                let off = 3 + "orders".len();
                t[off] ^= 0xff;
                with_ctx("phone", &t, "shipping")
            },
            Code::InvalidArgument,
            "UNKNOWN_KEY",
        ),
        (
            "truncated",
            with_ctx("phone", &ct[..40], "shipping"),
            Code::InvalidArgument,
            "MALFORMED_CIPHERTEXT",
        ),
        (
            "garbage",
            with_ctx("phone", b"hello world", "shipping"),
            Code::InvalidArgument,
            "UNSUPPORTED_CIPHERTEXT_VERSION",
        ),
        (
            "empty",
            with_ctx("phone", b"", "shipping"),
            Code::InvalidArgument,
            "MALFORMED_CIPHERTEXT",
        ),
        (
            "bad text form",
            with_ctx("phone", b"pg1.%%%", "shipping"),
            Code::InvalidArgument,
            "MALFORMED_CIPHERTEXT",
        ),
    ];
    for (name, req, code, want) in cases {
        let Err(e) = c.decrypt(req).await else {
            panic!("{name}: accepted")
        };
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert_eq!(reason(&e), want, "{name}");
        use tonic_types::StatusExt as _;
        let info = e.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata["correlation_id"].len(),
            16,
            "{name}: correlation id"
        );
    }
    // The untouched ciphertext still decrypts: the refusals above changed nothing.
    assert_eq!(
        c.decrypt(with_ctx("phone", &ct, "shipping"))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"+44 20 7946 0000"
    );

    // Bad encrypt inputs.
    let big = vec![b'x'; 64 * 1024 + 1];
    for (name, req, want) in [
        (
            "too large",
            enc("orders", "cust-4", "note", &big),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "unknown keyspace",
            enc("nope", "cust-4", "note", b"x"),
            "UNKNOWN_KEYSPACE",
        ),
        (
            "empty subject",
            enc("orders", "", "note", b"x"),
            "INVALID_REQUEST",
        ),
        (
            "bad field",
            enc("orders", "cust-4", "no spaces", b"x"),
            "INVALID_REQUEST",
        ),
    ] {
        let e = c.encrypt(req).await.expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument, "{name}");
        assert_eq!(reason(&e), want, "{name}");
    }
    let exact = vec![b'y'; 64 * 1024];
    let ct_big = c
        .encrypt(enc("orders", "cust-4", "note", &exact))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert_eq!(
        c.decrypt(dec("note", &ct_big))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        exact
    );

    // Batches: bad items fail alone.
    let items = vec![
        enc("orders", "cust-5", "email", b"a@x.io"),
        enc("nope", "cust-5", "email", b"b@x.io"),
        enc("crm", "cust-6", "name", b"Bob"),
        enc("orders", "cust-5", "bad field!", b"c"),
        enc("orders", "cust-7", "email", &big),
        enc("orders", "cust-5", "name", b"Alice"),
    ];
    let res = c
        .encrypt_batch(pb::EncryptBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(res.len(), 6);
    use pb::encrypt_result::Result as ER;
    let mut cts = Vec::new();
    for (i, r) in res.iter().enumerate() {
        match (i, r.result.as_ref().unwrap()) {
            (0 | 2 | 5, ER::Ciphertext(c)) => cts.push(c.clone()),
            (1, ER::Error(e)) => assert_eq!(e.reason, "UNKNOWN_KEYSPACE"),
            (3, ER::Error(e)) => assert_eq!(e.reason, "INVALID_REQUEST"),
            (4, ER::Error(e)) => {
                assert_eq!(e.reason, "PAYLOAD_TOO_LARGE");
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
            (i, other) => panic!("item {i}: unexpected {}", matches!(other, ER::Error(_))),
        }
    }
    let mut tampered = cts[1].clone();
    *tampered.last_mut().unwrap() ^= 1;
    let ditems = vec![
        dec("email", &cts[0]),
        dec("name", &tampered),
        dec("name", &cts[1]),
        dec("email", b"junk"),
        dec("name", &cts[2]),
    ];
    let res = c
        .decrypt_batch(pb::DecryptBatchRequest { items: ditems })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::decrypt_result::Result as DR;
    let got: Vec<Result<Vec<u8>, String>> = res
        .into_iter()
        .map(|r| match r.result.unwrap() {
            DR::Plaintext(p) => Ok(p),
            DR::Error(e) => Err(e.reason),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            Ok(b"a@x.io".to_vec()),
            Err("DECRYPTION_FAILED".into()),
            Ok(b"Bob".to_vec()),
            Err("UNSUPPORTED_CIPHERTEXT_VERSION".into()),
            Ok(b"Alice".to_vec()),
        ]
    );

    // Health on the mTLS port and on the plaintext health-only port; reflection on mTLS.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", server.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let st = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "piiguard.v1.Crypto".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let e = pb::crypto_client::CryptoClient::new(ch)
        .encrypt(enc("orders", "cust-1", "email", b"x"))
        .await
        .expect_err("data RPCs are not served on the health listener");
    assert_eq!(e.code(), Code::Unimplemented);

    let (cert, key) = env.pki.client("orders");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&env.pki.ca).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    assert!(
        h.check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok()
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    // Our error details (google.rpc.ErrorInfo) are described too, so that grpcurl prints the
    // reason of an error instead of "google.rpc.ErrorInfo is not recognized".
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "google.rpc.ErrorInfo".into(),
        )),
    ];
    let mut stream = r
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("no service list");
    };
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!(
            "no descriptor of google.rpc.ErrorInfo: {:?}",
            resp.message_response
        );
    };
    {
        use prost::Message as _;
        let described = files.file_descriptor_proto.iter().any(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice()).is_ok_and(|f| {
                f.package() == "google.rpc"
                    && f.message_type.iter().any(|m| m.name() == "ErrorInfo")
            })
        });
        assert!(
            described,
            "google.rpc.ErrorInfo not in the descriptors served"
        );
    }
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"piiguard.v1.Crypto".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // Nothing of the PII above reached the log (which runs at debug level here).
    let log = server.log_text();
    assert!(
        log.contains("\"method\":\"Encrypt\""),
        "debug call log present"
    );
    for needle in [
        "alice@example.com",
        "cust-1",
        "cust-3",
        // Full strings only: short digit runs occur by chance in hex ids and timings.
        "+44 20 7946 0000",
        "Zoë",
        "a@x.io",
    ] {
        assert!(!log.contains(needle), "{needle:?} found in the server log");
    }
}
