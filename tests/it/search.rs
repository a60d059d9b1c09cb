//! Blind indexes and masked reveals end to end (docs/SEARCH.md): real OpenBao, real
//! `piiguard serve` over mTLS. One env, two servers: `a` with index key version 1 of
//! `orders/email`, `b` after its rotation to version 2 (1 still queryable).

use crate::common::*;
use piiguard::ops::erasure::certificate::Certificate;
use piiguard::pb;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::tokens_client::TokensClient;
use tonic::Code;
use tonic::transport::Channel;

const GRANTS: &str = r#"
# A search service: blind indexes only, never decrypts.
[[grant]]
identity = "spiffe://shop.local/search"
operations = ["index"]
keyspaces = ["orders", "crm"]
fields = ["email", "alt_email", "phone", "postcode"]

# A writer that may index e-mail addresses (not phone numbers) when it encrypts.
[[grant]]
identity = "spiffe://shop.local/writer"
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["*"]

[[grant]]
identity = "spiffe://shop.local/writer"
operations = ["index"]
keyspaces = ["orders"]
fields = ["email"]

# Support sees masked card numbers, phones, e-mails, names and postcodes ...
[[grant]]
identity = "spiffe://shop.local/support"
operations = ["decrypt", "detokenize"]
keyspaces = ["orders"]
fields = ["card_number", "phone", "email", "name", "postcode"]
reveal = "masked"

# ... and whole addresses.
[[grant]]
identity = "spiffe://shop.local/support"
operations = ["decrypt"]
keyspaces = ["orders"]
fields = ["address"]
"#;

const FIELDS: &str = r#"
[keyspaces.orders.fields.phone]
phone_country_code = "44"

[keyspaces.orders.fields.postcode]
index_bits = 12
mask_keep_first = 2

[limits.identity."spiffe://shop.local/support"]
revealed_items = ["1/1h"]
"#;

fn config(email_version: u32) -> String {
    let previous = if email_version > 1 { "[1]" } else { "[]" };
    format!(
        "{FIELDS}\n[keyspaces.orders.fields.email]\nindex_bits = 64\nindex_version = {email_version}\nindex_previous_versions = {previous}\n"
    )
}

fn bi(keyspace: &str, field: &str, value: &str) -> pb::BlindIndexRequest {
    pb::BlindIndexRequest {
        keyspace: keyspace.into(),
        field: field.into(),
        value: value.as_bytes().to_vec(),
    }
}

async fn index(
    c: &mut CryptoClient<Channel>,
    ks: &str,
    field: &str,
    v: &str,
) -> pb::BlindIndexResponse {
    c.blind_index(bi(ks, field, v)).await.unwrap().into_inner()
}

fn indexed(r: pb::EncryptRequest) -> pb::EncryptRequest {
    pb::EncryptRequest {
        blind_index: true,
        ..r
    }
}

fn masked(r: pb::DecryptRequest) -> pb::DecryptRequest {
    pb::DecryptRequest {
        reveal: pb::RevealMode::Masked as i32,
        ..r
    }
}

