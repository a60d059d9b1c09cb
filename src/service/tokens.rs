//! `piiguard.v1.Tokens`.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::error::{Error, new_correlation_id};
use crate::pb;
use crate::pb::tokens_server::Tokens;
use crate::tokens::{Detokenized, Format, Mode, TokenEngine, TokenizeInput, Tokenized};

/// The Tokens service.
pub struct TokensService {
    engine: Arc<TokenEngine>,
}

impl TokensService {
    pub fn new(engine: Arc<TokenEngine>) -> Self {
        Self { engine }
    }
}

fn format_of(r: &pb::TokenizeRequest) -> Result<Format, Error> {
    let keep = || {
        u8::try_from(r.keep_last).map_err(|_| {
            Error::invalid(
                crate::error::reason::UNSUPPORTED_FORMAT,
                "keep_last is too large",
            )
        })
    };
    match pb::TokenFormat::try_from(r.format) {
        Ok(pb::TokenFormat::Unspecified | pb::TokenFormat::Opaque) => Ok(Format::Opaque),
        Ok(pb::TokenFormat::Digits) => Ok(Format::Digits { keep_last: keep()? }),
        Ok(pb::TokenFormat::Email) => Ok(Format::Email),
        Ok(pb::TokenFormat::Ff1) => Ok(Format::Ff1),
        Err(_) => Err(Error::invalid(
            crate::error::reason::UNSUPPORTED_FORMAT,
            "unknown token format",
        )),
    }
    .and_then(|f| {
        if r.keep_last != 0 && !matches!(f, Format::Digits { .. }) {
            Err(Error::invalid(
                crate::error::reason::UNSUPPORTED_FORMAT,
                "keep_last applies to the DIGITS format only",
            ))
        } else {
            Ok(f)
        }
    })
}

fn mode_of(r: &pb::TokenizeRequest) -> Result<Mode, Error> {
    match pb::TokenMode::try_from(r.mode) {
        Ok(pb::TokenMode::Unspecified | pb::TokenMode::Random) => Ok(Mode::Random),
        Ok(pb::TokenMode::Deterministic) => Ok(Mode::Deterministic),
        Err(_) => Err(Error::invalid(
            crate::error::reason::INVALID_REQUEST,
            "unknown token mode",
        )),
    }
}

fn input(r: &pb::TokenizeRequest) -> Result<TokenizeInput<'_>, Error> {
    Ok(TokenizeInput {
        keyspace: &r.keyspace,
        subject: &r.subject,
        field: &r.field,
        value: &r.value,
        format: format_of(r)?,
        mode: mode_of(r)?,
        ttl_secs: r.ttl_seconds,
    })
}

fn tokenized(t: Tokenized) -> pb::TokenizeResponse {
    pb::TokenizeResponse {
        token: t.token,
        expires_at: t.expires_at.unwrap_or(0),
    }
}

fn detokenized(d: Detokenized) -> pb::DetokenizeResponse {
    pb::DetokenizeResponse {
        value: d.value.to_string(),
        field: d.field,
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
impl Tokens for TokensService {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        call!("Tokenize", request, |r| {
            match input(&r) {
                Ok(i) => self.engine.tokenize(&i).await.map(tokenized),
                Err(e) => Err(e),
            }
        })
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        call!("Detokenize", request, |r| {
            self.engine
                .detokenize(&r.keyspace, &r.token)
                .await
                .map(detokenized)
        })
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        call!("TokenizeBatch", request, |r| {
            // Items that fail to parse keep their error; the others go to the engine.
            let parsed: Vec<Result<TokenizeInput<'_>, Error>> = r.items.iter().map(input).collect();
            let good: Vec<TokenizeInput<'_>> = parsed
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .copied()
                .collect();
            match self.engine.tokenize_batch(&good).await {
                Ok(done) => {
                    let mut done = done.into_iter();
                    let results = parsed
                        .iter()
                        .map(|p| {
                            let res = match p {
                                Err(e) => Err(e.clone()),
                                Ok(_) => done.next().unwrap_or_else(|| {
                                    Err(Error::internal("batch result missing"))
                                }),
                            };
                            pb::TokenizeResult {
                                result: Some(match res {
                                    Ok(t) => pb::tokenize_result::Result::Token(tokenized(t)),
                                    Err(e) => pb::tokenize_result::Result::Error(item_error(&e)),
                                }),
                            }
                        })
                        .collect();
                    Ok(pb::TokenizeBatchResponse { results })
                }
                Err(e) => Err(e),
            }
        })
    }

    async fn detokenize_batch(
        &self,
        request: Request<pb::DetokenizeBatchRequest>,
    ) -> Result<Response<pb::DetokenizeBatchResponse>, Status> {
        call!("DetokenizeBatch", request, |r| {
            let items: Vec<(&str, &str)> = r
                .items
                .iter()
                .map(|i| (i.keyspace.as_str(), i.token.as_str()))
                .collect();
            self.engine
                .detokenize_batch(&items)
                .await
                .map(|results| pb::DetokenizeBatchResponse {
                    results: results
                        .into_iter()
                        .map(|res| pb::DetokenizeResult {
                            result: Some(match res {
                                Ok(d) => pb::detokenize_result::Result::Value(detokenized(d)),
                                Err(e) => pb::detokenize_result::Result::Error(item_error(&e)),
                            }),
                        })
                        .collect(),
                })
        })
    }
}
