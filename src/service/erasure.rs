//! `piiguard.v1.Erasure`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::erasure::{Erasure, Outcome, State};
use crate::error::{Error, new_correlation_id, reason};
use crate::ops::MAX_SUBJECT_LEN;
use crate::pb;
use crate::pb::erasure_server;

/// Longest reason / request id accepted.
const MAX_TEXT: usize = 1024;
/// Shreds of one stream processed concurrently (responses stay in request order).
const STREAM_CONCURRENCY: usize = 16;

/// The Erasure service.
pub struct ErasureService {
    erasure: Arc<Erasure>,
}

impl ErasureService {
    pub fn new(erasure: Arc<Erasure>) -> Self {
        Self { erasure }
    }
}

fn check_subject(subject: &str) -> Result<(), Error> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(Error::invalid(
            reason::INVALID_REQUEST,
            format!("subject must be 1-{MAX_SUBJECT_LEN} bytes"),
        ));
    }
    Ok(())
}

fn check_shred(r: &pb::ShredRequest) -> Result<(), Error> {
    check_subject(&r.subject)?;
    if r.reason.len() > MAX_TEXT || r.request_id.len() > MAX_TEXT {
        return Err(Error::invalid(
            reason::INVALID_REQUEST,
            format!("reason and request_id must be at most {MAX_TEXT} bytes"),
        ));
    }
    Ok(())
}

fn item_error(e: &Error) -> pb::ItemError {
    pb::ItemError {
        code: e.code() as i32,
        reason: e.reason().to_string(),
        message: e.public_message(),
    }
}

/// Shreds one request in every keyspace it names; never fails as a whole.
async fn shred_one(erasure: &Erasure, r: &pb::ShredRequest, cid: &str) -> pb::ShredResponse {
    let mut out = pb::ShredResponse {
        request_id: r.request_id.clone(),
        keyspaces: Vec::new(),
    };
    let keyspaces = match check_shred(r).and_then(|()| erasure.keyspaces(&r.keyspace)) {
        Ok(k) => k,
        Err(e) => {
            out.keyspaces.push(pb::KeyspaceShred {
                keyspace: r.keyspace.clone(),
                outcome: pb::ShredOutcome::Failed as i32,
                error: Some(item_error(&e)),
                ..Default::default()
            });
            return out;
        }
    };
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
                k.outcome = pb::ShredOutcome::Shredded as i32;
                k.certificate = c;
            }
            Ok(Outcome::AlreadyShredded(c)) => {
                k.outcome = pb::ShredOutcome::AlreadyShredded as i32;
                k.certificate = c;
            }
            Ok(Outcome::Scheduled(at)) => {
                k.outcome = pb::ShredOutcome::Scheduled as i32;
                k.scheduled_for = at;
            }
            Ok(Outcome::NotFound) => k.outcome = pb::ShredOutcome::NotFound as i32,
            Err(e) => {
                k.outcome = pb::ShredOutcome::Failed as i32;
                k.error = Some(item_error(&e));
                // Logs the internal detail under the correlation id.
                let _ = e.into_status(cid);
            }
        }
        out.keyspaces.push(k);
    }
    out
}

