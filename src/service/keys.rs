//! `piiguard.v1.Keys`: public keys for producers outside the trust boundary, and the key
//! lifecycle (KEK rotation and rewrap, subject key rotation, retiring versions).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::Op;
use crate::domain::names::Keyspace;
use crate::domain::time::rfc3339_secs;
use crate::keys::kek::{KekRotation, KeyStatus};
use crate::keys::manager::KeyManager;
use crate::pb;
use crate::pb::keys_server::Keys;

/// The Keys service.
pub struct KeysService {
    #[allow(dead_code)]
    sentry: Arc<Sentry>,
    #[allow(dead_code)]
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

/// The response of GetKeyStatus (DEK usage fields are left to the DEK lifecycle).
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

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!("Keys.{method} is not available in this build"))
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn get_public_key(
        &self,
        _request: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        Err(not_yet("GetPublicKey"))
    }

    async fn rotate_public_key(
        &self,
        _request: Request<pb::RotatePublicKeyRequest>,
    ) -> Result<Response<pb::RotatePublicKeyResponse>, Status> {
        Err(not_yet("RotatePublicKey"))
    }

    async fn retire_public_key_versions(
        &self,
        _request: Request<pb::RetirePublicKeyVersionsRequest>,
    ) -> Result<Response<pb::RetirePublicKeyVersionsResponse>, Status> {
        Err(not_yet("RetirePublicKeyVersions"))
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let ks = request.get_ref().keyspace.clone();
        let g = self.begin_keyspace(&request, "GetKeyStatus", &ks)?;
        let r = self.kek.status(&ks).await.map(|s| status_response(&ks, &s));
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
        _request: Request<pb::RotateSubjectKeyRequest>,
    ) -> Result<Response<pb::RotateSubjectKeyResponse>, Status> {
        Err(not_yet("RotateSubjectKey"))
    }
}
