//! The audit record of one gRPC call, made on the request path without a heap allocation and
//! serialised on the writer thread by hand (no `serde_json::Value`, no intermediate strings).
//!
//! Every call writes one of these, so it is the audit log's hot path: the request task only
//! fills a [`CallRecord`] (fixed-size fields, names inline, hashes as raw bytes) and queues it;
//! the writer thread turns it into exactly the line that serialising the equivalent
//! [`Record`] with serde would give (a unit test holds the two to the same bytes), so
//! `audit verify` and every reader see one format.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Record, kind};
use crate::domain::time::push_rfc3339;
use crate::error::CorrelationId;

/// Appends the lowercase hex of `bytes` to `buf`.
pub fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    let start = buf.len();
    buf.resize(start + 2 * bytes.len(), 0);
    // The slice is exactly twice as long as the input, the only way this can fail.
    let _ = hex::encode_to_slice(bytes, &mut buf[start..]);
}

/// Longest name kept inline (keyspace names are at most 63 bytes, field names 64).
const INLINE: usize = 64;

/// A keyspace or field name: inline up to 64 bytes (every valid name), boxed beyond.
#[derive(Clone)]
pub enum Name {
    /// Up to 64 bytes, stored in place.
    Inline {
        /// Bytes used in `buf`.
        len: u8,
        /// The name's bytes, then zeros.
        buf: [u8; INLINE],
    },
    /// A longer name (never a valid keyspace or field name).
    Heap(Box<str>),
}

impl Name {
    /// The name `s`, inline if it fits.
    pub fn new(s: &str) -> Self {
        if s.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            Name::Inline {
                len: s.len() as u8,
                buf,
            }
        } else {
            Name::Heap(s.into())
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        match self {
            // Copied from a `&str` whole, so always UTF-8.
            Name::Inline { len, buf } => std::str::from_utf8(&buf[..*len as usize]).unwrap_or(""),
            Name::Heap(s) => s,
        }
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The keyspace/field pairs a call touched.
#[derive(Debug, Clone, Default)]
pub enum Scopes {
    /// The call named no keyspace or field.
    #[default]
    None,
    /// One keyspace/field pair (either may be missing).
    One {
        /// The keyspace named.
        keyspace: Option<Name>,
        /// The field named.
        field: Option<Name>,
    },
    /// `keyspace/field` (or `keyspace`) of each distinct pair, when more than one.
    Many(Vec<String>),
}

/// Item counts of a batch call: `[items, failed, denied]`.
pub type ItemCounts = [u32; 3];

/// Length of a key id.
const KEY_ID_LEN: usize = crate::crypto::envelope::KEY_ID_LEN;

/// The subject references and key ids a call touched, in the order it touched them (repeats
/// possible), kept when the call is a batch or a stream or touched more than one. The request
/// path only pushes raw bytes; the writer thread sorts, counts, lists and digests them
/// ([`RefSummary`]).
#[derive(Debug, Clone, Default)]
pub struct Touched {
    /// Subject references (keyed hashes of subject ids, never the ids).
    pub subject_refs: Vec<[u8; 32]>,
    /// Random key ids of DEKs.
    pub key_ids: Vec<[u8; KEY_ID_LEN]>,
    /// How many of each the record lists by name (`audit.max_refs_per_record`).
    pub max_listed: usize,
}

/// What a record says about one list of a [`Touched`]: the first `max_listed` distinct values
/// in the order touched, how many distinct values there were, and [`refs_digest`] of them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSummary<const N: usize> {
    /// The first distinct values, first touched first.
    pub listed: Vec<[u8; N]>,
    /// Distinct values, listed or not.
    pub total: u64,
    /// [`refs_digest`] of every distinct value.
    pub digest: [u8; 32],
}

impl<const N: usize> RefSummary<N> {
    /// The summary of `touched` (in the order touched, repeats allowed); `None` if empty.
    pub fn of(touched: &[[u8; N]], max_listed: usize) -> Option<Self> {
        if touched.is_empty() {
            return None;
        }
        let mut sorted = touched.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut seen = vec![false; sorted.len()];
        let mut listed = Vec::with_capacity(max_listed.min(sorted.len()));
        for v in touched {
            if listed.len() >= max_listed {
                break;
            }
            if let Ok(i) = sorted.binary_search(v)
                && !std::mem::replace(&mut seen[i], true)
            {
                listed.push(*v);
            }
        }
        Some(Self {
            listed,
            total: sorted.len() as u64,
            digest: refs_digest(&sorted),
        })
    }

    /// Distinct values the list leaves out.
    pub fn omitted(&self) -> u64 {
        self.total - self.listed.len() as u64
    }

