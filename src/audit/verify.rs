//! Offline verification of audit files (`piiguard audit verify FILE|DIR... --public-key PEM
//! [--anchor-from-config CONFIG]`).
//!
//! Checks, in chain order (files are sorted by their first sequence number):
//! - every line's own hash (an edited record),
//! - `seq` continuity and `prev` linkage (a deleted, inserted or reordered record; a file
//!   missing from the middle),
//! - every checkpoint: its signature (with the given public keys) over what it signs, and that
//!   it agrees with the chain: a v2 checkpoint ([`CheckpointMessage`]) signs its own seq, the
//!   seq and hash of the record just before it, the instance, whether it is a final seal and
//!   the checkpoint before it; coverage must grow strictly from one checkpoint to the next (a
//!   replayed, moved or re-flagged checkpoint, a rewritten chain),
//! - v1 checkpoints (older piiguard) are checked for what they sign (seq and hash covered) and
//!   reported as weaker,
//! - the tail: the last record must be a final checkpoint of a clean stop; otherwise the
//!   records after the last signed checkpoint are an **open tail** (a crash, a running process,
//!   or records after the last checkpoint removed: indistinguishable, and not tampering by
//!   itself),
//! - with an anchor ([`AuditAnchor`], the newest checkpoint the writer recorded in the store):
//!   a log whose newest checkpoint is older than the anchor is **truncated** (the newest files
//!   or the whole folder deleted), and the anchored checkpoint must be the one in the files,
//! - an incomplete last line (a crash during a write).
//!
//! Without public keys nothing proves who wrote the chain: that is an error unless asked for
//! ([`Options::no_signature_check`]), and then reported loudly.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use super::{CHECKPOINT_V2, CheckpointMessage, GENESIS, checkpoint_message_v1, kind, open_line};
use crate::store::anchor::AuditAnchor;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Evidence of tampering or loss: verification fails.
    Error,
    /// Records at the end that no signature covers (a crash, a running process, or records
    /// after the last checkpoint removed). Not evidence of tampering; fails verification unless
    /// open tails are allowed ([`Options::allow_open_tail`]).
    OpenTail,
    /// Worth knowing (an acknowledged crash, v1 checkpoints, unchecked signatures); does not
    /// fail.
    Warning,
}

/// One finding, with where it is.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The file (empty: the log as a whole).
    pub file: PathBuf,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// Seq of the record concerned, if known.
    pub seq: Option<u64>,
    /// What was found.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "ERROR",
            Severity::OpenTail => "OPEN TAIL",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}:{}", self.file.display(), self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Options of a verification.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// PEM public keys of the signing key (any version).
    pub public_keys: Vec<String>,
    /// Verify without public keys: only the hash chain (which anyone who can write the files
    /// can recompute). Without keys and without this, verification fails.
    pub no_signature_check: bool,
    /// Accept a tail without a final seal (the log of a running process): reported as a
    /// warning instead of [`Severity::OpenTail`].
    pub allow_open_tail: bool,
    /// The newest checkpoint recorded outside the files (`--anchor-from-config`): a log that
    /// ends before it is truncated.
    pub anchor: Option<AuditAnchor>,
}

/// The outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Records read.
    pub records: u64,
    /// Seq of the first record read.
    pub first_seq: Option<u64>,
    /// Seq of the last record read.
    pub last_seq: Option<u64>,
    /// Checkpoints whose signature verified.
    pub checkpoints_verified: u64,
    /// Of the checkpoints accepted, those in the v1 format (weaker guarantees).
    pub v1_checkpoints: u64,
    /// Seq of the newest checkpoint accepted.
    pub newest_checkpoint: Option<u64>,
    /// Whether the log ends with an accepted final seal.
    pub sealed: bool,
    /// Everything found, in chain order, then the findings about the log as a whole.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether the log verified: no error and no open tail (unless allowed).
    pub fn ok(&self) -> bool {
        !self
            .findings
            .iter()
            .any(|f| matches!(f.severity, Severity::Error | Severity::OpenTail))
    }

    /// Whether evidence of tampering or loss was found.
    pub fn tampered(&self) -> bool {
        self.errors().next().is_some()
    }

    /// Whether the log has an open tail that was not allowed.
    pub fn open_tail(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::OpenTail)
    }

    /// The findings of severity [`Severity::Error`].
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }
}

