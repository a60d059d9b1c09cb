//! `piiguard.v1.Erasure`.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::Op;
use crate::domain::names::{SubjectId, check_shred_notes};
use crate::error::{Error, Reason};
use crate::ops::erasure::{Erasure, Outcome, State};
use crate::pb;
use crate::pb::erasure_server;
use crate::service::item_error;

/// Shreds of one stream processed concurrently (responses stay in request order).
const STREAM_CONCURRENCY: usize = 16;

/// The Erasure service.
pub struct ErasureService {
    erasure: Arc<Erasure>,
    sentry: Arc<Sentry>,
}

impl ErasureService {
    /// The Erasure service over its engine, guarded by `sentry`.
    pub fn new(erasure: Arc<Erasure>, sentry: Arc<Sentry>) -> Self {
        Self { erasure, sentry }
    }
}

fn check_shred(r: &pb::ShredRequest) -> Result<(), Error> {
    SubjectId::parse(&r.subject)?;
    check_shred_notes(&r.request_id, &r.reason)
}

/// The keyspaces a shred request names, validated and authorised (`Op::Shred` on each).
fn authorized_keyspaces(
    erasure: &Erasure,
    g: &mut Guard,
    op: Op,
    subject: &str,
    keyspace: &str,
) -> Result<Vec<String>, Error> {
    SubjectId::parse(subject)?;
    let keyspaces = erasure.keyspaces(keyspace)?;
    for ks in &keyspaces {
        g.authorize(op, Some(ks), None)?;
        if let Ok(sref) = erasure.subject_ref(ks, subject) {
            g.note_subject(ks, &sref);
        }
    }
    Ok(keyspaces)
}

/// Shreds one (validated, authorised) request in each of `keyspaces`; never fails as a whole.
/// Returns the response and the first failure, if any.
async fn shred_one(
    erasure: &Erasure,
    r: &pb::ShredRequest,
    keyspaces: Result<Vec<String>, Error>,
    cid: &str,
) -> (pb::ShredResponse, Option<Error>) {
    let mut out = pb::ShredResponse {
        request_id: r.request_id.clone(),
        keyspaces: Vec::new(),
    };
    let keyspaces = match check_shred(r).and(keyspaces) {
        Ok(k) => k,
        Err(e) => {
            out.keyspaces.push(pb::KeyspaceShred {
                keyspace: r.keyspace.clone(),
                outcome: pb::ShredOutcome::Failed as i32,
                error: Some(item_error(&e)),
                ..Default::default()
            });
            return (out, Some(e));
        }
    };
    let mut failure = None;
    for ks in keyspaces {
        let mut k = pb::KeyspaceShred {
            keyspace: ks.clone(),
            ..Default::default()
        };
        match erasure
            .shred(&ks, &r.subject, &r.reason, &r.request_id)
            .await
        {
            Ok(Outcome::Shredded(c)) => {
                crate::metrics::shred("shredded");
                k.outcome = pb::ShredOutcome::Shredded as i32;
                k.certificate = c;
            }
            Ok(Outcome::AlreadyShredded(c)) => {
                k.outcome = pb::ShredOutcome::AlreadyShredded as i32;
                k.certificate = c;
            }
            Ok(Outcome::Scheduled(at)) => {
                crate::metrics::shred("scheduled");
                k.outcome = pb::ShredOutcome::Scheduled as i32;
                k.scheduled_for = at;
            }
            Ok(Outcome::NotFound) => k.outcome = pb::ShredOutcome::NotFound as i32,
            Err(e) => {
                crate::metrics::shred("failed");
                k.outcome = pb::ShredOutcome::Failed as i32;
                k.error = Some(item_error(&e));
                if matches!(
                    e,
                    Error::Unavailable { .. }
                        | Error::StoreUnavailable { .. }
                        | Error::Internal { .. }
                ) {
                    tracing::warn!(correlation_id = cid, reason = %e.reason(), detail = ?e, "shred failed");
                }
                failure.get_or_insert(e);
            }
        }
        out.keyspaces.push(k);
    }
    (out, failure)
}

fn status_pb(s: crate::ops::erasure::Status) -> pb::SubjectStatus {
    pb::SubjectStatus {
        keyspace: s.keyspace,
        state: match s.state {
            State::Unknown => pb::ShredState::Unknown,
            State::Active => pb::ShredState::Active,
            State::Scheduled => pb::ShredState::Scheduled,
            State::Shredding => pb::ShredState::Shredding,
            State::Shredded => pb::ShredState::Shredded,
        } as i32,
        scheduled_for: s.scheduled_for.unwrap_or(0),
        shredded_at: s.shredded_at.unwrap_or(0),
        retain_until: s.retain_until.unwrap_or(0),
        certificate: s.certificate.unwrap_or_default(),
    }
}

