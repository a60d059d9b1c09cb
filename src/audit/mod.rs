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
//! the chain. Checkpoints sign [`CheckpointMessage`] (v2): the instance, the checkpoint's own
//! seq, the seq and hash of the record just before it, whether it is the final seal of a clean
//! stop, and the seq of the checkpoint before it; so a rewritten chain, a cut tail re-sealed as
//! final, a replayed or moved checkpoint do not verify. The newest checkpoint is also kept in
//! the SQL store ([`crate::store::anchor`]), so that a log cut before it (the newest file or
//! the whole folder deleted) is found by `piiguard audit verify --anchor-from-config`.

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
    /// What kind of record this is (one of [`kind`]).
    pub kind: &'static str,
    /// The event or alarm name (`start`, `stop`, `audit_unavailable`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'static str>,
    /// Severity of an alarm (`warning`, `critical`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<&'static str>,
    /// Identity of the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<Arc<str>>,
    /// gRPC method (e.g. `Decrypt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    /// Policy operation (e.g. `decrypt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'static str>,
    /// `masked` for a masked reveal (a decrypt or detokenize that returned masked values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reveal: Option<&'static str>,
    /// Keyspace named by the call (after validation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyspace: Option<String>,
    /// Field named by the call (after validation).
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
    /// The subject references and key ids of a call that touched several, or is a batch or a
    /// stream (its members appear in the record itself).
    #[serde(flatten)]
    pub touched: Option<Box<TouchedLists>>,
    /// Items of a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    /// Items of a batch that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_items: Option<u32>,
    /// Items of a batch that the policy denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_items: Option<u32>,
    /// `ok`, `partial` (batch with failed items), `denied`, `refused` (limits, lockout), `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// gRPC code name (e.g. `PERMISSION_DENIED`).
    /// gRPC code name (e.g. `PERMISSION_DENIED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Stable error reason (e.g. `POLICY_DENIED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// How long the call took, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Correlation id of the call (also in the server log and in errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Text written by piiguard itself (never request content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    // Checkpoints.
    /// In a checkpoint: the seq of the last record it covers (v2: the record just before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers_seq: Option<u64>,
    /// In a checkpoint: the hex hash of the record at `covers_seq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers_hash: Option<String>,
    /// In a checkpoint: the version of the transit signing key that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Base64 RSA-PSS-SHA256 signature of the checkpoint message ([`CheckpointMessage`]; v1:
    /// [`checkpoint_message_v1`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The last checkpoint of a cleanly stopped process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_seal: Option<bool>,
    /// In a v2 checkpoint: the message it signs, [`CHECKPOINT_V2`] (absent in v1 checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'static str>,
    /// In a v2 checkpoint: the seq of the checkpoint before it in the chain (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_checkpoint: Option<u64>,
    // Segments.
    /// In a `segment_start`: whether the previous file ended with a final seal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_clean: Option<bool>,
    /// A file name: the previous file (`segment_start`), the next one (`segment_end`), a file
    /// removed by retention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// What a record says about the subject references and key ids a call touched
/// ([`call::RefSummary`]; docs/OPERATIONS.md#audit-log).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TouchedLists {
    /// Subject references a call touched when it touched several or is a batch or stream
    /// (hex, distinct, the first `audit.max_refs_per_record` in the order touched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_refs: Option<Vec<String>>,
    /// How many distinct subject references the call touched (listed or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_refs_total: Option<u64>,
    /// How many of them `subject_refs` leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_refs_omitted: Option<u64>,
    /// Digest of all of them ([`call::refs_digest`]: SHA-256, hex, over the sorted distinct
    /// hex values, each followed by a line feed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_refs_digest: Option<String>,
    /// Key ids a call touched, as `subject_refs` (hex, distinct, bounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ids: Option<Vec<String>>,
    /// How many distinct key ids the call touched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ids_total: Option<u64>,
    /// How many of them `key_ids` leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ids_omitted: Option<u64>,
    /// Digest of all of them ([`call::refs_digest`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ids_digest: Option<String>,
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

/// First line of the v2 checkpoint message, and the `message` member of a v2 checkpoint record.
pub const CHECKPOINT_V2: &str = "piiguard-audit-checkpoint-v2";