#[derive(Clone)]
struct Loc {
    file: PathBuf,
    line: usize,
}

/// The last checkpoint accepted.
struct Seen {
    seq: u64,
    covers: u64,
    loc: Loc,
}

struct State<'o> {
    opts: &'o Options,
    report: Report,
    last: Option<(u64, [u8; 32])>,
    /// Hashes by seq since the oldest checkpoint that may still refer to them (v1 checkpoints
    /// may cover a record before them; v2 ones cover the record just before them).
    hashes: BTreeMap<u64, [u8; 32]>,
    /// Last checkpoint accepted.
    last_cp: Option<Seen>,
    /// Whether a v2 checkpoint was accepted (a v1 one after it is a downgrade).
    seen_v2: bool,
    /// Whether the last record is an accepted final seal, and whether it is a v1 one.
    last_final: Option<bool>,
    /// Where the first v1 checkpoint is.
    first_v1: Option<(Loc, u64)>,
    /// Whether the anchored checkpoint was found in the files.
    anchor_found: bool,
    last_loc: Option<Loc>,
}

impl State<'_> {
    fn find(&mut self, sev: Severity, loc: &Loc, seq: Option<u64>, message: impl Into<String>) {
        self.report.findings.push(Finding {
            severity: sev,
            file: loc.file.clone(),
            line: loc.line,
            seq,
            message: message.into(),
        });
    }

    fn record(&mut self, loc: Loc, raw: &[u8]) {
        let Some((body, hash, hash_ok)) = open_line(raw) else {
            self.find(
                Severity::Error,
                &loc,
                None,
                "not an audit record (no hash member): edited or corrupted line",
            );
            return;
        };
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                self.find(Severity::Error, &loc, None, "not valid JSON: edited line");
                return;
            }
        };
        let seq = v["seq"].as_u64();
        let Some(seq) = seq else {
            self.find(
                Severity::Error,
                &loc,
                None,
                "record without seq: edited line",
            );
            return;
        };
        self.report.records += 1;
        if !hash_ok {
            self.find(
                Severity::Error,
                &loc,
                Some(seq),
                "record edited: its content does not match its hash",
            );
        }
        let prev = v["prev"]
            .as_str()
            .and_then(|p| hex::decode(p).ok())
            .filter(|p| p.len() == 32);
        let prev: [u8; 32] = match prev {
            Some(p) => {
                let mut a = [0u8; 32];
                a.copy_from_slice(&p);
                a
            }
            None => {
                self.find(
                    Severity::Error,
                    &loc,
                    Some(seq),
                    "record without a valid prev hash",
                );
                [0xff; 32]
            }
        };
        match self.last {
            None => {
                self.report.first_seq = Some(seq);
                if !(seq == 1 && prev == GENESIS) {
                    self.find(
                        Severity::Warning,
                        &loc,
                        Some(seq),
                        "the chain given starts here, not at its beginning (earlier files removed by retention or not given)",
                    );
                }
            }
            Some((last_seq, last_hash)) => {
                if seq != last_seq + 1 {
                    let what = if seq > last_seq + 1 {
                        format!(
                            "records missing: seq jumps from {last_seq} to {seq} ({} deleted record(s), or a file missing)",
                            seq - last_seq - 1
                        )
                    } else {
                        format!(
                            "seq goes back from {last_seq} to {seq}: record inserted, duplicated or reordered"
                        )
                    };
                    self.find(Severity::Error, &loc, Some(seq), what);
                } else if prev != last_hash {
                    self.find(
                        Severity::Error,
                        &loc,
                        Some(seq),
                        "chain broken: prev is not the hash of the record before (record inserted, deleted, reordered or edited before this one)",
                    );
                }
            }
        }
        let k = v["kind"].as_str().unwrap_or_default();
        if k == kind::SEGMENT_START && v["prev_clean"].as_bool() == Some(false) {
            self.find(
                Severity::Warning,
                &loc,
                Some(seq),
                format!(
                    "piiguard recorded that the previous file ended without a final checkpoint at seq {}: records after the last checkpoint before it may have been lost (crash) or truncated",
                    seq.saturating_sub(1)
                ),
            );
        }
        if let Some(a) = &self.opts.anchor
            && seq == a.checkpoint_seq
        {
            self.anchor_found = true;
            if let Some(why) = anchor_mismatch(a, k, &v) {
                self.find(
                    Severity::Error,
                    &loc,
                    Some(seq),
                    format!(
                        "this is not the checkpoint anchored in the store for seq {seq} ({why}): the log was rewritten"
                    ),
                );
            }
        }
        self.hashes.insert(seq, hash);
        self.last_final = None;
        if k == kind::CHECKPOINT {
            self.checkpoint(&loc, seq, &v);
        }
        self.last = Some((seq, hash));
        self.report.last_seq = Some(seq);
        self.last_loc = Some(loc);
    }

    fn signature_ok(&self, message: &[u8], v: &Value) -> bool {
        let sig = v["signature"]
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .unwrap_or_default();
        self.opts
            .public_keys
            .iter()
            .any(|k| crate::crypto::signature::verify(k, message, &sig).is_ok())
    }

    fn checkpoint(&mut self, loc: &Loc, seq: u64, v: &Value) {
        let err = |st: &mut Self, m: String| st.find(Severity::Error, loc, Some(seq), m);
        let Some(covers) = v["covers_seq"].as_u64() else {
            err(self, "checkpoint without covers_seq".into());
            return;
        };
        let covers_hash = v["covers_hash"].as_str().unwrap_or_default().to_string();
        let v2 = match v["message"].as_str() {
            None => false,
            Some(CHECKPOINT_V2) => true,
            Some(other) => {
                err(
                    self,
                    format!("checkpoint signs an unknown message {other:?}"),
                );
                return;
            }
        };
        // What a v2 checkpoint signs; a missing member is an edited record.
        let message = if v2 {
            let (Some(instance), Some(final_seal), Some(prev_checkpoint)) = (
                v["instance"].as_str(),
                v["final_seal"].as_bool(),
                v["prev_checkpoint"].as_u64(),
            ) else {
                err(
                    self,
                    "v2 checkpoint without instance, final_seal or prev_checkpoint".into(),
                );
                return;
            };
            Some(CheckpointMessage {
                instance: instance.to_string(),
                seq,
                covers_seq: covers,
                covers_hash: covers_hash.clone(),
                final_seal,
                prev_checkpoint,
            })
        } else {
            if self.seen_v2 {
                err(
                    self,
                    "v1 checkpoint after a v2 checkpoint: piiguard never writes one (downgraded or replayed checkpoint)".into(),
                );
                return;
            }
            None
        };
        if let Some(m) = &message
            && m.covers_seq + 1 != seq
        {
            err(
                self,
                format!(
                    "checkpoint signed for seq {seq} covers seq {covers}: a v2 checkpoint covers exactly the record before it (moved or reordered checkpoint)"
                ),
            );
            return;
        }
        if covers >= seq {
            err(
                self,
                format!("checkpoint at seq {seq} claims to cover seq {covers}, not before it"),
            );
            return;
        }
        match self.hashes.get(&covers) {
            Some(h) if hex::encode(h) == covers_hash => {}
            Some(_) => {
                err(
                    self,
                    format!(
                        "checkpoint covers seq {covers} but the chain's hash there differs: records up to seq {covers} were rewritten"
                    ),
                );
                return;
            }
            None if self.report.first_seq.is_some_and(|f| covers >= f) => {
                // In the files given, but no longer kept: an older checkpoint already covered
                // it, so this one cannot be newer.
                err(
                    self,
                    format!(
                        "checkpoint covers seq {covers}, which an earlier checkpoint already covered: replayed or reordered checkpoint"
                    ),
                );
                return;
            }
            None => {
                self.find(
                    Severity::Warning,
                    loc,
                    Some(seq),
                    format!("checkpoint covers seq {covers}, which is not in the files given"),
                );
                return;
            }
        }
        if let Some(last) = &self.last_cp
            && covers <= last.covers
        {
            let m = format!(
                "checkpoint covers seq {covers}, not after the seq {} covered by the checkpoint at {}:{}: replayed or reordered checkpoint",
                last.covers,
                last.loc.file.display(),
                last.loc.line
            );
            err(self, m);
            return;
        }
        if let Some(m) = &message {
            match &self.last_cp {
                Some(last) if m.prev_checkpoint != last.seq => {
                    let m = format!(
                        "checkpoint names seq {} as the checkpoint before it, but that is at seq {}: a checkpoint was removed, moved or replayed",
                        m.prev_checkpoint, last.seq
                    );
                    err(self, m);
                    return;
                }
                None if self
                    .report
                    .first_seq
                    .is_some_and(|f| m.prev_checkpoint >= f) =>
                {
                    let m = format!(
                        "checkpoint names seq {} as the checkpoint before it, which is not a checkpoint in the files given: a checkpoint was removed or replayed",
                        m.prev_checkpoint
                    );
                    err(self, m);
                    return;
                }
                _ => {}
            }
        }
        if !self.opts.public_keys.is_empty() {
            let text = match &message {
                Some(m) => m.text(),
                None => checkpoint_message_v1(covers, &covers_hash),
            };
            if !self.signature_ok(text.as_bytes(), v) {
                err(
                    self,
                    "checkpoint signature does not verify with the given public key(s): forged or altered checkpoint (its position, coverage, instance or final flag)".into(),
                );
                return;
            }
            self.report.checkpoints_verified += 1;
        }
        if v2 {
            self.seen_v2 = true;
        } else {
            self.report.v1_checkpoints += 1;
            if self.first_v1.is_none() {
                self.first_v1 = Some((loc.clone(), seq));
            }
        }
        // Hashes before the covered seq are no longer needed.
        self.hashes = self.hashes.split_off(&covers);
        let final_seal = v["final_seal"].as_bool() == Some(true);
        self.last_final = final_seal.then_some(!v2);
        self.report.newest_checkpoint = Some(seq);
        self.last_cp = Some(Seen {
            seq,
            covers,
            loc: loc.clone(),
        });
    }
}