type ShredStream = Pin<Box<dyn Stream<Item = Result<pb::ShredResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl erasure_server::Erasure for ErasureService {
    async fn shred(
        &self,
        request: Request<pb::ShredRequest>,
    ) -> Result<Response<pb::ShredResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Shred", Op::Shred)?;
        let r = request.into_inner();
        let keyspaces = match check_shred(&r) {
            Ok(()) => {
                authorized_keyspaces(&self.erasure, &mut g, Op::Shred, &r.subject, &r.keyspace)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = keyspaces {
            return g.finish(Err(e));
        }
        let (resp, failure) = shred_one(&self.erasure, &r, keyspaces, g.correlation_id()).await;
        // A unary call reports a failed keyspace as the call's error (retry is safe:
        // keyspaces already shredded answer ALREADY_SHREDDED).
        g.finish(match failure {
            Some(e) => Err(e),
            None => Ok(resp),
        })
    }

    type ShredStreamStream = ShredStream;

    async fn shred_stream(
        &self,
        request: Request<Streaming<pb::ShredRequest>>,
    ) -> Result<Response<Self::ShredStreamStream>, Status> {
        // One audit record for the whole stream (items counted), written when it ends, after a
        // `progress` record per `audit.max_refs_per_record` subjects touched; a stream the
        // client drops is recorded as cancelled.
        let mut g = self.sentry.begin(&request, "ShredStream", Op::Shred)?;
        // The subjects shredded go into the audit log in part records as they accumulate.
        g.start_stream();
        let cid = g.correlation_id().to_string();
        let guard = Arc::new(Mutex::new(Some(g)));
        let items = Arc::new(AtomicUsize::new(0));
        let erasure = self.erasure.clone();
        let (g2, items2) = (guard.clone(), items.clone());
        let out = request
            .into_inner()
            .map(move |item| {
                let erasure = erasure.clone();
                let cid = cid.clone();
                let guard = guard.clone();
                items.fetch_add(1, Ordering::Relaxed);
                async move {
                    let r = item?;
                    let keyspaces = {
                        let mut lock = guard.lock().unwrap_or_else(|p| p.into_inner());
                        match lock.as_mut() {
                            // Every item of a stream counts against the caller's call-rate
                            // limit, as a unary Shred would.
                            Some(g) => g.count_item_as_call().and_then(|()| {
                                authorized_keyspaces(
                                    &erasure,
                                    g,
                                    Op::Shred,
                                    &r.subject,
                                    &r.keyspace,
                                )
                            }),
                            None => Err(Error::internal("stream guard gone")),
                        }
                    };
                    let (resp, failure) = shred_one(&erasure, &r, keyspaces, &cid).await;
                    if let Some(g) = guard.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        g.item_result(&failure.map_or(Ok(()), Err));
                    }
                    Ok(resp)
                }
            })
            .buffered(STREAM_CONCURRENCY)
            .map(Some)
            .chain(futures_util::stream::once(async move {
                let g = g2.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(mut g) = g {
                    g.set_items(items2.load(Ordering::Relaxed));
                    let _ = g.finish(Ok(()));
                }
                None
            }))
            .filter_map(|x: Option<Result<pb::ShredResponse, Status>>| async move { x })
            .boxed();
        Ok(Response::new(out))
    }

    async fn get_shred_status(
        &self,
        request: Request<pb::GetShredStatusRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        let mut g = self
            .sentry
            .begin(&request, "GetShredStatus", Op::ShredStatus)?;
        let r = request.into_inner();
        let result = async {
            let keyspaces = authorized_keyspaces(
                &self.erasure,
                &mut g,
                Op::ShredStatus,
                &r.subject,
                &r.keyspace,
            )?;
            let mut out = Vec::new();
            for ks in keyspaces {
                out.push(status_pb(self.erasure.status(&ks, &r.subject).await?));
            }
            Ok(pb::GetShredStatusResponse { keyspaces: out })
        }
        .await;
        g.finish(result)
    }

    async fn cancel_shred(
        &self,
        request: Request<pb::CancelShredRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        let mut g = self.sentry.begin(&request, "CancelShred", Op::Shred)?;
        let r = request.into_inner();
        let result = async {
            let keyspaces =
                authorized_keyspaces(&self.erasure, &mut g, Op::Shred, &r.subject, &r.keyspace)?;
            let mut out = Vec::new();
            for ks in keyspaces {
                out.push(status_pb(self.erasure.cancel(&ks, &r.subject).await?));
            }
            Ok(pb::GetShredStatusResponse { keyspaces: out })
        }
        .await;
        g.finish(result)
    }

    async fn set_retention(
        &self,
        request: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        // Setting a retention schedules a future shred: it needs the shred grant.
        let mut g = self.sentry.begin(&request, "SetRetention", Op::Shred)?;
        let r = request.into_inner();
        let result = async {
            if r.retain_until < 0 {
                return Err(Error::invalid(
                    Reason::InvalidRequest,
                    "retain_until must be >= 0",
                ));
            }
            let keyspaces =
                authorized_keyspaces(&self.erasure, &mut g, Op::Shred, &r.subject, &r.keyspace)?;
            let until = (r.retain_until > 0).then_some(r.retain_until);
            let mut out = Vec::new();
            for ks in keyspaces {
                out.push(status_pb(
                    self.erasure.set_retention(&ks, &r.subject, until).await?,
                ));
            }
            Ok(pb::GetShredStatusResponse { keyspaces: out })
        }
        .await;
        g.finish(result)
    }

    async fn get_verification_keys(
        &self,
        request: Request<pb::GetVerificationKeysRequest>,
    ) -> Result<Response<pb::GetVerificationKeysResponse>, Status> {
        // Public keys: any authenticated caller may fetch them (the call is still audited).
        let g = self
            .sentry
            .begin(&request, "GetVerificationKeys", Op::ShredStatus)?;
        let result = self.erasure.verification_keys().await.map(|(key, keys)| {
            pb::GetVerificationKeysResponse {
                key,
                keys: keys
                    .into_iter()
                    .map(|(version, public_key_pem)| pb::VerificationKey {
                        version,
                        public_key_pem,
                    })
                    .collect(),
            }
        });
        g.finish(result)
    }
}