    /// Appends the four members `<name>`, `<name>_total`, `<name>_omitted`, `<name>_digest`.
    fn write(&self, buf: &mut Vec<u8>, names: &[&str; 4]) {
        member(buf, names[0]);
        buf.push(b'[');
        for (i, v) in self.listed.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.push(b'"');
            push_hex(buf, v);
            buf.push(b'"');
        }
        buf.push(b']');
        member(buf, names[1]);
        push_u64(buf, self.total);
        member(buf, names[2]);
        push_u64(buf, self.omitted());
        hex_member(buf, names[3], &self.digest);
    }
}

const SUBJECT_REFS: [&str; 4] = [
    "subject_refs",
    "subject_refs_total",
    "subject_refs_omitted",
    "subject_refs_digest",
];
const KEY_IDS: [&str; 4] = [
    "key_ids",
    "key_ids_total",
    "key_ids_omitted",
    "key_ids_digest",
];

/// The digest of a set of subject references or key ids (`subject_refs_digest`,
/// `key_ids_digest`): SHA-256 over every distinct value as lowercase hex followed by a line
/// feed, in ascending order, as lowercase hex. `sorted` must be sorted and without repeats
/// (byte order is the order of the hex text). An auditor with a list of values recomputes it
/// with `LC_ALL=C sort -u list.txt | sha256sum`.
pub fn refs_digest<const N: usize>(sorted: &[[u8; N]]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut line = Vec::with_capacity(2 * N + 1);
    for v in sorted {
        line.clear();
        push_hex(&mut line, v);
        line.push(b'\n');
        ctx.update(&line);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// One call's audit record. Hashes and ids are raw bytes, hex-encoded by the writer.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// When the call was taken.
    pub at: SystemTime,
    /// Identity of the caller.
    pub caller: Arc<str>,
    /// gRPC method (e.g. `Decrypt`).
    pub method: &'static str,
    /// Policy operation (e.g. `decrypt`).
    pub operation: &'static str,
    /// `masked` for a masked reveal (docs/SEARCH.md); absent otherwise.
    pub reveal: Option<&'static str>,
    /// Keyspace/field pairs the call touched.
    pub scopes: Scopes,
    /// Keyed hash of the subject id, never the id itself.
    pub subject_ref: Option<[u8; 32]>,
    /// Random key id named by a ciphertext.
    pub key_id: Option<[u8; crate::crypto::envelope::KEY_ID_LEN]>,
    /// Every subject reference and key id, when the call is a batch or a stream or touched
    /// several (boxed: a unary call carries none and allocates nothing).
    pub touched: Option<Box<Touched>>,
    /// Item counts of a batch.
    pub items: Option<ItemCounts>,
    /// `ok`, `partial`, `denied`, `refused`, `error`, `cancelled`.
    pub outcome: &'static str,
    /// gRPC code name.
    pub code: &'static str,
    /// Stable error reason.
    pub reason: Option<&'static str>,
    /// How long the call took, in microseconds.
    pub latency_us: u64,
    /// Correlation id of the call.
    pub correlation_id: CorrelationId,
}

fn push_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn push_u64(buf: &mut Vec<u8>, n: u64) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "{n}");
}

fn member(buf: &mut Vec<u8>, name: &str) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\":");
}

fn hex_member(buf: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    member(buf, name);
    buf.push(b'"');
    push_hex(buf, bytes);
    buf.push(b'"');
}