/// Why a record is not the anchored checkpoint (None: it is).
fn anchor_mismatch(a: &AuditAnchor, k: &str, v: &Value) -> Option<String> {
    if k != kind::CHECKPOINT {
        return Some(format!("the record there is a {k:?}, not a checkpoint"));
    }
    let same = v["covers_seq"].as_u64() == Some(a.covers_seq)
        && v["covers_hash"].as_str() == Some(a.covers_hash.as_str())
        && v["final_seal"].as_bool().unwrap_or(false) == a.final_seal
        && v["prev_checkpoint"].as_u64() == Some(a.prev_checkpoint)
        && v["instance"].as_str() == Some(a.instance.as_str())
        && v["signature"].as_str() == Some(a.signature.as_str());
    (!same).then(|| "its coverage, flags, instance or signature differ".to_string())
}

fn first_seq(path: &Path) -> Option<u64> {
    let text = std::fs::read(path).ok()?;
    let line = text.split(|&b| b == b'\n').next()?;
    let (body, _, _) = open_line(line)?;
    serde_json::from_slice::<Value>(&body).ok()?["seq"].as_u64()
}

fn whole_log(sev: Severity, message: String) -> Finding {
    Finding {
        severity: sev,
        file: PathBuf::new(),
        line: 0,
        seq: None,
        message,
    }
}

