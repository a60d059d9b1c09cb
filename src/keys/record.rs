//! The DEK record in Vault KV (`deks/<ks>/<key_id>`): every version of one subject's DEK.
//!
//! Format 2 (written by every build that can rotate keys):
//!
//! ```json
//! { "format": 2, "subject_ref": "<hex>", "alg": "aes-256-gcm", "created_at": 1700000000,
//!   "current": 2,
//!   "versions": { "1": { "wrapped": "vault:v1:...", "created_at": 1700000000 },
//!                 "2": { "wrapped": "vault:v3:...", "created_at": 1710000000 } } }
//! ```
//!
//! The DEK version a ciphertext names is a key of `versions`; only the newest KV version of
//! the record is read, so a rewrite (a rotation adding a version, a KEK rewrap replacing the
//! `wrapped` values) never changes what a ciphertext names.
//!
//! Format 1 (older builds; no `format` key): `{subject_ref, wrapped, alg, created_at}` holding
//! one DEK whose version is the KV version the record was written at (always 1 in practice: it
//! is created with check-and-set 0 and never rewritten). [`DekRecord::parse`] reads it as a
//! format-2 record with that single version, and [`DekRecord::to_json`] writes it back as
//! format 2, keeping the version number.
//!
//! A shred deletes the record's KV metadata, which destroys every KV version and so every DEK
//! version at once.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::crypto::aead::Algorithm;
use crate::error::{Error, Result};
use crate::secret::WrappedDek;

/// The current format number.
pub const FORMAT: u64 = 2;

/// One version of a DEK, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct DekVersion {
    /// The DEK wrapped by the keyspace KEK (the `vault:vN:` prefix names the KEK version).
    pub wrapped: WrappedDek,
    /// Unix seconds.
    pub created_at: i64,
}

/// Every version of one subject's DEK.
#[derive(Clone, PartialEq, Eq)]
pub struct DekRecord {
    /// Lower-case hex subject reference of the subject the DEK belongs to.
    pub subject_ref: String,
    /// The AEAD algorithm of every version.
    pub alg: Algorithm,
    /// Unix seconds of the first version.
    pub created_at: i64,
    /// The version new encryptions use.
    pub current: u32,
    /// Every version still decryptable (DEK versions are only ever destroyed together, by a
    /// shred).
    pub versions: BTreeMap<u32, DekVersion>,
}

impl std::fmt::Debug for DekRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Wrapped keys are public, but nothing about a key needs to be in a log line.
        f.debug_struct("DekRecord")
            .field("alg", &self.alg)
            .field("current", &self.current)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn malformed(what: &str) -> Error {
    Error::internal(format!("malformed DEK record in Vault: {what}"))
}

fn wrapped_of(v: &Value) -> Result<WrappedDek> {
    v.as_str()
        .and_then(|w| WrappedDek::parse(w).ok())
        .ok_or_else(|| malformed("wrapped"))
}

