//! `piiguard.v1.Crypto`.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::error::{Error, new_correlation_id};
use crate::ops::{DecryptInput, EncryptInput, Engine};
use crate::pb;
use crate::pb::crypto_server::Crypto;

/// The Crypto service.
pub struct CryptoService {
    engine: Arc<Engine>,
}

impl CryptoService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn encrypt_input(r: &pb::EncryptRequest) -> EncryptInput<'_> {
    EncryptInput {
        keyspace: &r.keyspace,
        subject: &r.subject,
        field: &r.field,
        plaintext: &r.plaintext,
        context: &r.context,
        text: r.encoding == pb::CiphertextEncoding::Text as i32,
    }
}

fn decrypt_input(r: &pb::DecryptRequest) -> DecryptInput<'_> {
    DecryptInput {
        keyspace: &r.keyspace,
        field: &r.field,
        ciphertext: &r.ciphertext,
        context: &r.context,
    }
}

fn item_error(e: &Error) -> pb::ItemError {
    pb::ItemError {
        code: e.code() as i32,
        reason: e.reason().to_string(),
        message: e.public_message(),
    }
}

/// Logs the outcome of a call without any request content and maps the error.
fn finish<T>(
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
    ($method:literal, $req:ident, |$r:ident| $body:expr) => {{
        let started = Instant::now();
        let cid = new_correlation_id();
        let caller = match crate::service::caller(&$req) {
            Ok(c) => c,
            Err(e) => return Err(e.into_status(&cid)),
        };
        let $r = $req.into_inner();
        let result = $body;
        finish($method, &caller.identity, started, &cid, result)
    }};
}

#[tonic::async_trait]
impl Crypto for CryptoService {
    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        call!("Encrypt", request, |r| {
            self.engine
                .encrypt(&encrypt_input(&r))
                .await
                .map(|ciphertext| pb::EncryptResponse { ciphertext })
        })
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        call!("Decrypt", request, |r| {
            self.engine
                .decrypt(&decrypt_input(&r))
                .await
                .map(|pt| pb::DecryptResponse {
                    plaintext: pt.to_vec(),
                })
        })
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        call!("EncryptBatch", request, |r| {
            let inputs: Vec<_> = r.items.iter().map(encrypt_input).collect();
            self.engine
                .encrypt_batch(&inputs)
                .await
                .map(|results| pb::EncryptBatchResponse {
                    results: results
                        .into_iter()
                        .map(|res| pb::EncryptResult {
                            result: Some(match res {
                                Ok(c) => pb::encrypt_result::Result::Ciphertext(c),
                                Err(e) => pb::encrypt_result::Result::Error(item_error(&e)),
                            }),
                        })
                        .collect(),
                })
        })
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        call!("DecryptBatch", request, |r| {
            let inputs: Vec<_> = r.items.iter().map(decrypt_input).collect();
            self.engine
                .decrypt_batch(&inputs)
                .await
                .map(|results| pb::DecryptBatchResponse {
                    results: results
                        .into_iter()
                        .map(|res| pb::DecryptResult {
                            result: Some(match res {
                                Ok(p) => pb::decrypt_result::Result::Plaintext(p.to_vec()),
                                Err(e) => pb::decrypt_result::Result::Error(item_error(&e)),
                            }),
                        })
                        .collect(),
                })
        })
    }
}
