//! Key lifecycle: the unwrapped-DEK cache and the manager that finds, creates and unwraps
//! subject DEKs in Vault.
//!
//! Vault layout (KV v2 mount `vault.kv_mount`, transit mount `vault.transit_mount`):
//! - `keyspaces/<ks>/index-key`: `{wrapped}`, the keyspace's subject-reference HMAC key,
//!   wrapped by the keyspace KEK. Created by `piiguard bootstrap` only
//!   ([`manager::create_index_key`]); `serve` refuses to start without it.
//!
//! Key material is a [`crate::secret::Dek`] (plaintext, wiped on drop) or a
//! [`crate::secret::WrappedDek`] (as stored); only Vault turns one into the other.
//! - `subjects/<ks>/<subject_ref>`: `{key_id, dek_version, wrapped, alg, created_at}`, where
//!   `subject_ref` = hex(HMAC-SHA256(index key, subject id)). No raw subject id anywhere.
//! - `deks/<ks>/<key_id>`: every version of the subject's DEK ([`record::DekRecord`]; older
//!   builds wrote one version, numbered by its KV version, which still reads). Made by the
//!   subject's first rotation (builds before store schema 3 made it with the subject): a new
//!   subject costs one Vault write, its subject record, which then holds the only copy of its
//!   first DEK version, and the store's registry maps the key id to the subject
//!   (`subjects.key_id`) so that a ciphertext's key is found without a DEK record.
//! - transit key `kek-<ks>`: the KEK (aes256-gcm96, not exportable).
//!
//! Blind-index keys are not stored: each (keyspace, field, version) key is derived from the
//! keyspace's index key ([`index_keys`]).

pub mod cache;
pub mod index_keys;
pub mod kek;
pub mod manager;
pub mod record;
pub mod usage;
pub mod wraps;

pub use manager::{KeyManager, SubjectRef};
