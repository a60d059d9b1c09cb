//! `piiguard.v1.Keys`: public keys for producers outside the trust boundary, and the key
//! lifecycle (KEK rotation and rewrap, subject key rotation, retiring versions).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::Op;
use crate::domain::names::{Keyspace, SubjectId};
use crate::domain::time::rfc3339_secs;
use crate::error::{Error, Reason};
use crate::keys::kek::{KekRotation, KeyStatus};
use crate::keys::manager::{KeyManager, SEALING_KEY, SIGNING_KEY};
use crate::pb;
use crate::pb::keys_server::Keys;

/// The Keys service.
pub struct KeysService {
    sentry: Arc<Sentry>,
    keys: Arc<KeyManager>,
    kek: Arc<KekRotation>,
}

impl KeysService {
    /// The Keys service over the key manager and the KEK rotation job, guarded by `sentry`.
    pub fn new(sentry: Arc<Sentry>, keys: Arc<KeyManager>, kek: Arc<KekRotation>) -> Self {
        Self { sentry, keys, kek }
    }

    /// Begins a keyspace call that needs `keys` on `keyspace` (validated first).
    #[allow(clippy::result_large_err)]
    fn begin_keyspace<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        keyspace: &str,
    ) -> Result<Guard, Status> {
        let mut g = self.sentry.begin(req, method, Op::Keys)?;
        let checked = Keyspace::parse(keyspace).and_then(|k| {
            g.authorize(Op::Keys, Some(k.as_str()), None)?;
            if self.keys.has_keyspace(k.as_str()) {
                Ok(())
            } else {
                Err(crate::error::Error::invalid(
                    crate::error::Reason::UnknownKeyspace,
                    format!("unknown keyspace {:?}", k.as_str()),
                ))
            }
        });
        match checked {
            Ok(()) => Ok(g),
            Err(e) => Err(g.fail(e)),
        }
    }
}

fn secs(t: i64) -> String {
    if t > 0 {
        rfc3339_secs(t)
    } else {
        String::new()
    }
}

/// The KEK part of GetKeyStatus's response (the DEK usage fields are filled by the caller).
fn status_response(keyspace: &str, s: &KeyStatus) -> pb::GetKeyStatusResponse {
    let counts = s.counts();
    let job = s.job.clone().unwrap_or_default();
    let running = s.running();
    pb::GetKeyStatusResponse {
        keyspace: keyspace.to_string(),
        kek_latest_version: s.kek.latest_version,
        kek_min_decryption_version: s.kek.min_decryption_version,
        deks_by_kek_version: counts
            .iter()
            .map(|(v, n)| pb::KekVersionCount {
                kek_version: *v,
                deks: *n,
            })
            .collect(),
        rewrap: Some(pb::RewrapProgress {
            running,
            target_kek_version: if running {
                s.kek.latest_version
            } else {
                job.target_version
            },
            done: job.done,
            remaining: if job.finished_at > 0 && !running {
                0
            } else {
                job.total.saturating_sub(job.done)
            },
            started_at: secs(job.started_at),
            finished_at: if running {
                String::new()
            } else {
                secs(job.finished_at)
            },
        }),
        subjects: s.subjects(),
        max_dek_uses: 0,
        dek_use_limit: 0,
        counts_scanned_at: secs(job.scanned_at),
    }
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn get_public_key(
        &self,
        request: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        // Open to every authenticated caller (public keys are public); audited.
        let g = self.sentry.begin(&request, "GetPublicKey", Op::Keys)?;
        let r = request.into_inner();
        let result = async {
            let (purpose, key) = public_key_purpose(r.purpose)?;
            let info = self
                .keys
                .vault()
                .transit_key_info(key)
                .await?
                .ok_or_else(|| public_key_missing(key))?;
            let mut keys = Vec::new();
            for k in info.versions.iter().rev() {
                if k.version < info.min_decryption_version {
                    continue;
                }
                keys.push(pb::PublicKey {
                    purpose: purpose as i32,
                    key_name: key.to_string(),
                    version: k.version,
                    fingerprint_sha256: spki_fingerprint(&k.public_key_pem)?,
                    public_key_pem: k.public_key_pem.clone(),
                    created_at: k.creation_time.clone(),
                    current: k.version == info.latest_version,
                });
            }
            Ok(pb::GetPublicKeyResponse { keys })
        }
        .await;
        g.finish(result)
    }

    async fn rotate_public_key(
        &self,
        request: Request<pb::RotatePublicKeyRequest>,
    ) -> Result<Response<pb::RotatePublicKeyResponse>, Status> {
        let mut g = self.sentry.begin(&request, "RotatePublicKey", Op::Admin)?;
        let r = request.into_inner();
        let result = async {
            g.authorize(Op::Admin, None, None)?;
            let (_, key) = public_key_purpose(r.purpose)?;
            let new_version = self.keys.vault().transit_rotate(key).await?;
            tracing::info!(key, new_version, "rotated public key");
            Ok(pb::RotatePublicKeyResponse { new_version })
        }
        .await;
        g.finish(result)
    }

    async fn retire_public_key_versions(
        &self,
        request: Request<pb::RetirePublicKeyVersionsRequest>,
    ) -> Result<Response<pb::RetirePublicKeyVersionsResponse>, Status> {
        let mut g = self
            .sentry
            .begin(&request, "RetirePublicKeyVersions", Op::Admin)?;
        let r = request.into_inner();
        let result = async {
            g.authorize(Op::Admin, None, None)?;
            let (_, key) = public_key_purpose(r.purpose)?;
            let info = self
                .keys
                .vault()
                .transit_key_info(key)
                .await?
                .ok_or_else(|| public_key_missing(key))?;
            if r.min_version < 1 || r.min_version > info.latest_version {
                return Err(Error::invalid(
                    Reason::InvalidRequest,
                    format!(
                        "min_version must be between 1 and the current version {}",
                        info.latest_version
                    ),
                ));
            }
            if r.min_version < info.min_decryption_version {
                return Err(Error::invalid(
                    Reason::InvalidRequest,
                    format!(
                        "versions below {} are already retired; a retired version cannot come back",
                        info.min_decryption_version
                    ),
                ));
            }
            if r.min_version > info.min_decryption_version {
                self.keys
                    .vault()
                    .transit_set_min_decryption_version(key, r.min_version)
                    .await?;
                tracing::info!(
                    key,
                    min_version = r.min_version,
                    "retired public key versions"
                );
            }
            Ok(pb::RetirePublicKeyVersionsResponse {
                min_version: r.min_version,
            })
        }
        .await;
        g.finish(result)
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let ks = request.get_ref().keyspace.clone();
        let g = self.begin_keyspace(&request, "GetKeyStatus", &ks)?;
        let r = async {
            let mut out = status_response(&ks, &self.kek.status(&ks).await?);
            out.max_dek_uses = self.keys.store().max_dek_uses(&ks).await?;
            out.dek_use_limit = self.keys.dek_use_limit(&ks)?;
            Ok(out)
        }
        .await;
        g.finish(r)
    }

    async fn rotate_kek(
        &self,
        request: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        let ks = request.get_ref().keyspace.clone();
        let g = self.begin_keyspace(&request, "RotateKek", &ks)?;
        let r = self
            .kek
            .rotate(&ks)
            .await
            .map(|(new_version, to_rewrap)| pb::RotateKekResponse {
                new_version,
                to_rewrap,
            });
        g.finish(r)
    }

    async fn retire_kek_versions(
        &self,
        request: Request<pb::RetireKekVersionsRequest>,
    ) -> Result<Response<pb::RetireKekVersionsResponse>, Status> {
        let ks = request.get_ref().keyspace.clone();
        let min = request.get_ref().min_decryption_version;
        let g = self.begin_keyspace(&request, "RetireKekVersions", &ks)?;
        let r = self
            .kek
            .retire(&ks, min)
            .await
            .map(|min_decryption_version| pb::RetireKekVersionsResponse {
                min_decryption_version,
            });
        g.finish(r)
    }

    async fn rotate_subject_key(
        &self,
        request: Request<pb::RotateSubjectKeyRequest>,
    ) -> Result<Response<pb::RotateSubjectKeyResponse>, Status> {
        let mut g = self.sentry.begin(&request, "RotateSubjectKey", Op::Keys)?;
        let r = request.into_inner();
        let result = rotate_subject_key(&self.keys, &mut g, &r).await;
        g.finish(result)
    }
}