impl DekRecord {
    /// A new record with one version, `version`.
    pub fn new(
        subject_ref: String,
        alg: Algorithm,
        version: u32,
        wrapped: WrappedDek,
        created_at: i64,
    ) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(
            version,
            DekVersion {
                wrapped,
                created_at,
            },
        );
        Self {
            subject_ref,
            alg,
            created_at,
            current: version,
            versions,
        }
    }

    /// Reads a record from the `data` of its newest KV version, `kv_version`.
    pub fn parse(data: &Value, kv_version: u32) -> Result<Self> {
        let subject_ref = data["subject_ref"]
            .as_str()
            .ok_or_else(|| malformed("subject_ref"))?
            .to_string();
        let alg: Algorithm = data["alg"]
            .as_str()
            .ok_or_else(|| malformed("alg"))?
            .parse()
            .map_err(|_| malformed("alg"))?;
        let created_at = data["created_at"].as_i64().unwrap_or(0);
        match data.get("format").and_then(Value::as_u64) {
            None => {
                let wrapped = wrapped_of(&data["wrapped"])?;
                Ok(Self::new(subject_ref, alg, kv_version, wrapped, created_at))
            }
            Some(FORMAT) => {
                let obj = data["versions"]
                    .as_object()
                    .ok_or_else(|| malformed("versions"))?;
                let mut versions = BTreeMap::new();
                for (k, v) in obj {
                    let n: u32 = k
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| malformed("version number"))?;
                    versions.insert(
                        n,
                        DekVersion {
                            wrapped: wrapped_of(&v["wrapped"])?,
                            created_at: v["created_at"].as_i64().unwrap_or(created_at),
                        },
                    );
                }
                let current = data["current"]
                    .as_u64()
                    .and_then(|c| u32::try_from(c).ok())
                    .filter(|c| versions.contains_key(c))
                    .ok_or_else(|| malformed("current"))?;
                Ok(Self {
                    subject_ref,
                    alg,
                    created_at,
                    current,
                    versions,
                })
            }
            Some(other) => Err(malformed(&format!(
                "format {other} is newer than this build knows"
            ))),
        }
    }

    /// The record as stored (always the current format).
    pub fn to_json(&self) -> Value {
        let versions: serde_json::Map<String, Value> = self
            .versions
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    json!({ "wrapped": v.wrapped.as_str(), "created_at": v.created_at }),
                )
            })
            .collect();
        json!({
            "format": FORMAT,
            "subject_ref": self.subject_ref,
            "alg": self.alg.name(),
            "created_at": self.created_at,
            "current": self.current,
            "versions": versions,
        })
    }

    /// A version, if the record has it.
    pub fn version(&self, n: u32) -> Option<&DekVersion> {
        self.versions.get(&n)
    }

    /// The version new encryptions use.
    pub fn current_version(&self) -> &DekVersion {
        // Invariant: `parse` and `new` check that `current` is a key of `versions`, and
        // versions are never removed.
        &self.versions[&self.current]
    }

    /// Adds `wrapped` as the next version and makes it current; returns its number.
    pub fn push_version(&mut self, wrapped: WrappedDek, created_at: i64) -> u32 {
        let n = self.versions.keys().next_back().copied().unwrap_or(0) + 1;
        self.versions.insert(
            n,
            DekVersion {
                wrapped,
                created_at,
            },
        );
        self.current = n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kek: u32, body: &str) -> String {
        format!("vault:v{kek}:{body}")
    }

    #[test]
    fn a_format_1_record_is_one_version_numbered_by_its_kv_version() {
        let v1 = json!({"subject_ref": "ab", "wrapped": w(1, "x"), "alg": "aes-256-gcm", "created_at": 5});
        let r = DekRecord::parse(&v1, 1).unwrap();
        assert_eq!(r.current, 1);
        assert_eq!(r.versions.len(), 1);
        assert_eq!(r.version(1).unwrap().wrapped.as_str(), w(1, "x"));
        assert!(r.version(2).is_none());
        // Written back, it is format 2 with the same version, and reads the same.
        let back = DekRecord::parse(&r.to_json(), 7).unwrap();
        assert!(back == r);
    }

    #[test]
    fn versions_are_added_and_kept() {
        let mut r = DekRecord::new(
            "ab".into(),
            Algorithm::Aes256Gcm,
            1,
            WrappedDek::parse(w(1, "a")).unwrap(),
            5,
        );
        assert_eq!(r.push_version(WrappedDek::parse(w(2, "b")).unwrap(), 9), 2);
        let back = DekRecord::parse(&r.to_json(), 3).unwrap();
        assert_eq!(back.current, 2);
        assert_eq!(back.current_version().wrapped.kek_version(), 2);
        assert_eq!(back.version(1).unwrap().wrapped.as_str(), w(1, "a"));
        assert_eq!(back.version(2).unwrap().created_at, 9);
    }

    #[test]
    fn malformed_records_are_refused() {
        let good = DekRecord::new(
            "ab".into(),
            Algorithm::Aes128Gcm,
            1,
            WrappedDek::parse(w(1, "a")).unwrap(),
            5,
        )
        .to_json();
        for edit in [
            |v: &mut Value| v["current"] = json!(2),
            |v: &mut Value| v["versions"] = json!([]),
            |v: &mut Value| v["versions"]["0"] = v["versions"]["1"].clone(),
            |v: &mut Value| v["versions"]["1"]["wrapped"] = json!("nope"),
            |v: &mut Value| v["format"] = json!(3),
            |v: &mut Value| v["alg"] = json!("rot13"),
        ] {
            let mut v = good.clone();
            edit(&mut v);
            assert!(DekRecord::parse(&v, 1).is_err(), "{v}");
        }
        assert!(DekRecord::parse(&good, 1).is_ok());
    }
}