/// What a v2 checkpoint signs: everything that gives the chain its meaning.
///
/// Its canonical text ([`CheckpointMessage::text`]) is the version line followed by one
/// `name=value` line per member, in this order, each ending with `\n`:
///
/// ```text
/// piiguard-audit-checkpoint-v2
/// instance="<instance as a JSON string>"
/// seq=<seq of the checkpoint record itself>
/// covers_seq=<seq of the record just before it>
/// covers_hash=<hex SHA-256 line hash of that record, lowercase>
/// final=<true|false>
/// prev_checkpoint=<seq of the checkpoint before it in the chain, 0 if none>
/// ```
///
/// Numbers are decimal without leading zeros; the instance is JSON-escaped, so no value can
/// contain a line break and the text is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMessage {
    /// `server.instance` of the process that wrote the checkpoint.
    pub instance: String,
    /// Seq of the checkpoint record itself.
    pub seq: u64,
    /// Seq of the last record it covers (always `seq - 1` for the writer).
    pub covers_seq: u64,
    /// Hex line hash of the record at `covers_seq`.
    pub covers_hash: String,
    /// Whether this is the final seal of a clean stop.
    pub final_seal: bool,
    /// Seq of the checkpoint before it in the chain (0: none).
    pub prev_checkpoint: u64,
}

impl CheckpointMessage {
    /// The canonical text that is signed.
    pub fn text(&self) -> String {
        // Serializing a string to JSON cannot fail.
        let instance = serde_json::to_string(&self.instance).unwrap_or_else(|_| "\"\"".to_string());
        format!(
            "{CHECKPOINT_V2}\ninstance={instance}\nseq={}\ncovers_seq={}\ncovers_hash={}\nfinal={}\nprev_checkpoint={}\n",
            self.seq, self.covers_seq, self.covers_hash, self.final_seal, self.prev_checkpoint
        )
    }
}

/// The message a v1 checkpoint (piiguard before the v2 message) signed: only the covered seq
/// and hash. Kept to verify old logs, with weaker guarantees; the writer no longer signs it.
pub fn checkpoint_message_v1(covers_seq: u64, covers_hash_hex: &str) -> String {
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

    fn sample() -> CheckpointMessage {
        CheckpointMessage {
            instance: "pg-1".into(),
            seq: 42,
            covers_seq: 41,
            covers_hash: "ab".repeat(32),
            final_seal: false,
            prev_checkpoint: 17,
        }
    }

    #[test]
    fn checkpoint_message_v2_is_canonical_text() {
        assert_eq!(
            sample().text(),
            format!(
                "piiguard-audit-checkpoint-v2\ninstance=\"pg-1\"\nseq=42\ncovers_seq=41\ncovers_hash={}\nfinal=false\nprev_checkpoint=17\n",
                "ab".repeat(32)
            )
        );
        let mut f = sample();
        f.final_seal = true;
        assert!(f.text().contains("\nfinal=true\n"));
    }

    #[test]
    fn checkpoint_message_v2_changes_with_every_member() {
        let base = sample().text();
        let variants: [fn(&mut CheckpointMessage); 6] = [
            |m| m.instance = "pg-2".into(),
            |m| m.seq += 1,
            |m| m.covers_seq -= 1,
            |m| m.covers_hash = "cd".repeat(32),
            |m| m.final_seal = true,
            |m| m.prev_checkpoint = 0,
        ];
        for (i, edit) in variants.iter().enumerate() {
            let mut m = sample();
            edit(&mut m);
            assert_ne!(m.text(), base, "member {i} is not signed");
        }
        // v1 and v2 never sign the same bytes.
        assert_ne!(checkpoint_message_v1(41, &"ab".repeat(32)), base);
    }

    #[test]
    fn checkpoint_message_v2_escapes_the_instance() {
        // An instance name cannot smuggle in a line of its own (e.g. a second `final=`).
        let mut m = sample();
        m.instance = "a\nfinal=true\"".into();
        let t = m.text();
        assert_eq!(t.lines().count(), 7, "{t}");
        assert!(t.contains("instance=\"a\\nfinal=true\\\"\"\n"), "{t}");
        assert_eq!(t.matches("final=").count(), 2, "{t}");
        assert_eq!(t.lines().filter(|l| l.starts_with("final=")).count(), 1);
    }

    #[test]
    fn checkpoint_message_v1_is_unchanged() {
        assert_eq!(
            checkpoint_message_v1(7, "00ff"),
            "piiguard-audit-checkpoint-v1 seq=7 hash=00ff"
        );
    }
}
