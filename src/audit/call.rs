//! The audit record of one gRPC call, made on the request path without a heap allocation and
//! serialised on the writer thread by hand (no `serde_json::Value`, no intermediate strings).
//!
//! Every call writes one of these, so it is the audit log's hot path: the request task only
//! fills a [`CallRecord`] (fixed-size fields, names inline, hashes as raw bytes) and queues it;
//! the writer thread turns it into exactly the line that serialising the equivalent
//! [`Record`] with serde would give (a unit test holds the two to the same bytes), so
//! `audit verify` and every reader see one format.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Record, kind};
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
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<str>),
}

impl Name {
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
    #[default]
    None,
    One {
        keyspace: Option<Name>,
        field: Option<Name>,
    },
    /// `keyspace/field` (or `keyspace`) of each distinct pair, when more than one.
    Many(Vec<String>),
}

/// Item counts of a batch call: `[items, failed, denied]`.
pub type ItemCounts = [u32; 3];

/// One call's audit record. Hashes and ids are raw bytes, hex-encoded by the writer.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub at: SystemTime,
    pub caller: Arc<str>,
    pub method: &'static str,
    pub operation: &'static str,
    pub scopes: Scopes,
    pub subject_ref: Option<[u8; 32]>,
    pub key_id: Option<[u8; crate::crypto::envelope::KEY_ID_LEN]>,
    pub items: Option<ItemCounts>,
    pub outcome: &'static str,
    pub code: &'static str,
    pub reason: Option<&'static str>,
    pub latency_us: u64,
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
        Record {
            at: Some(self.at),
            kind: kind::CALL,
            caller: Some(self.caller.clone()),
            method: Some(self.method),
            operation: Some(self.operation),
            keyspace,
            field,
            scopes,
            subject_ref: self.subject_ref.map(hex::encode),
            key_id: self.key_id.map(hex::encode),
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

/// Appends `t` as RFC 3339 UTC with microseconds (`2023-11-14T22:13:20.123456Z`), the same
/// text as [`super::rfc3339`], without going through a format description.
pub fn push_rfc3339(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let micros = d.subsec_micros();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(micros));
    buf.extend_from_slice(&out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            scopes,
            subject_ref: Some([0xab; 32]),
            key_id: Some([0x01; crate::crypto::envelope::KEY_ID_LEN]),
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
        let ts = super::super::rfc3339(c.at);
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
    fn timestamps_equal_the_time_crate() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let check = |micros: u64| {
            let t = UNIX_EPOCH + Duration::from_micros(micros);
            let mut b = Vec::new();
            push_rfc3339(&mut b, t);
            assert_eq!(String::from_utf8(b).unwrap(), super::super::rfc3339(t));
        };
        for m in [
            0,
            951_782_400_000_000,   // 2000-02-29
            4_107_542_399_999_999, // 2100-02-28T23:59:59.999999
            4_107_542_400_000_000, // 2100-03-01
            253_402_300_799_999_999,
        ] {
            check(m);
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(x % 253_402_300_800_000_000);
        }
    }

    #[test]
    fn names_inline_and_boxed() {
        assert!(matches!(Name::new(&"a".repeat(64)), Name::Inline { .. }));
        assert!(matches!(Name::new(&"a".repeat(65)), Name::Heap(_)));
        assert_eq!(Name::new("orders").as_str(), "orders");
        assert!(Name::new("é") == *"é");
    }
}
