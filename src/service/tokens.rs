//! `piiguard.v1.Tokens`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::guard::{Guard, Sentry};
use crate::access::policy::{Op, RevealMode};
use crate::crypto::tokens::{Format, Mode};
use crate::error::{Error, Reason};
use crate::keys::KeyManager;
use crate::keys::index_keys::IndexKeys;
use crate::ops::tokens::{Detokenized, TokenEngine, TokenizeInput, Tokenized};
use crate::pb;
use crate::pb::tokens_server::Tokens;
use crate::service::crypto::{batch_reveal_mode, reveal_mode};
use crate::service::item_error;

/// The Tokens service.
pub struct TokensService {
    engine: Arc<TokenEngine>,
    keys: Arc<KeyManager>,
    sentry: Arc<Sentry>,
    fields: Arc<IndexKeys>,
}

impl TokensService {
    /// The Tokens service over its engine, guarded by `sentry`; `fields` gives the mask of a
    /// field for masked reveals.
    pub fn new(
        engine: Arc<TokenEngine>,
        keys: Arc<KeyManager>,
        sentry: Arc<Sentry>,
        fields: Arc<IndexKeys>,
    ) -> Self {
        Self {
            engine,
            keys,
            sentry,
            fields,
        }
    }
}

fn format_of(r: &pb::TokenizeRequest) -> Result<Format, Error> {
    let keep = || {
        u8::try_from(r.keep_last)
            .map_err(|_| Error::invalid(Reason::UnsupportedFormat, "keep_last is too large"))
    };
    match pb::TokenFormat::try_from(r.format) {
        Ok(pb::TokenFormat::Unspecified | pb::TokenFormat::Opaque) => Ok(Format::Opaque),
        Ok(pb::TokenFormat::Digits) => Ok(Format::Digits { keep_last: keep()? }),
        Ok(pb::TokenFormat::Email) => Ok(Format::Email),
        Ok(pb::TokenFormat::Ff1) => Ok(Format::Ff1),
        Err(_) => Err(Error::invalid(
            Reason::UnsupportedFormat,
            "unknown token format",
        )),
    }
    .and_then(|f| {
        if r.keep_last != 0 && !matches!(f, Format::Digits { .. }) {
            Err(Error::invalid(
                Reason::UnsupportedFormat,
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
        Ok(pb::TokenMode::DeterministicJoin) => Ok(Mode::DeterministicJoin),
        Err(_) => Err(Error::invalid(Reason::InvalidRequest, "unknown token mode")),
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
        masked: false,
    }
}

impl TokensService {
    /// Authorises tokenising one item (after validating the names that go into the audit
    /// record) and notes its subject. A join token (shared across subjects, so it outlives
    /// one subject's shred) needs `tokenize_join` as well. The item is validated first (an
    /// unknown keyspace, a bad name, format, mode or value is refused as such).
    fn authorize_tokenize(&self, g: &mut Guard, i: &TokenizeInput<'_>) -> Result<(), Error> {
        // Validated first (an unsupported format or value is refused as such, also to a caller
        // that lacks the grant), then authorised.
        self.engine.validate(i)?;
        if let Ok(sref) = self.keys.subject_ref(i.keyspace, i.subject) {
            g.authorize(Op::Tokenize, Some(i.keyspace), Some(i.field))?;
            if i.mode == Mode::DeterministicJoin {
                g.authorize(Op::TokenizeJoin, Some(i.keyspace), Some(i.field))?;
            }
            g.note_subject(i.keyspace, &sref);
        }
        Ok(())
    }

    /// Before a lookup: the caller must hold `detokenize` in the keyspace (so an unauthorised
    /// caller cannot even probe which tokens exist); canary tokens alarm.
    fn pre_detokenize(&self, g: &mut Guard, keyspace: &str, token: &str) -> Result<(), Error> {
        g.note_token(token.as_bytes());
        if self.keys.has_keyspace(keyspace) {
            g.authorize_some_field(Op::Detokenize, keyspace)?;
        }
        Ok(())
    }

    /// After a lookup: the caller must hold `detokenize` on the token's field before the value
    /// is released, and the value counts against its volume budget. The subject and key whose
    /// value it is go into the audit record (as Decrypt names its key).
    fn release(
        &self,
        g: &mut Guard,
        keyspace: &str,
        d: Detokenized,
    ) -> Result<pb::DetokenizeResponse, Error> {
        g.authorize(Op::Detokenize, Some(keyspace), Some(&d.field))
            .map_err(|e| match e {
                // The field comes from the token's row, not from the request: a caller without
                // a grant on it learns that it may not detokenize this token, not its field.
                // The audit record names the field.
                Error::PermissionDenied { .. } => Error::PermissionDenied {
                    message: format!(
                        "detokenize of this token is not granted: its field is none of the \
                         caller's detokenize fields in keyspace {keyspace:?}"
                    ),
                },
                other => other,
            })?;
        if let Some(sref) = &d.subject_ref {
            g.note_subject(keyspace, sref);
        }
        g.note_key(keyspace, &d.key_id);
        g.reveal(1)?;
        Ok(match g.reveal_mode() {
            RevealMode::Full => detokenized(d),
            RevealMode::Masked => pb::DetokenizeResponse {
                value: crate::crypto::mask::mask(
                    self.fields.field(keyspace, &d.field).mask,
                    d.value.as_bytes(),
                ),
                field: d.field.clone(),
                masked: true,
            },
        })
    }

    /// Detokenises one token (see [`pre_detokenize`](Self::pre_detokenize) and
    /// [`release`](Self::release)).
    async fn detokenize_one(
        &self,
        g: &mut Guard,
        keyspace: &str,
        token: &str,
    ) -> Result<pb::DetokenizeResponse, Error> {
        self.pre_detokenize(g, keyspace, token)?;
        let d = self.engine.detokenize(keyspace, token).await?;
        self.release(g, keyspace, d)
    }
}

#[tonic::async_trait]
impl Tokens for TokensService {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Tokenize", Op::Tokenize)?;
        let r = request.into_inner();
        let result = async {
            let i = input(&r)?;
            self.authorize_tokenize(&mut g, &i)?;
            self.engine.tokenize(&i).await.map(tokenized)
        }
        .await;
        g.finish(result)
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let mut g = self.sentry.begin(&request, "Detokenize", Op::Detokenize)?;
        let r = request.into_inner();
        let result = match reveal_mode(r.reveal) {
            Ok(m) => {
                g.set_reveal_mode(m);
                self.detokenize_one(&mut g, &r.keyspace, &r.token).await
            }
            Err(e) => Err(e),
        };
        g.finish(result)
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        let mut g = self.sentry.begin(&request, "TokenizeBatch", Op::Tokenize)?;
        let r = request.into_inner();
        g.set_items(r.items.len());
        // Items that fail to parse or are not allowed keep their error; the others go to the
        // engine.
        let parsed: Vec<Result<TokenizeInput<'_>, Error>> = r
            .items
            .iter()
            .map(|item| {
                let i = input(item)?;
                self.authorize_tokenize(&mut g, &i)?;
                Ok(i)
            })
            .collect();
        let good: Vec<TokenizeInput<'_>> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .copied()
            .collect();
        let result = match self.engine.tokenize_batch(&good).await {
            Ok(done) => {
                let mut done = done.into_iter();
                let results = parsed
                    .iter()
                    .map(|p| {
                        let res = match p {
                            Err(e) => Err(e.clone()),
                            Ok(_) => done
                                .next()
                                .unwrap_or_else(|| Err(Error::internal("batch result missing"))),
                        };
                        g.item_result(&res);
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
        };
        g.finish(result)
    }

    async fn detokenize_batch(
        &self,
        request: Request<pb::DetokenizeBatchRequest>,
    ) -> Result<Response<pb::DetokenizeBatchResponse>, Status> {
        let mut g = self
            .sentry
            .begin(&request, "DetokenizeBatch", Op::Detokenize)?;
        let r = request.into_inner();
        match batch_reveal_mode(r.items.iter().map(|i| i.reveal)) {
            Ok(m) => g.set_reveal_mode(m),
            Err(e) => return g.finish(Err(e)),
        }
        g.set_items(r.items.len());
        // Keyspace-level check before any lookup (no probing), then the engine's concurrent
        // batch (which enforces the batch size), then the field check and the budget per item.
        let pre: Vec<Result<(), Error>> = r
            .items
            .iter()
            .map(|i| self.pre_detokenize(&mut g, &i.keyspace, &i.token))
            .collect();
        let allowed: Vec<(&str, &str)> = r
            .items
            .iter()
            .zip(&pre)
            .filter(|(_, p)| p.is_ok())
            .map(|(i, _)| (i.keyspace.as_str(), i.token.as_str()))
            .collect();
        let done = match self.engine.detokenize_batch(&allowed).await {
            Ok(d) => d,
            Err(e) => return g.finish(Err(e)),
        };
        let mut done = done.into_iter();
        let mut results = Vec::with_capacity(r.items.len());
        for (item, p) in r.items.iter().zip(pre) {
            let res = p.and_then(|()| {
                let d = done
                    .next()
                    .unwrap_or_else(|| Err(Error::internal("batch result missing")))?;
                self.release(&mut g, &item.keyspace, d)
            });
            g.item_result(&res);
            results.push(pb::DetokenizeResult {
                result: Some(match res {
                    Ok(d) => pb::detokenize_result::Result::Value(d),
                    Err(e) => pb::detokenize_result::Result::Error(item_error(&e)),
                }),
            });
        }
        g.finish(Ok(pb::DetokenizeBatchResponse { results }))
    }
}
