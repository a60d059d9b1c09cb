//! `piiguard.v1.Admin`: lockouts, canaries, audit signing keys.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::access::canary::CanaryEntry;
use crate::access::guard::{Guard, Sentry};
use crate::access::policy::Op;
use crate::domain::time::rfc3339;
use crate::error::{Error, Reason};
use crate::ops::{EncryptInput, Engine};
use crate::pb;
use crate::pb::admin_server::Admin;
use crate::vault::Vault;
use crate::vault::signer::Signer;

/// The Admin service.
pub struct AdminService {
    sentry: Arc<Sentry>,
    engine: Arc<Engine>,
    vault: Arc<Vault>,
    signer: Arc<Signer>,
}

impl AdminService {
    /// The Admin service.
    pub fn new(
        sentry: Arc<Sentry>,
        engine: Arc<Engine>,
        vault: Arc<Vault>,
        signer: Arc<Signer>,
    ) -> Self {
        Self {
            sentry,
            engine,
            vault,
            signer,
        }
    }

    #[allow(clippy::result_large_err)]
    fn begin<T>(&self, req: &Request<T>, method: &'static str) -> Result<Guard, Status> {
        let mut g = self.sentry.begin_admin(req, method)?;
        if let Err(e) = g.authorize(Op::Admin, None, None) {
            return Err(g.fail(e));
        }
        Ok(g)
    }
}

fn random_hex(n: usize) -> Result<String, Error> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::internal("CSPRNG failed"))?;
    Ok(hex::encode(b))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_lockouts(
        &self,
        request: Request<pb::ListLockoutsRequest>,
    ) -> Result<Response<pb::ListLockoutsResponse>, Status> {
        let g = self.begin(&request, "ListLockouts")?;
        let lockouts = self
            .sentry
            .lockouts
            .list()
            .into_iter()
            .map(|l| pb::Lockout {
                identity: l.identity.to_string(),
                since: rfc3339(l.since),
                until: rfc3339(l.until),
                reason: l.reason,
            })
            .collect();
        g.finish(Ok(pb::ListLockoutsResponse { lockouts }))
    }

    async fn lift_lockout(
        &self,
        request: Request<pb::LiftLockoutRequest>,
    ) -> Result<Response<pb::LiftLockoutResponse>, Status> {
        let g = self.begin(&request, "LiftLockout")?;
        let id = request.into_inner().identity;
        if id == **g.caller() {
            return g.finish(Err(Error::PermissionDenied {
                message: "an identity cannot lift its own lockout".into(),
            }));
        }
        let lifted = self.sentry.lockouts.lift(&id);
        if lifted {
            tracing::warn!(identity = %id, by = &**g.caller(), "lockout lifted");
            self.sentry.event(
                "lockout_lifted",
                Some(g.caller()),
                format!("lockout of {id} lifted"),
            );
        }
        g.finish(Ok(pb::LiftLockoutResponse { lifted }))
    }

    async fn create_canary(
        &self,
        request: Request<pb::CreateCanaryRequest>,
    ) -> Result<Response<pb::CreateCanaryResponse>, Status> {
        let g = self.begin(&request, "CreateCanary")?;
        let r = request.into_inner();
        let result = async {
            if r.label.len() > 256 {
                return Err(Error::invalid(
                    Reason::InvalidRequest,
                    "label is over 256 bytes",
                ));
            }
            // A fresh random subject id: no real person, never given out.
            let subject = format!("canary-{}", random_hex(16)?);
            let decoy = if r.decoy.is_empty() {
                random_hex(8)?.into_bytes()
            } else {
                r.decoy.clone()
            };
            let ctx = Default::default();
            let input = EncryptInput {
                keyspace: &r.keyspace,
                subject: &subject,
                field: &r.field,
                plaintext: &decoy,
                context: &ctx,
                text: r.encoding == pb::CiphertextEncoding::Text as i32,
            };
            let (ciphertext, key_id) = self.engine.encrypt_internal(&input).await?;
            let entry = CanaryEntry {
                keyspace: r.keyspace.clone(),
                key_id: key_id.to_hex(),
                subject_ref: self
                    .engine
                    .keys
                    .subject_ref(&r.keyspace, &subject)?
                    .to_hex(),
                label: r.label.clone(),
                created_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            self.sentry.canaries.persist(&self.vault, &entry).await?;
            self.sentry.canaries.add(entry.clone());
            self.sentry.event(
                "canary_created",
                Some(g.caller()),
                format!(
                    "canary created in keyspace {} (key id {}, label {:?})",
                    entry.keyspace, entry.key_id, entry.label
                ),
            );
            Ok(pb::CreateCanaryResponse {
                ciphertext,
                subject_ref: entry.subject_ref,
                key_id: entry.key_id,
            })
        }
        .await;
        g.finish(result)
    }

    async fn list_canaries(
        &self,
        request: Request<pb::ListCanariesRequest>,
    ) -> Result<Response<pb::ListCanariesResponse>, Status> {
        let g = self.begin(&request, "ListCanaries")?;
        let canaries = self
            .sentry
            .canaries
            .entries()
            .into_iter()
            .map(|c| pb::Canary {
                keyspace: c.keyspace,
                key_id: c.key_id,
                subject_ref: c.subject_ref,
                label: c.label,
            })
            .collect();
        g.finish(Ok(pb::ListCanariesResponse { canaries }))
    }

    async fn get_audit_signing_keys(
        &self,
        request: Request<pb::GetAuditSigningKeysRequest>,
    ) -> Result<Response<pb::GetAuditSigningKeysResponse>, Status> {
        let g = self.begin(&request, "GetAuditSigningKeys")?;
        let result = self
            .signer
            .public_keys()
            .await
            .map(|keys| pb::GetAuditSigningKeysResponse {
                keys: keys
                    .into_iter()
                    .map(|(version, public_key_pem)| pb::SigningKey {
                        version,
                        public_key_pem,
                    })
                    .collect(),
            });
        g.finish(result)
    }
}
