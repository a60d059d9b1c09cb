//! Golden vectors of ciphertext format v1 (docs/FORMAT.md). A change to any of these bytes is
//! a format change: give it a new version byte and keep v1 decrypting these vectors.

use std::collections::BTreeMap;

use piiguard::crypto::aead::Algorithm;
use piiguard::crypto::envelope::{self, DerivedKeys, KeyId};

struct Vector {
    alg: Algorithm,
    dek_hex: &'static str,
    keyspace: &'static str,
    key_id_hex: &'static str,
    dek_version: u32,
    nonce_hex: &'static str,
    field: &'static str,
    context: &'static [(&'static str, &'static str)],
    plaintext: &'static str,
    ciphertext_hex: &'static str,
}

const VECTORS: &[Vector] = &[
    Vector {
        alg: Algorithm::Aes256Gcm,
        dek_hex: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        keyspace: "orders",
        key_id_hex: "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        dek_version: 1,
        nonce_hex: "b0b1b2b3b4b5b6b7b8b9babb",
        field: "email",
        context: &[],
        plaintext: "alice@example.com",
        ciphertext_hex: "0101066f7264657273a0a1a2a3a4a5a6a7a8a9aaabacadaeaf00000001b0b1b2b3b4b5b6b7b8b9babb53cf4502aeb67c0559cdb7ace9dd2543284fcd2f5cc423f765779dc79f9802793c691c258f90d49a41fa6c20d791b3aa413c960a2ba06832491347fb2e091d3ff4",
    },
    Vector {
        alg: Algorithm::Aes128Gcm,
        dek_hex: "f0e0d0c0b0a090807060504030201000",
        keyspace: "crm",
        key_id_hex: "00112233445566778899aabbccddeeff",
        dek_version: 7,
        nonce_hex: "000000000000000000000001",
        field: "name",
        context: &[("tenant", "eu-1"), ("order_id", "o-42")],
        plaintext: "Zoë Ünal",
        ciphertext_hex: "01020363726d00112233445566778899aabbccddeeff00000007000000000000000000000001b990d0b5201dd9bcfa16214f85eed191f6538d87943d469a181aa664db34c91ed8f86d978be0e6717a019dcba6ba76453bfec3ec9dc6d41564a0",
    },
    Vector {
        alg: Algorithm::Aes256Gcm,
        dek_hex: "1111111111111111111111111111111111111111111111111111111111111111",
        keyspace: "orders",
        key_id_hex: "ffffffffffffffffffffffffffffffff",
        dek_version: 2,
        nonce_hex: "ffffffffffffffffffffffff",
        field: "note",
        context: &[("k", "")],
        plaintext: "",
        ciphertext_hex: "0101066f7264657273ffffffffffffffffffffffffffffffff00000002ffffffffffffffffffffffffaa603b6232ee444d8e7c7871bd46c96973e3b0c6533be19e8ed83ba74e3eecdb9024cd1bb2672ee508156561780319e5",
    },
];

fn keys(v: &Vector) -> (DerivedKeys, KeyId) {
    let kid = KeyId::from_hex(v.key_id_hex).unwrap();
    let dek = hex::decode(v.dek_hex).unwrap();
    (
        DerivedKeys::derive(v.alg, &dek, v.keyspace, &kid, v.dek_version).unwrap(),
        kid,
    )
}

fn ctx(v: &Vector) -> BTreeMap<&str, &str> {
    v.context.iter().copied().collect()
}

#[test]
fn v1_vectors_seal_to_the_pinned_bytes() {
    for (i, v) in VECTORS.iter().enumerate() {
        let (k, kid) = keys(v);
        let nonce: [u8; 12] = hex::decode(v.nonce_hex).unwrap().try_into().unwrap();
        let ct = envelope::seal_with_nonce(
            &k,
            v.keyspace,
            &kid,
            v.dek_version,
            v.field,
            &ctx(v),
            v.plaintext.as_bytes(),
            &nonce,
        )
        .unwrap();
        assert_eq!(hex::encode(&ct), v.ciphertext_hex, "vector {i}");
    }
}

#[test]
fn v1_vectors_open_and_refuse_other_fields() {
    for (i, v) in VECTORS.iter().enumerate() {
        let (k, _) = keys(v);
        let bytes = hex::decode(v.ciphertext_hex).unwrap();
        for input in [bytes.clone(), envelope::to_text(&bytes).into_bytes()] {
            let mut s = Vec::new();
            let p = envelope::parse(&input, &mut s).unwrap();
            assert_eq!(p.header.keyspace, v.keyspace, "vector {i}");
            assert_eq!(p.header.dek_version, v.dek_version, "vector {i}");
            assert_eq!(
                &p.open(&k, v.field, &ctx(v)).unwrap()[..],
                v.plaintext.as_bytes()
            );
            assert!(p.open(&k, "other", &ctx(v)).is_err(), "vector {i}");
        }
    }
}
