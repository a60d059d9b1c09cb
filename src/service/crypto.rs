//! `piiguard.v1.Crypto`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::Sentry;
use crate::access::policy::Op;
use crate::ops::{DecryptInput, EncryptInput, Engine, RewrapInput, Rewrapped};
use crate::pb;
use crate::pb::crypto_server::Crypto;
use crate::service::item_error;

/// The Crypto service.
pub struct CryptoService {
    engine: Arc<Engine>,
    sentry: Arc<Sentry>,
}

impl CryptoService {
    /// The Crypto service over its engine, guarded by `sentry`.
    pub fn new(engine: Arc<Engine>, sentry: Arc<Sentry>) -> Self {
        Self { engine, sentry }
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

fn rewrap_input(r: &pb::RewrapRequest) -> RewrapInput<'_> {
    RewrapInput {
        keyspace: &r.keyspace,
        field: &r.field,
        ciphertext: &r.ciphertext,
        context: &r.context,
        // Unspecified keeps the input's form (binary or text); TEXT asks for text.
        text: (r.encoding == pb::CiphertextEncoding::Text as i32).then_some(true),
    }
}

fn rewrap_response(r: Rewrapped) -> pb::RewrapResponse {
    pb::RewrapResponse {
        ciphertext: r.ciphertext,
        changed: r.changed,
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

#[tonic::async_trait]
impl Crypto for CryptoService {
    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Encrypt", Op::Encrypt)?;
        let r = request.into_inner();
        let result = self
            .engine
            .encrypt(&mut g, &encrypt_input(&r))
            .await
            .map(|ciphertext| pb::EncryptResponse {
                ciphertext,
                blind_index: String::new(),
            });
        g.finish(result)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Decrypt", Op::Decrypt)?;
        let r = request.into_inner();
        let result = self
            .engine
            .decrypt(&mut g, &decrypt_input(&r))
            .await
            .map(|pt| pb::DecryptResponse {
                plaintext: pt.to_vec(),
                masked: false,
            });
        g.finish(result)
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "EncryptBatch", Op::Encrypt)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(encrypt_input).collect();
        let result = self
            .engine
            .encrypt_batch(&mut g, &inputs)
            .await
            .map(|results| pb::EncryptBatchResponse {
                results: results
                    .into_iter()
                    .map(|res| pb::EncryptResult {
                        result: Some(match res {
                            Ok(c) => pb::encrypt_result::Result::Ciphertext(c),
                            Err(e) => pb::encrypt_result::Result::Error(item_error(&e)),
                        }),
                        blind_index: String::new(),
                    })
                    .collect(),
            });
        g.finish(result)
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "DecryptBatch", Op::Decrypt)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(decrypt_input).collect();
        let result = self
            .engine
            .decrypt_batch(&mut g, &inputs)
            .await
            .map(|results| pb::DecryptBatchResponse {
                results: results
                    .into_iter()
                    .map(|res| pb::DecryptResult {
                        result: Some(match res {
                            Ok(p) => pb::decrypt_result::Result::Plaintext(p.to_vec()),
                            Err(e) => pb::decrypt_result::Result::Error(item_error(&e)),
                        }),
                        masked: false,
                    })
                    .collect(),
            });
        g.finish(result)
    }

    async fn unseal(
        &self,
        _request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        Err(not_yet("Unseal"))
    }

    async fn unseal_batch(
        &self,
        _request: Request<pb::UnsealBatchRequest>,
    ) -> Result<Response<pb::UnsealBatchResponse>, Status> {
        Err(not_yet("UnsealBatch"))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Rewrap", Op::Rewrap)?;
        let r = request.into_inner();
        let result = self
            .engine
            .rewrap(&mut g, &rewrap_input(&r))
            .await
            .map(rewrap_response);
        g.finish(result)
    }

    async fn rewrap_batch(
        &self,
        request: Request<pb::RewrapBatchRequest>,
    ) -> Result<Response<pb::RewrapBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "RewrapBatch", Op::Rewrap)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(rewrap_input).collect();
        let result = self
            .engine
            .rewrap_batch(&mut g, &inputs)
            .await
            .map(|results| pb::RewrapBatchResponse {
                results: results
                    .into_iter()
                    .map(|res| pb::RewrapResult {
                        result: Some(match res {
                            Ok(v) => pb::rewrap_result::Result::Value(rewrap_response(v)),
                            Err(e) => pb::rewrap_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            });
        g.finish(result)
    }

    async fn blind_index(
        &self,
        _request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        Err(not_yet("BlindIndex"))
    }

    async fn blind_index_batch(
        &self,
        _request: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        Err(not_yet("BlindIndexBatch"))
    }
}

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!("Crypto.{method} is not available in this build"))
}
