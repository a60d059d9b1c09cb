//! Set-up of the key-management scenarios (issue 12, docs/KEYS.md): the sealing public key,
//! pools of sealed envelopes made in-process (docs/FORMAT.md, "Sealed envelope v1"), the admin
//! channel and subject key rotations. Nothing here is measured.

use std::collections::BTreeMap;

use base64::Engine as _;
use futures_util::StreamExt as _;
use tonic::transport::Channel;

use piiguard::cli::seal;
use piiguard::crypto::sealed::{self, Kind};
use piiguard::pb;

use crate::Target;
use crate::scenario::connect_grpc_as;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Transit key of the sealing purpose (`keys/manager.rs` `SEALING_KEY`).
pub const SEALING_KEY: &str = "piiguard-sealing";

/// A sealing public key and its transit version.
pub struct SealingKey {
    pub version: u32,
    pub key: rsa::PublicKey,
}

/// One channel as the admin identity (the `keys` grant of the dev policy).
pub async fn connect_admin(t: &Target) -> Result<Channel, String> {
    let mut chs = connect_grpc_as(t, &t.admin_cert(), &t.admin_key(), 1).await?;
    chs.pop().ok_or_else(|| "no admin channel".to_string())
}

/// The current sealing key, from `Keys.GetPublicKey` (open to every authenticated caller).
pub async fn sealing_key(ch: &Channel) -> Result<SealingKey, String> {
    let r = pb::keys_client::KeysClient::new(ch.clone())
        .get_public_key(pb::GetPublicKeyRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
        })
        .await
        .map_err(|s| format!("set-up GetPublicKey: {:?} {}", s.code(), s.message()))?
        .into_inner();
    let k = r
        .keys
        .into_iter()
        .find(|k| k.current)
        .ok_or("GetPublicKey: no current sealing key")?;
    Ok(SealingKey {
        version: k.version,
        key: seal::public_key_from_pem(&k.public_key_pem).map_err(|e| e.to_string())?,
    })
}

/// The current sealing key read from OpenBao directly (`GET transit/keys/piiguard-sealing`),
/// for the anchors, which do not involve piiguard.
pub fn sealing_key_from_transit(v: &serde_json::Value) -> Result<SealingKey, String> {
    let d = &v["data"];
    let version = d["latest_version"]
        .as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .filter(|&x| x > 0)
        .ok_or("transit key: no latest_version")?;
    let pem = d["keys"][version.to_string()]["public_key"]
        .as_str()
        .ok_or("transit key: no public_key of the latest version")?;
    Ok(SealingKey {
        version,
        key: seal::public_key_from_pem(pem).map_err(|e| e.to_string())?,
    })
}