fn refused(r: Result<impl Sized, tonic::Status>, code: Code, why: &str) {
    match r {
        Ok(_) => panic!("allowed, expected {why}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(reason(&e), why, "{e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_indexes_rotation_masked_reveals_and_shred() {
    let env = TestEnv::start().await;
    env.write_policy(GRANTS);
    let a = env.server("a", &config(1)).await;
    let ca = env.ca();
    let mut search = a
        .client_issued(&ca.issue_client_now(&spiffe("search")).unwrap())
        .await
        .unwrap();
    let support_id = ca.issue_client_now(&spiffe("support")).unwrap();
    let mut support = a.client_issued(&support_id).await.unwrap();
    let mut orders = env.client(&a, "orders").await;
    let mut writer = a
        .client_issued(&ca.issue_client_now(&spiffe("writer")).unwrap())
        .await
        .unwrap();

    // Normalisation: equal values index equal.
    let e1 = index(&mut search, "orders", "email", " Jane.Doe@Example.COM\n").await;
    let e2 = index(&mut search, "orders", "email", "jane.doe@example.com").await;
    assert_eq!(e1, e2);
    assert!(e1.index.starts_with("bi1.1."), "{}", e1.index);
    assert_eq!(e1.index.len(), "bi1.1.".len() + 16, "64 bits");
    assert_eq!(e1.all.len(), 1);
    assert_eq!((e1.all[0].version, &e1.all[0].index), (1, &e1.index));
    let p1 = index(&mut search, "orders", "phone", "+44 20 7946 0958").await;
    for v in ["020 7946 0958", "0044 (20) 7946-0958", "+442079460958"] {
        assert_eq!(index(&mut search, "orders", "phone", v).await, p1, "{v}");
    }
    assert_eq!(p1.index.len(), "bi1.1.".len() + 8, "default 32 bits");
    // Other fields and keyspaces have other keys; other values other indexes.
    let alt = index(&mut search, "orders", "alt_email", "jane.doe@example.com").await;
    let crm = index(&mut search, "crm", "email", "jane.doe@example.com").await;
    let other = index(&mut search, "orders", "email", "john@example.com").await;
    assert_ne!(alt.index, e1.index);
    assert_ne!(crm.index, e1.index);
    assert_ne!(other.index, e1.index);
    // Truncation to the configured bits: 12 bits are two bytes, the last four bits zero.
    let pc = index(&mut search, "orders", "postcode", "SW1A 2AA").await;
    let hex_part = pc.index.rsplit('.').next().unwrap();
    assert_eq!(hex_part.len(), 4);
    assert!(hex_part.ends_with('0'), "{}", pc.index);
    // A value with no normal form is refused with a stable reason.
    refused(
        search.blind_index(bi("orders", "phone", "call me")).await,
        Code::InvalidArgument,
        "VALUE_NOT_NORMALISABLE",
    );
    refused(
        search.blind_index(bi("orders", "email", "jane")).await,
        Code::InvalidArgument,
        "VALUE_NOT_NORMALISABLE",
    );
    // `index` is not `decrypt`, nor an index of a field not granted.
    refused(
        search.blind_index(bi("orders", "name", "Jane")).await,
        Code::PermissionDenied,
        "POLICY_DENIED",
    );
    let ct = orders
        .encrypt(indexed(enc(
            "orders",
            "cust-s1",
            "email",
            b"Jane.Doe@example.com",
        )))
        .await
        .unwrap()
        .into_inner();
    // Encrypt with blind_index returns the same index as BlindIndex.
    assert_eq!(ct.blind_index, e1.index);
    refused(
        search.decrypt(dec("email", &ct.ciphertext)).await,
        Code::PermissionDenied,
        "POLICY_DENIED",
    );
    // Encrypt with blind_index needs `index` too (the writer has none on phone), and a value
    // with no normal form fails it; either way nothing is sealed and no key is made.
    let subjects_before = env.kv_list("subjects/orders").await;
    refused(
        writer
            .encrypt(indexed(enc(
                "orders",
                "cust-fresh",
                "phone",
                b"+44 20 7946 0958",
            )))
            .await,
        Code::PermissionDenied,
        "POLICY_DENIED",
    );
    refused(
        writer
            .encrypt(indexed(enc(
                "orders",
                "cust-fresh",
                "email",
                b"not-an-address",
            )))
            .await,
        Code::InvalidArgument,
        "VALUE_NOT_NORMALISABLE",
    );
    assert_eq!(env.kv_list("subjects/orders").await, subjects_before);
    // Batch forms: each item its own result.
    let b = search
        .blind_index_batch(pb::BlindIndexBatchRequest {
            items: vec![
                bi("orders", "email", "JANE.DOE@example.com"),
                bi("orders", "phone", "no digits"),
                bi("orders", "phone", "020 7946 0958"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let val = |r: &pb::BlindIndexResult| match &r.result {
        Some(pb::blind_index_result::Result::Value(v)) => v.index.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(val(&b[0]), e1.index);
    match &b[1].result {
        Some(pb::blind_index_result::Result::Error(e)) => {
            assert_eq!(e.reason, "VALUE_NOT_NORMALISABLE");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(val(&b[2]), p1.index);
    let eb = writer
        .encrypt_batch(pb::EncryptBatchRequest {
            items: vec![
                indexed(enc("orders", "cust-s2", "email", b"jane.doe@example.com")),
                indexed(enc("orders", "cust-s2", "phone", b"+44 20 7946 0958")),
                enc("orders", "cust-s2", "phone", b"+44 20 7946 0958"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(matches!(
        eb[0].result,
        Some(pb::encrypt_result::Result::Ciphertext(_))
    ));
    assert_eq!(eb[0].blind_index, e1.index);
    match &eb[1].result {
        Some(pb::encrypt_result::Result::Error(e)) => assert_eq!(e.reason, "POLICY_DENIED"),
        other => panic!("{other:?}"),
    }
    assert!(eb[1].blind_index.is_empty());
    assert!(matches!(
        eb[2].result,
        Some(pb::encrypt_result::Result::Ciphertext(_))
    ));
    assert!(eb[2].blind_index.is_empty());

    // Masked reveals: one mask per field kind, and a configured one.
    let mut seal = async |field: &str, v: &str| {
        orders
            .encrypt(enc("orders", "cust-m1", field, v.as_bytes()))
            .await
            .unwrap()
            .into_inner()
            .ciphertext
    };
    let card = seal("card_number", "4111 1111 1111 1111").await;
    let phone = seal("phone", "+44 20 7946 0958").await;
    let email = seal("email", "jane.doe@example.com").await;
    let name = seal("name", "Jane van Doe").await;
    let postcode = seal("postcode", "SW1A 2AA").await;
    let address = seal("address", "1 Main Street").await;
    for (field, ct, want) in [
        ("card_number", &card, "•••• 1111"),
        ("phone", &phone, "•••• 0958"),
        ("email", &email, "j••••@example.com"),
        ("name", &name, "J. V. D."),
        ("postcode", &postcode, "SW••••"),
    ] {
        let r = support
            .decrypt(masked(dec(field, ct)))
            .await
            .unwrap()
            .into_inner();
        assert!(r.masked, "{field}");
        assert_eq!(String::from_utf8(r.plaintext).unwrap(), want, "{field}");
    }
    // A masked-only grant refuses the whole value.
    refused(
        support.decrypt(dec("card_number", &card)).await,
        Code::PermissionDenied,
        "MASKED_REVEAL_ONLY",
    );
    // Batches: one mode for every item.
    let db = support
        .decrypt_batch(pb::DecryptBatchRequest {
            items: vec![
                masked(dec("card_number", &card)),
                masked(dec("email", &email)),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(db.iter().all(|r| r.masked));
    assert!(
        matches!(&db[0].result, Some(pb::decrypt_result::Result::Plaintext(p)) if p == "•••• 1111".as_bytes())
    );
    refused(
        support
            .decrypt_batch(pb::DecryptBatchRequest {
                items: vec![masked(dec("card_number", &card)), dec("address", &address)],
            })
            .await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
    );
    // The volume budget (1 item an hour) counts full reveals only.
    let full = support
        .decrypt(dec("address", &address))
        .await
        .unwrap()
        .into_inner();
    assert!(!full.masked);
    assert_eq!(full.plaintext, b"1 Main Street");
    refused(
        support.decrypt(dec("address", &address)).await,
        Code::ResourceExhausted,
        "VOLUME_BUDGET_EXCEEDED",
    );
    for _ in 0..3 {
        assert!(
            support
                .decrypt(masked(dec("phone", &phone)))
                .await
                .unwrap()
                .into_inner()
                .masked
        );
    }

    // Detokenize: the same masks and the same grant.
    let mut tok_orders = TokensClient::new(env.channel(&a, "orders").await);
    let token = tok_orders
        .tokenize(pb::TokenizeRequest {
            keyspace: "orders".into(),
            subject: "cust-m1".into(),
            field: "card_number".into(),
            value: "4111111111111111".into(),
            format: pb::TokenFormat::Opaque as i32,
            mode: pb::TokenMode::Random as i32,
            keep_last: 0,
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut tok_support = TokensClient::new(
        a.channel(Some((&support_id.cert_pem, &support_id.key_pem)))
            .await
            .unwrap(),
    );
    let detok = |mode: pb::RevealMode| pb::DetokenizeRequest {
        keyspace: "orders".into(),
        token: token.clone(),
        reveal: mode as i32,
    };
    let d = tok_support
        .detokenize(detok(pb::RevealMode::Masked))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (d.value.as_str(), d.field.as_str(), d.masked),
        ("•••• 1111", "card_number", true)
    );
    refused(
        tok_support.detokenize(detok(pb::RevealMode::Full)).await,
        Code::PermissionDenied,
        "MASKED_REVEAL_ONLY",
    );
    let d = tok_orders
        .detokenize(detok(pb::RevealMode::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.value.as_str(), d.masked), ("4111111111111111", false));

    // The audit log says which reveals were masked.
    let recs = a.audit_records();
    let support_calls: Vec<_> = recs
        .iter()
        .filter(|r| r["caller"] == "spiffe://shop.local/support" && r["kind"] == "call")
        .collect();
    let masked_ok = |m: &str| {
        support_calls
            .iter()
            .filter(|r| r["method"] == m && r["outcome"] == "ok" && r["reveal"] == "masked")
            .count()
    };
    assert_eq!(masked_ok("Decrypt"), 5 + 3);
    assert_eq!(masked_ok("DecryptBatch"), 1);
    assert_eq!(masked_ok("Detokenize"), 1);
    assert!(support_calls.iter().any(|r| r["method"] == "Decrypt"
        && r["outcome"] == "ok"
        && r.get("reveal").is_none()
        && r["field"] == "address"));
    assert!(
        support_calls
            .iter()
            .any(|r| r["reason"] == "MASKED_REVEAL_ONLY" && r["outcome"] == "denied")
    );

    // Rotation: `b` makes new indexes with version 2 and still answers version 1.
    let b_srv = env.server("b", &config(2)).await;
    let mut search_b = b_srv
        .client_issued(&ca.issue_client_now(&spiffe("search")).unwrap())
        .await
        .unwrap();
    let r2 = index(&mut search_b, "orders", "email", "JANE.DOE@EXAMPLE.COM").await;
    assert!(r2.index.starts_with("bi1.2."), "{}", r2.index);
    assert_ne!(r2.index, e1.index);
    assert_eq!(
        r2.all
            .iter()
            .map(|v| (v.version, v.index.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, r2.index.as_str()), (1, e1.index.as_str())]
    );
    let mut orders_b = env.client(&b_srv, "orders").await;
    let new_row = orders_b
        .encrypt(indexed(enc(
            "orders",
            "cust-s3",
            "email",
            b"jane.doe@example.com",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new_row.blind_index, r2.index);
    // Fields not rotated keep their version.
    assert_eq!(
        index(&mut search_b, "orders", "phone", "+442079460958").await,
        p1
    );

    // A rotation that also changes the index length: versions 2 and 1 keep the 64 bits they
    // were made with, so `all` still matches the rows that hold them (exploratory testing: they
    // were cut to the new length and matched nothing).
    let c_srv = env
        .server(
            "c",
            &format!(
                "{FIELDS}\n[keyspaces.orders.fields.email]\nindex_bits = 32\nindex_version = 3\n\
                 index_previous_versions = [{{ version = 2, index_bits = 64 }}, {{ version = 1, index_bits = 64 }}]\n"
            ),
        )
        .await;
    let mut search_c = c_srv
        .client_issued(&ca.issue_client_now(&spiffe("search")).unwrap())
        .await
        .unwrap();
    let r3 = index(&mut search_c, "orders", "email", "jane.doe@example.com").await;
    assert_eq!(r3.index.len(), "bi1.3.".len() + 8, "32 bits: {}", r3.index);
    assert_eq!(
        r3.all
            .iter()
            .map(|v| (v.version, v.index.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (3, r3.index.as_str()),
            (2, r2.index.as_str()),
            (1, e1.index.as_str())
        ]
    );

    // Shred: the index is a keyed hash of the value, not of the subject; it survives in the
    // caller's table, and the certificate says the caller must delete it.
    let r = env
        .erasure(&a)
        .await
        .shred(pb::ShredRequest {
            subject: "cust-s1".into(),
            keyspace: "orders".into(),
            reason: "gdpr".into(),
            request_id: "req-search".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    refused(
        orders.decrypt(dec("email", &ct.ciphertext)).await,
        Code::FailedPrecondition,
        "SUBJECT_SHREDDED",
    );
    assert_eq!(
        index(&mut search, "orders", "email", "jane.doe@example.com")
            .await
            .index,
        ct.blind_index,
        "a shred does not change blind indexes"
    );
    let keys = env
        .erasure(&a)
        .await
        .get_verification_keys(pb::GetVerificationKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let pem = &keys.keys.last().unwrap().public_key_pem;
    let p = Certificate::parse(&r.keyspaces[0].certificate)
        .unwrap()
        .verify(pem)
        .unwrap();
    let must = p.caller_must_delete.expect("caller_must_delete");
    assert!(must.iter().any(|m| m.contains("blind indexes")), "{must:?}");
}
