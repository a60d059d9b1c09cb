//! `piiguard.v1.Keys`: public keys for producers outside the trust boundary, and the key
//! lifecycle (KEK rotation and rewrap, subject key rotation, retiring versions).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::Op;
use crate::domain::names::SubjectId;
use crate::error::Error;
use crate::keys::manager::KeyManager;
use crate::pb;
use crate::pb::keys_server::Keys;

/// The Keys service.
pub struct KeysService {
    sentry: Arc<Sentry>,
    keys: Arc<KeyManager>,
}

impl KeysService {
    /// The Keys service over the key manager, guarded by `sentry`.
    pub fn new(sentry: Arc<Sentry>, keys: Arc<KeyManager>) -> Self {
        Self { sentry, keys }
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
        _request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        Err(not_yet("GetKeyStatus"))
    }

    async fn rotate_kek(
        &self,
        _request: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        Err(not_yet("RotateKek"))
    }

    async fn retire_kek_versions(
        &self,
        _request: Request<pb::RetireKekVersionsRequest>,
    ) -> Result<Response<pb::RetireKekVersionsResponse>, Status> {
        Err(not_yet("RetireKekVersions"))
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