fn status_pb(s: crate::erasure::Status) -> pb::SubjectStatus {
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

fn done<T>(
    method: &'static str,
    caller: &str,
    started: Instant,
    cid: &str,
    r: Result<T, Error>,
) -> Result<Response<T>, Status> {
    let micros = started.elapsed().as_micros() as u64;
    match r {
        Ok(v) => {
            tracing::debug!(method, caller, micros, outcome = "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            tracing::debug!(
                method,
                caller,
                micros,
                outcome = "error",
                reason = e.reason(),
                correlation_id = cid
            );
            Err(e.into_status(cid))
        }
    }
}

macro_rules! call {
    ($method:literal, $req:ident, |$r:ident, $cid:ident| $body:expr) => {{
        let started = Instant::now();
        let $cid = new_correlation_id();
        let caller = match crate::service::caller(&$req) {
            Ok(c) => c,
            Err(e) => return Err(e.into_status(&$cid)),
        };
        let $r = $req.into_inner();
        let result = $body;
        done($method, &caller.identity, started, &$cid, result)
    }};
}

type ShredStream = Pin<Box<dyn Stream<Item = Result<pb::ShredResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl erasure_server::Erasure for ErasureService {
    async fn shred(
        &self,
        request: Request<pb::ShredRequest>,
    ) -> Result<Response<pb::ShredResponse>, Status> {
        call!("Shred", request, |r, cid| {
            let resp = shred_one(&self.erasure, &r, &cid).await;
            // A unary call reports a failed keyspace as the call's error (retry is safe:
            // keyspaces already shredded answer ALREADY_SHREDDED).
            match resp.keyspaces.iter().find_map(|k| k.error.as_ref()) {
                Some(e) => Err(Error::from_item(e)),
                None => Ok(resp),
            }
        })
    }

    type ShredStreamStream = ShredStream;

    async fn shred_stream(
        &self,
        request: Request<Streaming<pb::ShredRequest>>,
    ) -> Result<Response<Self::ShredStreamStream>, Status> {
        let cid = new_correlation_id();
        let caller = crate::service::caller(&request).map_err(|e| e.into_status(&cid))?;
        tracing::debug!(method = "ShredStream", caller = %caller.identity, correlation_id = cid, "stream opened");
        let erasure = self.erasure.clone();
        let out = request
            .into_inner()
            .map(move |item| {
                let erasure = erasure.clone();
                let cid = cid.clone();
                async move {
                    match item {
                        Ok(r) => Ok(shred_one(&erasure, &r, &cid).await),
                        Err(s) => Err(s),
                    }
                }
            })
            .buffered(STREAM_CONCURRENCY);
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_shred_status(
        &self,
        request: Request<pb::GetShredStatusRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        call!("GetShredStatus", request, |r, cid| {
            let _ = &cid;
            async {
                check_subject(&r.subject)?;
                let mut keyspaces = Vec::new();
                for ks in self.erasure.keyspaces(&r.keyspace)? {
                    keyspaces.push(status_pb(self.erasure.status(&ks, &r.subject).await?));
                }
                Ok(pb::GetShredStatusResponse { keyspaces })
            }
            .await
        })
    }

    async fn cancel_shred(
        &self,
        request: Request<pb::CancelShredRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        call!("CancelShred", request, |r, cid| {
            let _ = &cid;
            async {
                check_subject(&r.subject)?;
                let mut keyspaces = Vec::new();
                for ks in self.erasure.keyspaces(&r.keyspace)? {
                    keyspaces.push(status_pb(self.erasure.cancel(&ks, &r.subject).await?));
                }
                Ok(pb::GetShredStatusResponse { keyspaces })
            }
            .await
        })
    }

    async fn set_retention(
        &self,
        request: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::GetShredStatusResponse>, Status> {
        call!("SetRetention", request, |r, cid| {
            let _ = &cid;
            async {
                check_subject(&r.subject)?;
                if r.retain_until < 0 {
                    return Err(Error::invalid(
                        reason::INVALID_REQUEST,
                        "retain_until must be >= 0",
                    ));
                }
                let until = (r.retain_until > 0).then_some(r.retain_until);
                let mut keyspaces = Vec::new();
                for ks in self.erasure.keyspaces(&r.keyspace)? {
                    keyspaces.push(status_pb(
                        self.erasure.set_retention(&ks, &r.subject, until).await?,
                    ));
                }
                Ok(pb::GetShredStatusResponse { keyspaces })
            }
            .await
        })
    }

    async fn get_verification_keys(
        &self,
        request: Request<pb::GetVerificationKeysRequest>,
    ) -> Result<Response<pb::GetVerificationKeysResponse>, Status> {
        call!("GetVerificationKeys", request, |_r, cid| {
            let _ = &cid;
            self.erasure.verification_keys().await.map(|(key, keys)| {
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
            })
        })
    }
}
