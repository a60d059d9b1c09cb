//! [`Client`]: one channel, the retry loop around every call, and typed helpers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::batch::{Chunks, chunks};
use crate::config::ClientConfig;
use crate::error::Error;
use crate::pb;
use crate::retry::{self, Idempotency, RetryPolicy, TokioClock};

/// A piiguard client: one mutual-TLS [`Channel`] (HTTP/2, multiplexed, reconnecting), the
/// default deadline and the retry policy. Cheap to clone: clones share the channel and the
/// retry counter; keep one per process.
///
/// Each typed helper says whether it is [`Idempotency::Idempotent`] (retried on every
/// retryable failure) or not (retried only when the server refused it before doing anything).
/// For the other RPCs use the generated clients ([`crypto`](Self::crypto), ...) directly, or
/// [`call`](Self::call) to get the deadline and the retries.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    inner: Arc<Inner>,
}

struct Inner {
    deadline: Duration,
    retry: RetryPolicy,
    chunks: Chunks,
    clock: TokioClock,
    retries: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("deadline", &self.inner.deadline)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects now (TCP and TLS handshake within `connect_timeout`): a wrong CA, server name
    /// or refused certificate is reported here, as [`Error::Connect`] with a
    /// [`ConnectHint`](crate::ConnectHint).
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        let channel = config
            .endpoint()?
            .connect()
            .await
            .map_err(|e| Error::connect(&config.endpoint, &e))?;
        Ok(Self::from_channel(channel, config.deadline, config.retry))
    }

    /// Connects on first use (a service that starts before piiguard); connection failures
    /// then surface as `UNAVAILABLE` calls, which are retried.
    pub fn connect_lazy(config: ClientConfig) -> Result<Self, Error> {
        let channel = config.endpoint()?.connect_lazy();
        Ok(Self::from_channel(channel, config.deadline, config.retry))
    }

    /// A client over a channel made elsewhere.
    pub fn from_channel(channel: Channel, deadline: Duration, retry: RetryPolicy) -> Self {
        Client {
            channel,
            inner: Arc::new(Inner {
                deadline,
                retry,
                chunks: Chunks::default(),
                clock: TokioClock::new(),
                retries: AtomicU64::new(0),
            }),
        }
    }

    /// The same channel with another default deadline, retry policy or chunk limits (a new
    /// retry counter).
    pub fn reconfigured(&self, deadline: Duration, retry: RetryPolicy, chunks: Chunks) -> Self {
        Client {
            channel: self.channel.clone(),
            inner: Arc::new(Inner {
                deadline,
                retry,
                chunks,
                clock: TokioClock::new(),
                retries: AtomicU64::new(0),
            }),
        }
    }

    /// The channel, for generated clients of your own.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Retries made so far by this client and its clones (for metrics and tests).
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// The generated Crypto client on the shared channel (no retries, no default deadline).
    pub fn crypto(&self) -> pb::crypto_client::CryptoClient<Channel> {
        pb::crypto_client::CryptoClient::new(self.channel.clone())
    }

    /// The generated Tokens client.
    pub fn tokens(&self) -> pb::tokens_client::TokensClient<Channel> {
        pb::tokens_client::TokensClient::new(self.channel.clone())
    }

    /// The generated Erasure client.
    pub fn erasure(&self) -> pb::erasure_client::ErasureClient<Channel> {
        pb::erasure_client::ErasureClient::new(self.channel.clone())
    }

    /// The generated Admin client.
    pub fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel.clone())
    }

    /// The generated Keys client.
    pub fn keys(&self) -> pb::keys_client::KeysClient<Channel> {
        pb::keys_client::KeysClient::new(self.channel.clone())
    }

    /// Calls a unary RPC with the default deadline (retries included; each attempt gets what
    /// is left, sent as `grpc-timeout` and enforced here) and the retry policy. `method` names
    /// the RPC in errors; `rpc` makes one attempt from a request, e.g.
    /// `|r| { let mut c = client.crypto(); async move { c.rewrap(r).await } }`.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        idempotency: Idempotency,
        request: Req,
        mut rpc: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let inner = &self.inner;
        retry::run(
            &inner.retry,
            idempotency,
            method,
            inner.deadline,
            &inner.clock,
            &inner.retries,
            |left| {
                let mut r = tonic::Request::new(request.clone());
                r.set_timeout(left);
                let attempt = rpc(r);
                async move {
                    match tokio::time::timeout(left, attempt).await {
                        Ok(r) => r.map(tonic::Response::into_inner),
                        Err(_) => Err(tonic::Status::deadline_exceeded(
                            "the call's deadline passed (client side)",
                        )),
                    }
                }
            },
        )
        .await
    }

    // --- Crypto ---------------------------------------------------------------------------

    /// Encrypts `plaintext` for a subject's field; returns the text-form ciphertext
    /// (`pg1.…`, ASCII). Idempotent: a ciphertext is not stored, so a repeat only makes
    /// another valid one.
    pub async fn encrypt(
        &self,
        keyspace: &str,
        subject: &str,
        field: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let r = self
            .encrypt_with(pb::EncryptRequest {
                keyspace: keyspace.into(),
                subject: subject.into(),
                field: field.into(),
                plaintext: plaintext.to_vec(),
                encoding: pb::CiphertextEncoding::Text as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.ciphertext)
    }

    /// Encrypt with every option (context, binary encoding, blind index). Idempotent.
    pub async fn encrypt_with(
        &self,
        req: pb::EncryptRequest,
    ) -> Result<pb::EncryptResponse, Error> {
        self.call("Crypto/Encrypt", Idempotency::Idempotent, req, |r| {
            let mut c = self.crypto();
            async move { c.encrypt(r).await }
        })
        .await
    }

    /// Decrypts a ciphertext (binary or text form) of `field`; the plaintext is wiped when
    /// dropped. Idempotent.
    pub async fn decrypt(
        &self,
        field: &str,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut r = self
            .decrypt_with(pb::DecryptRequest {
                field: field.into(),
                ciphertext: ciphertext.to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(Zeroizing::new(std::mem::take(&mut r.plaintext)))
    }

    /// Decrypt with every option (context, keyspace check, masked reveal). Idempotent.
    pub async fn decrypt_with(
        &self,
        req: pb::DecryptRequest,
    ) -> Result<pb::DecryptResponse, Error> {
        self.call("Crypto/Decrypt", Idempotency::Idempotent, req, |r| {
            let mut c = self.crypto();
            async move { c.decrypt(r).await }
        })
        .await
    }

    /// Encrypts many values: split into server-sized chunks (see [`Chunks`]), one
    /// EncryptBatch call each (each with the default deadline and retries; idempotent).
    /// Returns one result per item, in order; an item's own failure is in its result.
    pub async fn encrypt_batch(
        &self,
        items: Vec<pb::EncryptRequest>,
    ) -> Result<Vec<pb::EncryptResult>, Error> {
        let sizes: Vec<usize> = items.iter().map(prost::Message::encoded_len).collect();
        let mut out = Vec::with_capacity(items.len());
        for range in chunks(sizes, self.inner.chunks) {
            let req = pb::EncryptBatchRequest {
                items: items[range.clone()].to_vec(),
            };
            let r = self
                .call("Crypto/EncryptBatch", Idempotency::Idempotent, req, |r| {
                    let mut c = self.crypto();
                    async move { c.encrypt_batch(r).await }
                })
                .await?;
            check_len("Crypto/EncryptBatch", range.len(), r.results.len())?;
            out.extend(r.results);
        }
        Ok(out)
    }

    /// Decrypts many ciphertexts, in server-sized chunks as [`encrypt_batch`](Self::encrypt_batch).
    /// Idempotent.
    pub async fn decrypt_batch(
        &self,
        items: Vec<pb::DecryptRequest>,
    ) -> Result<Vec<pb::DecryptResult>, Error> {
        let sizes: Vec<usize> = items.iter().map(prost::Message::encoded_len).collect();
        let mut out = Vec::with_capacity(items.len());
        for range in chunks(sizes, self.inner.chunks) {
            let req = pb::DecryptBatchRequest {
                items: items[range.clone()].to_vec(),
            };
            let r = self
                .call("Crypto/DecryptBatch", Idempotency::Idempotent, req, |r| {
                    let mut c = self.crypto();
                    async move { c.decrypt_batch(r).await }
                })
                .await?;
            check_len("Crypto/DecryptBatch", range.len(), r.results.len())?;
            out.extend(r.results);
        }
        Ok(out)
    }

    /// The blind index of `value` for a field (`index`: the newest key version; `all`: every
    /// queryable version, to search with). Idempotent.
    pub async fn blind_index(
        &self,
        keyspace: &str,
        field: &str,
        value: &[u8],
    ) -> Result<pb::BlindIndexResponse, Error> {
        let req = pb::BlindIndexRequest {
            keyspace: keyspace.into(),
            field: field.into(),
            value: value.to_vec(),
        };
        self.call("Crypto/BlindIndex", Idempotency::Idempotent, req, |r| {
            let mut c = self.crypto();
            async move { c.blind_index(r).await }
        })
        .await
    }

    /// Every index to query a column with for `value` (all queryable key versions, newest
    /// first). Idempotent.
    pub async fn blind_indexes(
        &self,
        keyspace: &str,
        field: &str,
        value: &[u8],
    ) -> Result<Vec<String>, Error> {
        let r = self.blind_index(keyspace, field, value).await?;
        Ok(if r.all.is_empty() {
            vec![r.index]
        } else {
            r.all.into_iter().map(|v| v.index).collect()
        })
    }

    /// Opens a sealed envelope (made with the sealing public key, e.g. `piiguard seal`) into a
    /// ciphertext of the subject, or its plaintext with `return_plaintext`. Idempotent: nothing
    /// is stored.
    pub async fn unseal(&self, req: pb::UnsealRequest) -> Result<pb::UnsealResponse, Error> {
        self.call("Crypto/Unseal", Idempotency::Idempotent, req, |r| {
            let mut c = self.crypto();
            async move { c.unseal(r).await }
        })
        .await
    }

    // --- Tokens ---------------------------------------------------------------------------

    /// A token for `value`, in the default (opaque) format and the given mode. RANDOM is not
    /// idempotent (each call stores a token row: a repeat after a lost answer would store a
    /// second copy of the value), so it is retried only when rate-limited; the deterministic
    /// modes are (a repeat returns the same token).
    pub async fn tokenize(
        &self,
        keyspace: &str,
        subject: &str,
        field: &str,
        value: &str,
        mode: pb::TokenMode,
    ) -> Result<String, Error> {
        let r = self
            .tokenize_with(pb::TokenizeRequest {
                keyspace: keyspace.into(),
                subject: subject.into(),
                field: field.into(),
                value: value.into(),
                mode: mode as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.token)
    }

    /// Tokenize with every option (format, keep_last, TTL); idempotency as
    /// [`tokenize`](Self::tokenize), by mode.
    pub async fn tokenize_with(
        &self,
        req: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, Error> {
        let idem = token_idempotency(req.mode);
        self.call("Tokens/Tokenize", idem, req, |r| {
            let mut c = self.tokens();
            async move { c.tokenize(r).await }
        })
        .await
    }

    /// Tokenizes many values in server-sized chunks; idempotent only if every item is of a
    /// deterministic mode (see [`tokenize`](Self::tokenize)).
    pub async fn tokenize_batch(
        &self,
        items: Vec<pb::TokenizeRequest>,
    ) -> Result<Vec<pb::TokenizeResult>, Error> {
        let sizes: Vec<usize> = items.iter().map(prost::Message::encoded_len).collect();
        let mut out = Vec::with_capacity(items.len());
        for range in chunks(sizes, self.inner.chunks) {
            let part = &items[range.clone()];
            let idem = if part
                .iter()
                .all(|i| token_idempotency(i.mode) == Idempotency::Idempotent)
            {
                Idempotency::Idempotent
            } else {
                Idempotency::NotIdempotent
            };
            let req = pb::TokenizeBatchRequest {
                items: part.to_vec(),
            };
            let r = self
                .call("Tokens/TokenizeBatch", idem, req, |r| {
                    let mut c = self.tokens();
                    async move { c.tokenize_batch(r).await }
                })
                .await?;
            check_len("Tokens/TokenizeBatch", range.len(), r.results.len())?;
            out.extend(r.results);
        }
        Ok(out)
    }

    /// The value behind a token (wiped when dropped). Idempotent.
    pub async fn detokenize(
        &self,
        keyspace: &str,
        token: &str,
    ) -> Result<Zeroizing<String>, Error> {
        let req = pb::DetokenizeRequest {
            keyspace: keyspace.into(),
            token: token.into(),
            ..Default::default()
        };
        let mut r = self
            .call("Tokens/Detokenize", Idempotency::Idempotent, req, |r| {
                let mut c = self.tokens();
                async move { c.detokenize(r).await }
            })
            .await?;
        Ok(Zeroizing::new(std::mem::take(&mut r.value)))
    }

    // --- Erasure --------------------------------------------------------------------------

    /// Shreds a subject in `keyspace` (empty: every keyspace). Idempotent with the same
    /// `request_id`: a repeat answers `ALREADY_SHREDDED` with the first shred's certificate.
    /// `reason` and `request_id` go into the signed certificate: never personal data.
    pub async fn shred(
        &self,
        subject: &str,
        keyspace: &str,
        request_id: &str,
        reason: &str,
    ) -> Result<pb::ShredResponse, Error> {
        let req = pb::ShredRequest {
            subject: subject.into(),
            keyspace: keyspace.into(),
            reason: reason.into(),
            request_id: request_id.into(),
        };
        self.call("Erasure/Shred", Idempotency::Idempotent, req, |r| {
            let mut c = self.erasure();
            async move { c.shred(r).await }
        })
        .await
    }

    /// Where a subject stands in `keyspace` (empty: every keyspace). Idempotent.
    pub async fn shred_status(
        &self,
        subject: &str,
        keyspace: &str,
    ) -> Result<pb::GetShredStatusResponse, Error> {
        let req = pb::GetShredStatusRequest {
            subject: subject.into(),
            keyspace: keyspace.into(),
        };
        self.call(
            "Erasure/GetShredStatus",
            Idempotency::Idempotent,
            req,
            |r| {
                let mut c = self.erasure();
                async move { c.get_shred_status(r).await }
            },
        )
        .await
    }
}

/// Tokenize RANDOM (and UNSPECIFIED, which is RANDOM) stores a new row per call.
fn token_idempotency(mode: i32) -> Idempotency {
    match pb::TokenMode::try_from(mode) {
        Ok(pb::TokenMode::Deterministic | pb::TokenMode::DeterministicJoin) => {
            Idempotency::Idempotent
        }
        _ => Idempotency::NotIdempotent,
    }
}

fn check_len(method: &'static str, sent: usize, answered: usize) -> Result<(), Error> {
    if sent == answered {
        Ok(())
    } else {
        Err(Error::BatchMismatch {
            method,
            sent,
            answered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_not_idempotent() {
        assert_eq!(token_idempotency(0), Idempotency::NotIdempotent);
        assert_eq!(
            token_idempotency(pb::TokenMode::Random as i32),
            Idempotency::NotIdempotent
        );
        assert_eq!(
            token_idempotency(pb::TokenMode::Deterministic as i32),
            Idempotency::Idempotent
        );
        assert_eq!(
            token_idempotency(pb::TokenMode::DeterministicJoin as i32),
            Idempotency::Idempotent
        );
    }
}