impl CallRecord {
    /// Appends the line body (the JSON object the line's hash covers) for sequence number
    /// `seq` after the record whose hash is `prev`. `instance` is already a JSON string.
    pub fn write_body(&self, buf: &mut Vec<u8>, seq: u64, instance_json: &[u8], prev: &[u8; 32]) {
        buf.extend_from_slice(b"{\"seq\":");
        push_u64(buf, seq);
        buf.extend_from_slice(b",\"ts\":\"");
        push_rfc3339(buf, self.at);
        buf.extend_from_slice(b"\",\"instance\":");
        buf.extend_from_slice(instance_json);
        buf.extend_from_slice(b",\"kind\":\"");
        buf.extend_from_slice(kind::CALL.as_bytes());
        buf.push(b'"');
        member(buf, "caller");
        push_str(buf, &self.caller);
        member(buf, "method");
        push_str(buf, self.method);
        member(buf, "operation");
        push_str(buf, self.operation);
        if let Some(r) = self.reveal {
            member(buf, "reveal");
            push_str(buf, r);
        }
        match &self.scopes {
            Scopes::None => {}
            Scopes::One { keyspace, field } => {
                if let Some(k) = keyspace {
                    member(buf, "keyspace");
                    push_str(buf, k.as_str());
                }
                if let Some(f) = field {
                    member(buf, "field");
                    push_str(buf, f.as_str());
                }
            }
            Scopes::Many(list) => {
                member(buf, "scopes");
                buf.push(b'[');
                for (i, s) in list.iter().enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    push_str(buf, s);
                }
                buf.push(b']');
            }
        }
        if let Some(s) = &self.subject_ref {
            hex_member(buf, "subject_ref", s);
        }
        if let Some(k) = &self.key_id {
            hex_member(buf, "key_id", k);
        }
        if let Some(t) = &self.touched {
            if let Some(s) = RefSummary::of(&t.subject_refs, t.max_listed) {
                s.write(buf, &SUBJECT_REFS);
            }
            if let Some(s) = RefSummary::of(&t.key_ids, t.max_listed) {
                s.write(buf, &KEY_IDS);
            }
        }
        if let Some([items, failed, denied]) = self.items {
            member(buf, "items");
            push_u64(buf, u64::from(items));
            member(buf, "failed_items");
            push_u64(buf, u64::from(failed));
            member(buf, "denied_items");
            push_u64(buf, u64::from(denied));
        }
        member(buf, "outcome");
        push_str(buf, self.outcome);
        member(buf, "code");
        push_str(buf, self.code);
        if let Some(r) = self.reason {
            member(buf, "reason");
            push_str(buf, r);
        }
        member(buf, "latency_us");
        push_u64(buf, self.latency_us);
        member(buf, "correlation_id");
        push_str(buf, self.correlation_id.as_str());
        buf.extend_from_slice(b",\"prev\":\"");
        push_hex(buf, prev);
        buf.extend_from_slice(b"\"}");
    }

    /// The same record as a generic [`Record`] (what `write_body` must serialise like).
    pub fn to_record(&self) -> Record {
        let (keyspace, field, scopes) = match &self.scopes {
            Scopes::None => (None, None, None),
            Scopes::One { keyspace, field } => (
                keyspace.as_ref().map(|k| k.as_str().to_string()),
                field.as_ref().map(|f| f.as_str().to_string()),
                None,
            ),
            Scopes::Many(list) => (None, None, Some(list.clone())),
        };
        let subjects = self
            .touched
            .as_ref()
            .and_then(|t| RefSummary::of(&t.subject_refs, t.max_listed));
        let keys = self
            .touched
            .as_ref()
            .and_then(|t| RefSummary::of(&t.key_ids, t.max_listed));
        Record {
            at: Some(self.at),
            kind: kind::CALL,
            caller: Some(self.caller.clone()),
            method: Some(self.method),
            operation: Some(self.operation),
            reveal: self.reveal,
            keyspace,
            field,
            scopes,
            subject_ref: self.subject_ref.map(hex::encode),
            key_id: self.key_id.map(hex::encode),
            touched: (subjects.is_some() || keys.is_some()).then(|| {
                Box::new(super::TouchedLists {
                    subject_refs: subjects
                        .as_ref()
                        .map(|s| s.listed.iter().map(hex::encode).collect()),
                    subject_refs_total: subjects.as_ref().map(|s| s.total),
                    subject_refs_omitted: subjects.as_ref().map(RefSummary::omitted),
                    subject_refs_digest: subjects.as_ref().map(|s| hex::encode(s.digest)),
                    key_ids: keys
                        .as_ref()
                        .map(|s| s.listed.iter().map(hex::encode).collect()),
                    key_ids_total: keys.as_ref().map(|s| s.total),
                    key_ids_omitted: keys.as_ref().map(RefSummary::omitted),
                    key_ids_digest: keys.as_ref().map(|s| hex::encode(s.digest)),
                })
            }),
            items: self.items.map(|i| i[0]),
            failed_items: self.items.map(|i| i[1]),
            denied_items: self.items.map(|i| i[2]),
            outcome: Some(self.outcome),
            code: Some(self.code),
            reason: self.reason,
            latency_us: Some(self.latency_us),
            correlation_id: Some(self.correlation_id.to_string()),
            ..Record::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn sample(
        scopes: Scopes,
        items: Option<ItemCounts>,
        reason: Option<&'static str>,
    ) -> CallRecord {
        CallRecord {
            at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            caller: Arc::from("spiffe://shop.local/ns/\"odd\"\\name\u{1}é"),
            method: "Encrypt",
            operation: "encrypt",
            reveal: None,
            scopes,
            subject_ref: Some([0xab; 32]),
            key_id: Some([0x01; crate::crypto::envelope::KEY_ID_LEN]),
            touched: None,
            items,
            outcome: "ok",
            code: "OK",
            reason,
            latency_us: 1234,
            correlation_id: CorrelationId::new(),
        }
    }

    #[derive(serde::Serialize)]
    struct Line<'a> {
        seq: u64,
        ts: &'a str,
        instance: &'a str,
        #[serde(flatten)]
        rec: &'a Record,
        prev: &'a str,
    }

    fn via_serde(c: &CallRecord, seq: u64, instance: &str, prev: &[u8; 32]) -> Vec<u8> {
        let r = c.to_record();
        let ts = crate::domain::time::rfc3339(c.at);
        let prev = hex::encode(prev);
        serde_json::to_vec(&Line {
            seq,
            ts: &ts,
            instance,
            rec: &r,
            prev: &prev,
        })
        .unwrap()
    }

    #[test]
    fn hand_written_lines_equal_serde_lines() {
        let cases = [
            sample(Scopes::None, None, None),
            sample(
                Scopes::One {
                    keyspace: Some(Name::new("orders")),
                    field: Some(Name::new("email")),
                },
                None,
                None,
            ),
            sample(
                Scopes::One {
                    keyspace: Some(Name::new("crm")),
                    field: None,
                },
                Some([1000, 3, 2]),
                Some("POLICY_DENIED"),
            ),
            sample(
                Scopes::Many(vec!["orders/email".into(), "crm".into()]),
                Some([2, 0, 0]),
                None,
            ),
            sample(
                Scopes::One {
                    keyspace: Some(Name::new(&"k".repeat(100))),
                    field: Some(Name::new(&"f".repeat(64))),
                },
                None,
                None,
            ),
        ];
        let mut many = sample(Scopes::None, Some([5, 1, 0]), None);
        many.touched = Some(Box::new(Touched {
            subject_refs: vec![[3; 32], [1; 32], [3; 32], [2; 32], [9; 32]],
            key_ids: vec![[7; KEY_ID_LEN]],
            max_listed: 2,
        }));
        let mut only_keys = sample(Scopes::None, Some([0, 0, 0]), None);
        only_keys.touched = Some(Box::new(Touched {
            subject_refs: Vec::new(),
            key_ids: vec![[7; KEY_ID_LEN], [6; KEY_ID_LEN]],
            max_listed: 64,
        }));
        let mut masked = sample(Scopes::None, None, None);
        masked.reveal = Some("masked");
        let cases: Vec<CallRecord> = cases.into_iter().chain([many, only_keys, masked]).collect();
        let instance = "pod-\"1\"";
        let instance_json = serde_json::to_vec(instance).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let prev = [i as u8; 32];
            let mut buf = b"junk".to_vec();
            c.write_body(&mut buf, 42 + i as u64, &instance_json, &prev);
            let want = via_serde(c, 42 + i as u64, instance, &prev);
            assert_eq!(
                String::from_utf8_lossy(&buf[4..]),
                String::from_utf8_lossy(&want),
                "case {i}"
            );
        }
    }

    #[test]
    fn touched_lists_are_bounded_counted_and_digested() {
        let r = |b: u8| [b; 32];
        let touched = [r(3), r(1), r(3), r(2), r(9), r(1)];
        let s = RefSummary::of(&touched, 2).unwrap();
        // First distinct values in the order touched; all distinct ones counted.
        assert_eq!(s.listed, vec![r(3), r(1)]);
        assert_eq!((s.total, s.omitted()), (4, 2));
        // The documented canonical form: sorted distinct lowercase hex, one per line.
        let text: String = [r(1), r(2), r(3), r(9)]
            .iter()
            .map(|v| format!("{}\n", hex::encode(v)))
            .collect();
        let want = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        assert_eq!(s.digest.as_slice(), want.as_ref());
        // The digest is of the set: order and repeats do not change it, the bound does not
        // either.
        let other = RefSummary::of(&[r(9), r(2), r(1), r(3)], 64).unwrap();
        assert_eq!(other.digest, s.digest);
        assert_eq!((other.listed.len(), other.omitted()), (4, 0));
        assert!(RefSummary::<32>::of(&[], 64).is_none());
    }

    #[test]
    fn names_inline_and_boxed() {
        assert!(matches!(Name::new(&"a".repeat(64)), Name::Inline { .. }));
        assert!(matches!(Name::new(&"a".repeat(65)), Name::Heap(_)));
        assert_eq!(Name::new("orders").as_str(), "orders");
        assert!(Name::new("é") == *"é");
    }
}