/// Verifies audit files as one chain.
pub fn verify_files(files: &[PathBuf], opts: &Options) -> Report {
    let mut st = State {
        opts,
        report: Report::default(),
        last: None,
        hashes: BTreeMap::new(),
        last_cp: None,
        seen_v2: false,
        last_final: None,
        first_v1: None,
        anchor_found: false,
        last_loc: None,
    };
    let mut files: Vec<(Option<u64>, PathBuf)> =
        files.iter().map(|f| (first_seq(f), f.clone())).collect();
    files.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    for (_, path) in &files {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                st.find(
                    Severity::Error,
                    &Loc {
                        file: path.clone(),
                        line: 0,
                    },
                    None,
                    format!("cannot read: {e}"),
                );
                continue;
            }
        };
        let complete = data.ends_with(b"\n") || data.is_empty();
        let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let n = lines.len();
        for (i, raw) in lines.into_iter().enumerate() {
            let loc = Loc {
                file: path.clone(),
                line: i + 1,
            };
            if i + 1 == n && !complete {
                st.find(
                    Severity::Warning,
                    &loc,
                    None,
                    "incomplete last line: the process stopped while writing (its last batch was lost)",
                );
                continue;
            }
            if raw.is_empty() {
                st.find(Severity::Error, &loc, None, "empty line inserted");
                continue;
            }
            st.record(loc, raw);
        }
    }
    let mut tail = Vec::new();
    if opts.public_keys.is_empty() {
        tail.push(if opts.no_signature_check {
            whole_log(
                Severity::Warning,
                "SIGNATURES NOT CHECKED (no signature check asked for): only the hash chain was verified, which anyone who can write the files can recompute; this proves nothing about who wrote the log".into(),
            )
        } else {
            whole_log(
                Severity::Error,
                "no public key given: checkpoint signatures cannot be checked (give the signing public keys, or ask explicitly for no signature check)".into(),
            )
        });
    }
    if let Some((loc, seq)) = st.first_v1.clone() {
        st.find(
            Severity::Warning,
            &loc,
            Some(seq),
            format!(
                "{} v1 checkpoint(s) (older piiguard), the first here: weaker guarantees: a v1 signature covers only the seq and hash it covers, not the checkpoint's position, instance or final flag",
                st.report.v1_checkpoints
            ),
        );
    }
    match (st.last, st.last_final) {
        (None, _) => tail.push(whole_log(
            Severity::Error,
            "no audit records in the files given".into(),
        )),
        (Some(_), Some(false)) => st.report.sealed = true,
        (Some((last_seq, _)), Some(true)) => {
            st.report.sealed = true;
            let loc = st.last_loc.clone().unwrap_or(Loc {
                file: PathBuf::new(),
                line: 0,
            });
            st.find(
                Severity::Warning,
                &loc,
                Some(last_seq),
                "the log ends with a v1 final seal, whose final flag is not signed: a log cut after a periodic v1 checkpoint could look the same",
            );
        }
        (Some((last_seq, _)), None) => {
            let sev = if opts.allow_open_tail {
                Severity::Warning
            } else {
                Severity::OpenTail
            };
            let (since, at) = match &st.last_cp {
                Some(c) => (
                    c.covers,
                    format!(
                        "the last checkpoint is at {}:{}",
                        c.loc.file.display(),
                        c.loc.line
                    ),
                ),
                None => (0, "there is no checkpoint at all".to_string()),
            };
            let loc = st.last_loc.clone().unwrap_or(Loc {
                file: PathBuf::new(),
                line: 0,
            });
            st.find(
                sev,
                &loc,
                Some(last_seq),
                format!(
                    "open tail: the log ends at seq {last_seq} without a final checkpoint; the {} record(s) after seq {since} ({at}) are not covered by a signature: the server crashed or is still running, or records after the last checkpoint were removed",
                    last_seq - since
                ),
            );
        }
    }
    if let Some(a) = &opts.anchor {
        tail.extend(check_anchor(&st, a, opts));
    }
    st.report.findings.extend(tail);
    st.report
}

