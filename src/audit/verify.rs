//! Offline verification of audit files (`piiguard audit verify FILE... [--public-key PEM]`).
//!
//! Checks, in chain order (files are sorted by their first sequence number):
//! - every line's own hash (an edited record),
//! - `seq` continuity and `prev` linkage (a deleted, inserted or reordered record; a file
//!   missing from the middle),
//! - every checkpoint: its signature (with the given public keys) and that the hash it signs is
//!   the hash the chain has at that sequence number (a rewritten chain),
//! - the tail: the last record must be a final checkpoint of a clean stop; otherwise the
//!   records after the last signed checkpoint are reported as an unsealed tail (truncated, lost
//!   in a crash, or the log of a running process),
//! - an incomplete last line (a crash during a write).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use super::{GENESIS, checkpoint_message, kind, open_line};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Evidence of tampering or loss: verification fails.
    Error,
    /// Worth knowing (an acknowledged crash, unverified signatures); does not fail.
    Warning,
}

/// One finding, with where it is.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    pub seq: Option<u64>,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "ERROR",
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
    /// PEM public keys of the signing key (any version). Empty: signatures are not checked.
    pub public_keys: Vec<String>,
    /// Accept a tail without a final seal (the log of a running process).
    pub allow_open_tail: bool,
}

/// The outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints_verified: u64,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether no error was found.
    pub fn ok(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }
}

struct Loc {
    file: PathBuf,
    line: usize,
}

struct State<'o> {
    opts: &'o Options,
    report: Report,
    last: Option<(u64, [u8; 32])>,
    /// Hashes by seq since the oldest checkpoint that may still refer to them.
    hashes: BTreeMap<u64, [u8; 32]>,
    /// Last checkpoint whose signature (or, without keys, whose hash) checked out.
    last_sealed: Option<(u64, Loc)>,
    last_kind_final: bool,
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
        self.hashes.insert(seq, hash);
        self.last_kind_final = false;
        if k == kind::CHECKPOINT {
            self.checkpoint(&loc, seq, &v);
        }
        self.last = Some((seq, hash));
        self.report.last_seq = Some(seq);
        self.last_loc = Some(loc);
    }

    fn checkpoint(&mut self, loc: &Loc, seq: u64, v: &Value) {
        let covers = v["covers_seq"].as_u64();
        let covers_hash = v["covers_hash"].as_str().unwrap_or_default();
        let Some(covers) = covers else {
            self.find(
                Severity::Error,
                loc,
                Some(seq),
                "checkpoint without covers_seq",
            );
            return;
        };
        match self.hashes.get(&covers) {
            Some(h) if hex::encode(h) == covers_hash => {}
            Some(_) => {
                self.find(
                    Severity::Error,
                    loc,
                    Some(seq),
                    format!(
                        "checkpoint covers seq {covers} but the chain's hash there differs: records up to seq {covers} were rewritten"
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
        if !self.opts.public_keys.is_empty() {
            let sig = v["signature"]
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .unwrap_or_default();
            let msg = checkpoint_message(covers, covers_hash);
            let good = self
                .opts
                .public_keys
                .iter()
                .any(|k| crate::crypto::signature::verify(k, msg.as_bytes(), &sig).is_ok());
            if !good {
                self.find(
                    Severity::Error,
                    loc,
                    Some(seq),
                    "checkpoint signature does not verify with the given public key(s): forged or altered checkpoint",
                );
                return;
            }
            self.report.checkpoints_verified += 1;
        }
        // Hashes at or before the covered seq are no longer needed.
        self.hashes = self.hashes.split_off(&covers);
        self.last_kind_final = v["final_seal"].as_bool() == Some(true);
        self.last_sealed = Some((
            covers,
            Loc {
                file: loc.file.clone(),
                line: loc.line,
            },
        ));
    }
}

fn first_seq(path: &Path) -> Option<u64> {
    let text = std::fs::read(path).ok()?;
    let line = text.split(|&b| b == b'\n').next()?;
    let (body, _, _) = open_line(line)?;
    serde_json::from_slice::<Value>(&body).ok()?["seq"].as_u64()
}

/// Verifies audit files as one chain.
pub fn verify_files(files: &[PathBuf], opts: &Options) -> Report {
    let mut st = State {
        opts,
        report: Report::default(),
        last: None,
        hashes: BTreeMap::new(),
        last_sealed: None,
        last_kind_final: false,
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
    if opts.public_keys.is_empty() && st.report.records > 0 {
        st.report.findings.push(Finding {
            severity: Severity::Warning,
            file: PathBuf::new(),
            line: 0,
            seq: None,
            message: "checkpoint signatures not checked (no --public-key given): only the hash chain was verified".into(),
        });
    }
    if let (Some((last_seq, _)), false) = (st.last, st.last_kind_final) {
        let sev = if opts.allow_open_tail {
            Severity::Warning
        } else {
            Severity::Error
        };
        let (since, at) = match &st.last_sealed {
            Some((s, l)) => (
                *s,
                format!("the last checkpoint ({}:{})", l.file.display(), l.line),
            ),
            None => (0, "no checkpoint at all".to_string()),
        };
        let loc = st.last_loc.take().unwrap_or(Loc {
            file: PathBuf::new(),
            line: 0,
        });
        st.find(
            sev,
            &loc,
            Some(last_seq),
            format!(
                "unsealed tail: the log ends at seq {last_seq} without a final checkpoint; the {} record(s) after seq {since} ({at}) are not covered by a signature: truncated, lost in a crash, or the process is still running",
                last_seq - since
            ),
        );
    }
    st.report
}
