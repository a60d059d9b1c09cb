//! The audit log: one record per call and per security event, append-only JSON lines,
//! hash-chained, with periodic checkpoints signed by the RSA key in Vault transit.
//!
//! - [`Record`] is what a call or event says. It never carries plaintext, token values, keys
//!   or raw subject ids: subjects appear only as their keyed hash (`subject_ref`) or as the
//!   random key id of a ciphertext.
//! - [`Auditor`] is the handle the services use: [`Auditor::record`] queues a record without
//!   blocking; a dedicated writer thread ([`writer`]) chains, batches, writes, rotates, signs
//!   checkpoints and applies retention.
//! - [`verify`] checks files offline (`piiguard audit verify`).
//!
//! Line format (docs/OPERATIONS.md#audit-log): each line is a JSON object whose last member is
//! `"hash"`, the hex SHA-256 of the line's own bytes without that member (the object closed
//! right after the previous member). Every record names the hash of the one before (`prev`)
//! and a sequence number (`seq`), so an edited, dropped, inserted or reordered record breaks
//! the chain; checkpoints sign `(seq, hash)` of the head so that a rewritten chain does not
//! verify either.

pub mod call;
pub mod verify;
pub mod webhook;
pub mod writer;

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

pub use call::CallRecord;
pub use writer::Auditor;

/// Hash of "nothing before": the `prev` of the very first record.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// What kind of record a line is.
pub mod kind {
    /// One gRPC call.
    pub const CALL: &str = "call";
    /// A security event (start, stop, policy reload, lockout lifted, ...).
    pub const EVENT: &str = "event";
    /// An alarm (has a severity).
    pub const ALARM: &str = "alarm";
    /// A signed checkpoint of the chain head.
    pub const CHECKPOINT: &str = "checkpoint";
    /// First record of a file: links to the last record of the previous file.
    pub const SEGMENT_START: &str = "segment_start";
    /// Last record of a rotated file.
    pub const SEGMENT_END: &str = "segment_end";
}

/// One audit record. Every member is optional except `kind`; the writer adds `seq`, `ts`,
/// `instance`, `prev` and `hash`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// When it happened (defaults to when the writer takes it).
    #[serde(skip)]
    pub at: Option<SystemTime>,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<Arc<str>>,
    /// gRPC method (e.g. `Decrypt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    /// Policy operation (e.g. `decrypt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyspace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Distinct `keyspace/field` pairs of a batch (when more than one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Keyed hash of the subject id (hex), never the id itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_ref: Option<String>,
    /// Random key id named by a ciphertext (hex): identifies the subject's DEK, not the subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_items: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_items: Option<u32>,
    /// `ok`, `partial` (batch with failed items), `denied`, `refused` (limits, lockout), `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// gRPC code name (e.g. `PERMISSION_DENIED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Text written by piiguard itself (never request content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    // Checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Base64 RSA-PSS-SHA256 signature of [`checkpoint_message`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The last checkpoint of a cleanly stopped process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_seal: Option<bool>,
    // Segments.
    /// In a `segment_start`: whether the previous file ended with a final seal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_clean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl Record {
    /// A security event.
    pub fn event(event: &'static str, detail: impl Into<String>) -> Self {
        Record {
            at: Some(SystemTime::now()),
            kind: kind::EVENT,
            event: Some(event),
            detail: Some(detail.into()),
            ..Record::default()
        }
    }
}

/// The message a checkpoint signs.
pub fn checkpoint_message(covers_seq: u64, covers_hash_hex: &str) -> String {
    format!("piiguard-audit-checkpoint-v1 seq={covers_seq} hash={covers_hash_hex}")
}

/// Length of the `,"hash":"<64 hex>"}` suffix of a line.
pub const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Turns a serialized record body (a JSON object) into a line (without `\n`) and its hash.
pub fn seal_line(body: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let mut line = Vec::with_capacity(body.len() + HASH_SUFFIX_LEN);
    line.extend_from_slice(body);
    let hash = seal_in_place(&mut line, 0);
    (line, hash)
}

/// Turns the record body at `buf[start..]` (a JSON object) into a line (without `\n`) in
/// place: hashes it and replaces its closing brace with the `"hash"` member. Returns the hash.
pub fn seal_in_place(buf: &mut Vec<u8>, start: usize) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &buf[start..]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(d.as_ref());
    if buf.len() > start {
        buf.pop();
    }
    buf.extend_from_slice(b",\"hash\":\"");
    call::push_hex(buf, &hash);
    buf.extend_from_slice(b"\"}");
    hash
}

/// Splits a line into its body (re-closed) and claimed hash, and checks the hash.
/// Returns `(body, hash, hash_ok)`.
pub fn open_line(line: &[u8]) -> Option<(Vec<u8>, [u8; 32], bool)> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return None;
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    if &line[cut..cut + 9] != b",\"hash\":\"" {
        return None;
    }
    let claimed = hex::decode(&line[cut + 9..cut + 9 + 64]).ok()?;
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&claimed);
    let mut body = line[..cut].to_vec();
    body.push(b'}');
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
    let ok = d.as_ref() == hash;
    Some((body, hash, ok))
}

/// The gRPC code name of a status code (as in the gRPC spec).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_seal_and_open() {
        let body = br#"{"seq":1,"kind":"call"}"#;
        let (line, hash) = seal_line(body);
        assert!(line.starts_with(br#"{"seq":1,"kind":"call","hash":""#));
        let (b, h, ok) = open_line(&line).unwrap();
        assert_eq!((b.as_slice(), h, ok), (body.as_slice(), hash, true));
        let mut edited = line.clone();
        edited[8] = b'2';
        assert!(!open_line(&edited).unwrap().2);
        assert!(open_line(b"{}").is_none());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["hash"].as_str().unwrap(), hex::encode(hash));
    }
}