/// Compares the log with the anchor recorded outside it.
fn check_anchor(st: &State<'_>, a: &AuditAnchor, opts: &Options) -> Vec<Finding> {
    let mut out = Vec::new();
    if !opts.public_keys.is_empty() {
        let m = CheckpointMessage {
            instance: a.instance.clone(),
            seq: a.checkpoint_seq,
            covers_seq: a.covers_seq,
            covers_hash: a.covers_hash.clone(),
            final_seal: a.final_seal,
            prev_checkpoint: a.prev_checkpoint,
        };
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&a.signature)
            .unwrap_or_default();
        let good = opts
            .public_keys
            .iter()
            .any(|k| crate::crypto::signature::verify(k, m.text().as_bytes(), &sig).is_ok());
        if !good {
            out.push(whole_log(
                Severity::Error,
                format!(
                    "the anchor of instance {:?} (checkpoint seq {}) does not verify with the given public key(s): the anchor in the store was forged",
                    a.instance, a.checkpoint_seq
                ),
            ));
            return out;
        }
    }
    let what = format!(
        "the store's anchor for instance {:?} names the checkpoint at seq {} (covering seq {}{})",
        a.instance,
        a.checkpoint_seq,
        a.covers_seq,
        if a.final_seal { ", a final seal" } else { "" }
    );
    match (st.last, st.report.newest_checkpoint) {
        (None, _) => out.push(whole_log(
            Severity::Error,
            format!("TRUNCATED: {what}, but there are no records: the audit files were deleted"),
        )),
        (Some((last_seq, _)), newest) if newest.is_none_or(|n| n < a.checkpoint_seq) => {
            out.push(whole_log(
                Severity::Error,
                format!(
                    "TRUNCATED: {what}, but the newest checkpoint in the files is {} and they end at seq {last_seq}: the newest records or files were deleted",
                    newest.map_or("none".to_string(), |n| format!("at seq {n}"))
                ),
            ))
        }
        _ if !st.anchor_found => out.push(whole_log(
            Severity::Warning,
            format!(
                "{what}, which is before the files given (removed by retention or not given): compared only with the newest checkpoint"
            ),
        )),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    //! The verifier on hand-made logs signed with a local key (the integration tests in
    //! tests/it/audit.rs run it on the logs of a real server).

    use std::sync::OnceLock;

    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    use aws_lc_rs::signature::KeyPair as _;

    use super::*;
    use crate::audit::seal_line;

    fn key() -> &'static (KeyPair, String) {
        static KEY: OnceLock<(KeyPair, String)> = OnceLock::new();
        KEY.get_or_init(|| {
            let k = KeyPair::generate(KeySize::Rsa2048).unwrap();
            let der = k.public_key().as_der().unwrap();
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
            for c in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(c).unwrap());
                pem.push('\n');
            }
            pem.push_str("-----END PUBLIC KEY-----\n");
            (k, pem)
        })
    }

    fn sign(msg: &[u8]) -> String {
        let (k, _) = key();
        let mut sig = vec![0u8; k.public_modulus_len()];
        k.sign(
            &aws_lc_rs::signature::RSA_PSS_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            msg,
            &mut sig,
        )
        .unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig)
    }

    /// Writes a log as the writer would: `v2` checkpoints (or v1 ones).
    struct Log {
        lines: Vec<String>,
        head: [u8; 32],
        last_cp: u64,
        v2: bool,
        anchor: Option<AuditAnchor>,
    }

    impl Log {
        fn new(v2: bool) -> Self {
            Log {
                lines: Vec::new(),
                head: GENESIS,
                last_cp: 0,
                v2,
                anchor: None,
            }
        }

        fn seq(&self) -> u64 {
            self.lines.len() as u64
        }

        fn push(&mut self, mut v: Value) {
            v["seq"] = (self.seq() + 1).into();
            v["instance"] = "i1".into();
            v["prev"] = hex::encode(self.head).into();
            let (line, h) = seal_line(&serde_json::to_vec(&v).unwrap());
            self.head = h;
            self.lines.push(String::from_utf8(line).unwrap());
        }

        fn call(&mut self) {
            self.push(serde_json::json!({"kind": "call", "method": "Decrypt", "outcome": "ok"}));
        }

        fn checkpoint(&mut self, final_seal: bool) {
            let m = CheckpointMessage {
                instance: "i1".into(),
                seq: self.seq() + 1,
                covers_seq: self.seq(),
                covers_hash: hex::encode(self.head),
                final_seal,
                prev_checkpoint: self.last_cp,
            };
            let v = if self.v2 {
                let sig = sign(m.text().as_bytes());
                self.anchor = Some(AuditAnchor {
                    instance: "i1".into(),
                    checkpoint_seq: m.seq,
                    covers_seq: m.covers_seq,
                    covers_hash: m.covers_hash.clone(),
                    final_seal,
                    prev_checkpoint: m.prev_checkpoint,
                    key_version: 1,
                    signature: sig.clone(),
                    updated_at: 0,
                });
                serde_json::json!({"kind": "checkpoint", "covers_seq": m.covers_seq,
                    "covers_hash": m.covers_hash, "key_version": 1, "signature": sig,
                    "final_seal": final_seal, "message": CHECKPOINT_V2,
                    "prev_checkpoint": m.prev_checkpoint})
            } else {
                let sig = sign(checkpoint_message_v1(m.covers_seq, &m.covers_hash).as_bytes());
                serde_json::json!({"kind": "checkpoint", "covers_seq": m.covers_seq,
                    "covers_hash": m.covers_hash, "key_version": 1, "signature": sig,
                    "final_seal": final_seal})
            };
            self.push(v);
            self.last_cp = self.seq();
        }

        fn run(v2: bool) -> Self {
            let mut l = Log::new(v2);
            l.push(serde_json::json!({"kind": "segment_start", "prev_clean": true}));
            l.checkpoint(false);
            for _ in 0..3 {
                l.call();
            }
            l.checkpoint(false);
            for _ in 0..3 {
                l.call();
            }
            l.push(serde_json::json!({"kind": "event", "event": "stop"}));
            l.checkpoint(true);
            l
        }
    }

    fn verify_lines(lines: &[String], opts: &Options) -> Report {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("audit-00000000000000000001.jsonl");
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&f, text).unwrap();
        verify_files(&[f], opts)
    }

    fn keys() -> Options {
        Options {
            public_keys: vec![key().1.clone()],
            ..Options::default()
        }
    }

    fn text(r: &Report) -> String {
        r.findings
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Re-hashes every line from `from` on, as a forger would.
    fn rechain(lines: &mut [String], from: usize) {
        let mut prev = if from == 0 {
            hex::encode(GENESIS)
        } else {
            let v: Value = serde_json::from_str(&lines[from - 1]).unwrap();
            v["hash"].as_str().unwrap().to_string()
        };
        for (i, line) in lines.iter_mut().enumerate().skip(from) {
            let mut v: Value = serde_json::from_str(line).unwrap();
            v.as_object_mut().unwrap().remove("hash");
            v["seq"] = (i as u64 + 1).into();
            v["prev"] = prev.into();
            let (sealed, h) = seal_line(&serde_json::to_vec(&v).unwrap());
            prev = hex::encode(h);
            *line = String::from_utf8(sealed).unwrap();
        }
    }

    #[test]
    fn a_clean_v2_log_verifies_and_matches_its_anchor() {
        let l = Log::run(true);
        let mut o = keys();
        o.anchor = l.anchor.clone();
        let r = verify_lines(&l.lines, &o);
        assert!(r.ok() && !r.tampered(), "{}", text(&r));
        assert!(r.sealed);
        assert_eq!(r.checkpoints_verified, 3);
        assert_eq!(r.v1_checkpoints, 0);
    }

    #[test]
    fn a_cut_tail_resealed_as_final_fails() {
        let l = Log::run(true);
        // Cut after the second (periodic) checkpoint, mark it final, recompute its hash.
        let mut cut: Vec<String> = l.lines[..6].to_vec();
        cut[5] = cut[5].replace("\"final_seal\":false", "\"final_seal\":true");
        rechain(&mut cut, 5);
        let r = verify_lines(&cut, &keys());
        assert!(r.tampered(), "{}", text(&r));
        assert!(
            text(&r).contains("signature does not verify"),
            "{}",
            text(&r)
        );
        // Only cut: an open tail without the anchor, truncation with it.
        let cut = &l.lines[..6];
        let r = verify_lines(cut, &keys());
        assert!(!r.tampered() && r.open_tail(), "{}", text(&r));
        let mut o = keys();
        o.allow_open_tail = true;
        o.anchor = l.anchor.clone();
        let r = verify_lines(cut, &o);
        assert!(r.tampered(), "{}", text(&r));
        assert!(text(&r).contains("TRUNCATED"), "{}", text(&r));
    }

    #[test]
    fn a_replayed_or_moved_checkpoint_fails() {
        let l = Log::run(true);
        // Replay the first checkpoint at the end of a cut log.
        let mut replay: Vec<String> = l.lines[..9].to_vec();
        replay.push(l.lines[1].clone());
        rechain(&mut replay, 9);
        let r = verify_lines(&replay, &keys());
        assert!(r.tampered(), "{}", text(&r));
        // Move the second checkpoint one record later (chain recomputed).
        let mut moved = l.lines[..7].to_vec();
        moved.swap(5, 6);
        rechain(&mut moved, 5);
        let r = verify_lines(&moved, &keys());
        assert!(r.tampered(), "{}", text(&r));
        assert!(
            text(&r).contains("covers exactly the record before it"),
            "{}",
            text(&r)
        );
    }

    #[test]
    fn a_dropped_checkpoint_is_found_by_the_next_ones_link() {
        let l = Log::run(true);
        let mut dropped = l.lines.clone();
        dropped.remove(5);
        rechain(&mut dropped, 5);
        let r = verify_lines(&dropped, &keys());
        assert!(r.tampered(), "{}", text(&r));
    }

    #[test]
    fn no_key_is_an_error_unless_asked_for_and_then_loud() {
        let l = Log::run(true);
        let r = verify_lines(&l.lines, &Options::default());
        assert!(r.tampered(), "{}", text(&r));
        assert!(text(&r).contains("no public key given"));
        let o = Options {
            no_signature_check: true,
            ..Options::default()
        };
        let r = verify_lines(&l.lines, &o);
        assert!(r.ok(), "{}", text(&r));
        assert!(text(&r).contains("SIGNATURES NOT CHECKED"));
    }

    #[test]
    fn no_records_with_an_anchor_is_truncation() {
        let l = Log::run(true);
        let mut o = keys();
        o.anchor = l.anchor.clone();
        let r = verify_files(&[], &o);
        assert!(r.tampered());
        assert!(text(&r).contains("TRUNCATED"), "{}", text(&r));
    }

    #[test]
    fn a_forged_anchor_or_a_rewritten_anchored_checkpoint_fails() {
        let l = Log::run(true);
        let mut o = keys();
        let mut a = l.anchor.clone().unwrap();
        a.checkpoint_seq += 5;
        o.anchor = Some(a);
        let r = verify_lines(&l.lines, &o);
        assert!(
            text(&r).contains("anchor in the store was forged"),
            "{}",
            text(&r)
        );
        // Without keys, an anchor naming a record that is not its checkpoint.
        let mut a = l.anchor.clone().unwrap();
        a.checkpoint_seq = 3;
        let o = Options {
            no_signature_check: true,
            anchor: Some(a),
            ..Options::default()
        };
        let r = verify_lines(&l.lines, &o);
        assert!(
            text(&r).contains("not the checkpoint anchored"),
            "{}",
            text(&r)
        );
    }

    #[test]
    fn v1_logs_verify_with_a_weaker_guarantees_warning() {
        let l = Log::run(false);
        let r = verify_lines(&l.lines, &keys());
        assert!(r.ok(), "{}", text(&r));
        assert_eq!(r.v1_checkpoints, 3);
        let t = text(&r);
        assert!(
            t.contains("v1 checkpoint(s)") && t.contains("weaker guarantees"),
            "{t}"
        );
        assert!(t.contains("v1 final seal"), "{t}");
        // A v1 log continued by a v2 writer; a v1 checkpoint after that is a downgrade.
        let mut l = Log::run(false);
        l.v2 = true;
        l.call();
        l.checkpoint(true);
        let r = verify_lines(&l.lines, &keys());
        assert!(r.ok(), "{}", text(&r));
        assert!(!text(&r).contains("v1 final seal"));
        l.v2 = false;
        l.call();
        l.checkpoint(true);
        let r = verify_lines(&l.lines, &keys());
        assert!(text(&r).contains("downgraded"), "{}", text(&r));
    }
}