/// The purpose and transit key of a request's `purpose`.
fn public_key_purpose(purpose: i32) -> Result<(pb::KeyPurpose, &'static str), Error> {
    match pb::KeyPurpose::try_from(purpose) {
        Ok(pb::KeyPurpose::Sealing) => Ok((pb::KeyPurpose::Sealing, SEALING_KEY)),
        Ok(pb::KeyPurpose::Signing) => Ok((pb::KeyPurpose::Signing, SIGNING_KEY)),
        _ => Err(Error::invalid(
            Reason::InvalidRequest,
            "purpose must be KEY_PURPOSE_SEALING or KEY_PURPOSE_SIGNING",
        )),
    }
}

/// A public-key purpose whose key bootstrap has not made (a deployment older than it).
fn public_key_missing(key: &str) -> Error {
    Error::FailedPrecondition {
        reason: Reason::KeyNotProvisioned,
        message: format!("transit key {key} does not exist; run `piiguard bootstrap` again"),
    }
}

/// SHA-256 of the DER SubjectPublicKeyInfo of a PEM public key, lower-case hex.
fn spki_fingerprint(pem: &str) -> Result<String, Error> {
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| Error::internal("Vault returned a public key that is not PEM"))?
        .1
        .contents;
    Ok(hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &der,
    )))
}

/// `Keys.RotateSubjectKey`: validated, authorised (`keys` on the keyspace), audited with the
/// subject reference only.
async fn rotate_subject_key(
    keys: &KeyManager,
    g: &mut Guard,
    r: &pb::RotateSubjectKeyRequest,
) -> Result<pb::RotateSubjectKeyResponse, Error> {
    SubjectId::parse(&r.subject)?;
    let sref = keys.subject_ref(&r.keyspace, &r.subject)?;
    g.authorize(Op::Keys, Some(&r.keyspace), None)?;
    g.note_subject(&r.keyspace, &sref);
    let (key_id, dek_version, _) = keys.rotate_subject(&r.keyspace, &sref, None).await?;
    g.note_key(&r.keyspace, &key_id);
    crate::metrics::dek_rotation(&r.keyspace, crate::metrics::RotationReason::Requested);
    Ok(pb::RotateSubjectKeyResponse {
        dek_version,
        key_id: key_id.to_hex(),
    })
}
