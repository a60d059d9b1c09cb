//! `piiguard.v1.Crypto`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::{Op, RevealMode};
use crate::error::{Error, Reason};
use crate::ops::search::{BlindIndexInput, BlindIndexed};
use crate::ops::{
    DecryptInput, EncryptInput, Engine, RewrapInput, Rewrapped, UnsealInput, Unsealed,
};
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

/// A copy of an input (they borrow the request).
fn encrypt_input_again<'a>(i: &EncryptInput<'a>) -> EncryptInput<'a> {
    EncryptInput {
        keyspace: i.keyspace,
        subject: i.subject,
        field: i.field,
        plaintext: i.plaintext,
        context: i.context,
        text: i.text,
    }
}

fn encrypt_result(res: Result<Vec<u8>, Error>, blind_index: String) -> pb::EncryptResult {
    pb::EncryptResult {
        result: Some(match res {
            Ok(c) => pb::encrypt_result::Result::Ciphertext(c),
            Err(e) => pb::encrypt_result::Result::Error(item_error(&e)),
        }),
        blind_index,
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

fn unseal_input(r: &pb::UnsealRequest) -> UnsealInput<'_> {
    UnsealInput {
        keyspace: &r.keyspace,
        subject: &r.subject,
        field: &r.field,
        envelope: &r.envelope,
        context: &r.context,
        text: r.encoding == pb::CiphertextEncoding::Text as i32,
        return_plaintext: r.return_plaintext,
    }
}

fn unseal_response(u: Unsealed) -> pb::UnsealResponse {
    match u {
        Unsealed::Ciphertext(ciphertext) => pb::UnsealResponse {
            ciphertext,
            plaintext: Vec::new(),
        },
        Unsealed::Plaintext(p) => pb::UnsealResponse {
            ciphertext: Vec::new(),
            plaintext: p.to_vec(),
        },
    }
}

fn blind_index_input(r: &pb::BlindIndexRequest) -> BlindIndexInput<'_> {
    BlindIndexInput {
        keyspace: &r.keyspace,
        field: &r.field,
        value: &r.value,
    }
}

fn blind_indexed(b: BlindIndexed) -> pb::BlindIndexResponse {
    pb::BlindIndexResponse {
        index: b.current,
        all: b
            .all
            .into_iter()
            .map(|(version, index)| pb::BlindIndexValue { version, index })
            .collect(),
    }
}

/// The reveal mode a request asks for (unspecified is full).
pub(crate) fn reveal_mode(v: i32) -> Result<RevealMode, Error> {
    match pb::RevealMode::try_from(v) {
        Ok(pb::RevealMode::Unspecified | pb::RevealMode::Full) => Ok(RevealMode::Full),
        Ok(pb::RevealMode::Masked) => Ok(RevealMode::Masked),
        Err(_) => Err(Error::invalid(
            Reason::InvalidRequest,
            "unknown reveal mode",
        )),
    }
}

/// The one reveal mode of a batch: every item must ask for the same (a batch is authorised,
/// budgeted and audited as one call).
pub(crate) fn batch_reveal_mode(modes: impl IntoIterator<Item = i32>) -> Result<RevealMode, Error> {
    let mut out: Option<RevealMode> = None;
    for m in modes {
        let m = reveal_mode(m)?;
        if out.is_some_and(|o| o != m) {
            return Err(Error::invalid(
                Reason::InvalidRequest,
                "every item of a batch must ask for the same reveal mode",
            ));
        }
        out = Some(m);
    }
    Ok(out.unwrap_or_default())
}