/// `n` envelopes of `kind` sealing `value` for `keyspace` / `field` (no context) to sealing key
/// version `version`, each with its own RSA-OAEP encryption (`wrap`: the public-key operation).
pub fn envelope_pool<E>(
    n: usize,
    kind: Kind,
    version: u32,
    keyspace: &str,
    field: &str,
    value: &[u8],
    wrap: impl Fn(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<Vec<Vec<u8>>, String> {
    let ctx = BTreeMap::new();
    (0..n.max(1))
        .map(|_| {
            sealed::seal(kind, version, keyspace, field, &ctx, value, &wrap)
                .map_err(|e| format!("sealing an envelope: {e}"))
        })
        .collect()
}

/// Envelopes sealed with `key` (RSA-OAEP-SHA256, what transit decrypts).
pub fn seal_pool(
    key: &SealingKey,
    n: usize,
    kind: Kind,
    keyspace: &str,
    field: &str,
    value: &[u8],
) -> Result<Vec<Vec<u8>>, String> {
    envelope_pool(n, kind, key.version, keyspace, field, value, |m| {
        seal::oaep_encrypt(&key.key, m)
    })
}

/// The RSA part of an envelope as transit's ciphertext string (`vault:v<N>:<base64>`): what
/// piiguard's Unseal sends to transit decrypt, so the anchor does the same private operation.
pub fn transit_rsa_ciphertext(envelope: &[u8]) -> Result<String, String> {
    let s = sealed::HEADER_LEN;
    if envelope.len() < s + sealed::RSA_LEN {
        return Err("envelope too short".into());
    }
    let version = u32::from_be_bytes([envelope[2], envelope[3], envelope[4], envelope[5]]);
    Ok(format!(
        "vault:v{version}:{}",
        B64.encode(&envelope[s..s + sealed::RSA_LEN])
    ))
}

/// Rotates every subject's DEK once (`Keys.RotateSubjectKey`, `concurrency` calls at once):
/// ciphertexts made before are then of an older DEK version, which Rewrap really re-encrypts.
pub async fn rotate_subjects(
    admin: &Channel,
    keyspace: &str,
    subjects: &[String],
    concurrency: usize,
) -> Result<(), String> {
    let futs = subjects.iter().map(|s| {
        let mut c = pb::keys_client::KeysClient::new(admin.clone());
        let req = pb::RotateSubjectKeyRequest {
            keyspace: keyspace.to_string(),
            subject: s.clone(),
        };
        async move {
            c.rotate_subject_key(req).await.map_err(|s| {
                format!(
                    "set-up RotateSubjectKey: {:?} {} (needs the `keys` grant: --admin-cert)",
                    s.code(),
                    s.message()
                )
            })
        }
    });
    let results: Vec<_> = futures_util::stream::iter(futs)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// The grant the rewrap scenarios need and the dev policy does not give (docs/POLICY.md).
pub fn rewrap_grant_hint(t: &Target) -> String {
    format!(
        "the client identity needs the `rewrap` grant, which the dev policy does not give: append to {}/vault/policy.toml (it reloads on change):\n\
         [[grant]]\nidentity = \"spiffe://shop.local/orders\"\noperations = [\"rewrap\"]\nkeyspaces = [\"{}\"]\nfields = [\"*\"]",
        t.dev_dir.display(),
        t.keyspace
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_wrap(m: &[u8]) -> Result<Vec<u8>, ()> {
        // Stands in for RSA-OAEP: 256 bytes that start with the message.
        let mut c = vec![0u8; sealed::RSA_LEN];
        c[..m.len()].copy_from_slice(m);
        Ok(c)
    }

    #[test]
    fn envelope_pools_hold_distinct_well_formed_envelopes() {
        let value = b"jane.doe@example.com";
        let hybrid =
            envelope_pool(3, Kind::Hybrid, 7, "orders", "email", value, fake_wrap).unwrap();
        assert_eq!(hybrid.len(), 3);
        for e in &hybrid {
            assert_eq!(e.len(), sealed::HYBRID_OVERHEAD + value.len());
            assert_eq!(&e[..2], &[sealed::VERSION_V1, sealed::KIND_HYBRID]);
            assert_eq!(&e[2..6], &7u32.to_be_bytes());
        }
        // A fresh AES key (and nonce) per envelope.
        assert_ne!(hybrid[0], hybrid[1]);
        let direct =
            envelope_pool(2, Kind::Direct, 7, "orders", "email", value, fake_wrap).unwrap();
        assert!(direct.iter().all(|e| e.len() == sealed::DIRECT_LEN));
        assert_eq!(direct[0][1], sealed::KIND_DIRECT);
        // n = 0 still makes one (a scenario needs at least one body).
        assert_eq!(
            envelope_pool(0, Kind::Hybrid, 1, "o", "f", b"x", fake_wrap)
                .unwrap()
                .len(),
            1
        );
        // Too long for the direct kind, and version 0: refused.
        assert!(envelope_pool(1, Kind::Direct, 1, "o", "f", &[0u8; 200], fake_wrap).is_err());
        assert!(envelope_pool(1, Kind::Hybrid, 0, "o", "f", b"x", fake_wrap).is_err());
    }

    #[test]
    fn the_anchor_decrypts_the_envelopes_own_rsa_part() {
        let e = &envelope_pool(1, Kind::Hybrid, 3, "orders", "email", b"v", fake_wrap).unwrap()[0];
        let c = transit_rsa_ciphertext(e).unwrap();
        let b64 = c.strip_prefix("vault:v3:").unwrap();
        assert_eq!(
            B64.decode(b64).unwrap(),
            &e[sealed::HEADER_LEN..sealed::HEADER_LEN + sealed::RSA_LEN]
        );
        assert!(transit_rsa_ciphertext(&e[..100]).is_err());
    }

    #[test]
    fn the_sealing_key_is_read_from_transits_answer() {
        let v = serde_json::json!({"data": {"latest_version": 2, "keys": {"1": {}, "2": {"public_key": "x"}}}});
        // Not a PEM: refused as a key, after the version and field were found.
        let e = sealing_key_from_transit(&v).err().unwrap();
        assert!(e.contains("RSA-2048"), "{e}");
        let v =
            serde_json::json!({"data": {"latest_version": 2, "keys": {"1": {"public_key": "x"}}}});
        assert!(
            sealing_key_from_transit(&v)
                .err()
                .unwrap()
                .contains("latest version")
        );
        assert!(sealing_key_from_transit(&serde_json::json!({})).is_err());
    }
}