impl CryptoService {
    /// Sets the call's reveal mode from the request, or ends the call with the error.
    #[allow(clippy::result_large_err)]
    fn reveal_of(g: &mut Guard, mode: Result<RevealMode, Error>) -> Result<RevealMode, Error> {
        let m = mode?;
        g.set_reveal_mode(m);
        Ok(m)
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
        let i = encrypt_input(&r);
        let result = if r.blind_index {
            self.engine
                .encrypt_indexed(&mut g, &i)
                .await
                .map(|(ciphertext, blind_index)| pb::EncryptResponse {
                    ciphertext,
                    blind_index,
                })
        } else {
            self.engine
                .encrypt(&mut g, &i)
                .await
                .map(|ciphertext| pb::EncryptResponse {
                    ciphertext,
                    blind_index: String::new(),
                })
        };
        g.finish(result)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Decrypt", Op::Decrypt)?;
        let r = request.into_inner();
        let i = decrypt_input(&r);
        let result = async {
            let mode = Self::reveal_of(&mut g, reveal_mode(r.reveal))?;
            let pt = self.engine.decrypt(&mut g, &i).await?;
            Ok(match mode {
                RevealMode::Full => pb::DecryptResponse {
                    plaintext: pt.to_vec(),
                    masked: false,
                },
                RevealMode::Masked => pb::DecryptResponse {
                    plaintext: self.engine.mask_decrypted(&i, &pt).into_bytes(),
                    masked: true,
                },
            })
        }
        .await;
        g.finish(result)
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "EncryptBatch", Op::Encrypt)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(encrypt_input).collect();
        if !r.items.iter().any(|i| i.blind_index) {
            let result = self
                .engine
                .encrypt_batch(&mut g, &inputs)
                .await
                .map(|results| pb::EncryptBatchResponse {
                    results: results
                        .into_iter()
                        .map(|res| encrypt_result(res, String::new()))
                        .collect(),
                });
            return g.finish(result);
        }
        if r.items.len() > self.engine.max_batch {
            let e = Error::invalid(
                Reason::BatchTooLarge,
                format!(
                    "batch has {} items; the maximum is {}",
                    r.items.len(),
                    self.engine.max_batch
                ),
            );
            return g.finish(Err(e));
        }
        g.set_items(r.items.len());
        // Items that ask for a blind index get it first: an item whose index fails (not
        // allowed, no normal form) fails whole and seals nothing.
        let indexes: Vec<Result<String, Error>> = r
            .items
            .iter()
            .zip(&inputs)
            .map(|(item, i)| {
                if item.blind_index {
                    self.engine.index_for_encrypt(&mut g, i)
                } else {
                    Ok(String::new())
                }
            })
            .collect();
        let good: Vec<EncryptInput<'_>> = inputs
            .iter()
            .zip(&indexes)
            .filter(|(_, x)| x.is_ok())
            .map(|(i, _)| encrypt_input_again(i))
            .collect();
        let sealed = self.engine.encrypt_batch(&mut g, &good).await;
        // The engine counted only the good items; the call has them all.
        g.set_items(r.items.len());
        let result = sealed.map(|done| {
            let mut done = done.into_iter();
            pb::EncryptBatchResponse {
                results: indexes
                    .into_iter()
                    .map(|x| match x {
                        Err(e) => {
                            let r: Result<Vec<u8>, Error> = Err(e);
                            g.item_result(&r);
                            encrypt_result(r, String::new())
                        }
                        Ok(index) => {
                            let res = done
                                .next()
                                .unwrap_or_else(|| Err(Error::internal("batch result missing")));
                            let index = if res.is_ok() { index } else { String::new() };
                            encrypt_result(res, index)
                        }
                    })
                    .collect(),
            }
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
        let mode =
            match Self::reveal_of(&mut g, batch_reveal_mode(r.items.iter().map(|i| i.reveal))) {
                Ok(m) => m,
                Err(e) => return g.finish(Err(e)),
            };
        let masked = mode == RevealMode::Masked;
        let result = self
            .engine
            .decrypt_batch(&mut g, &inputs)
            .await
            .map(|results| pb::DecryptBatchResponse {
                results: results
                    .into_iter()
                    .zip(&inputs)
                    .map(|(res, i)| pb::DecryptResult {
                        result: Some(match res {
                            Ok(p) if masked => pb::decrypt_result::Result::Plaintext(
                                self.engine.mask_decrypted(i, &p).into_bytes(),
                            ),
                            Ok(p) => pb::decrypt_result::Result::Plaintext(p.to_vec()),
                            Err(e) => pb::decrypt_result::Result::Error(item_error(&e)),
                        }),
                        masked,
                    })
                    .collect(),
            });
        g.finish(result)
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        // Returning the plaintext is a reveal: audited as one.
        let op = if request.get_ref().return_plaintext {
            Op::Decrypt
        } else {
            Op::Encrypt
        };
        let mut g = self.sentry.begin(&request, "Unseal", op)?;
        let r = request.into_inner();
        let result = self
            .engine
            .unseal(&mut g, &unseal_input(&r))
            .await
            .map(unseal_response);
        g.finish(result)
    }

    async fn unseal_batch(
        &self,
        request: Request<pb::UnsealBatchRequest>,
    ) -> Result<Response<pb::UnsealBatchResponse>, Status> {
        // A batch that returns any plaintext reveals: audited as a Decrypt, as Unseal is.
        let op = if request.get_ref().items.iter().any(|i| i.return_plaintext) {
            Op::Decrypt
        } else {
            Op::Encrypt
        };
        let mut g = self.sentry.begin(&request, "UnsealBatch", op)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(unseal_input).collect();
        let result = self
            .engine
            .unseal_batch(&mut g, &inputs)
            .await
            .map(|results| pb::UnsealBatchResponse {
                results: results
                    .into_iter()
                    .map(|res| pb::UnsealResult {
                        result: Some(match res {
                            Ok(u) => pb::unseal_result::Result::Value(unseal_response(u)),
                            Err(e) => pb::unseal_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            });
        g.finish(result)
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
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let mut g = self.sentry.begin(&request, "BlindIndex", Op::Index)?;
        let r = request.into_inner();
        let result = self
            .engine
            .blind_index(&mut g, &blind_index_input(&r))
            .map(blind_indexed);
        g.finish(result)
    }

    async fn blind_index_batch(
        &self,
        request: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "BlindIndexBatch", Op::Index)?;
        let r = request.into_inner();
        let inputs: Vec<_> = r.items.iter().map(blind_index_input).collect();
        let result = self
            .engine
            .blind_index_batch(&mut g, &inputs)
            .map(|results| pb::BlindIndexBatchResponse {
                results: results
                    .into_iter()
                    .map(|res| pb::BlindIndexResult {
                        result: Some(match res {
                            Ok(b) => pb::blind_index_result::Result::Value(blind_indexed(b)),
                            Err(e) => pb::blind_index_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            });
        g.finish(result)
    }
}
