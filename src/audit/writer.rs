//! The audit writer: a dedicated thread that chains, batches, writes, rotates, checkpoints and
//! prunes audit files, so that no request ever waits on disk I/O.
//!
//! Durability contract: records are queued by the calls ([`Auditor::record_call`], never
//! blocking), and the writer writes each batch it drains with one `write` (no fsync per record).
//! Under load the writer drains every [`BUSY_POLL`] instead of being woken per record, so that a
//! call never pays for a thread wake-up; when idle it blocks and the next record wakes it. The
//! file is fsynced every `fsync_interval`, before each checkpoint is signed, at rotation and at
//! shutdown. A process crash loses at most the records still queued (the last unflushed batch);
//! a machine crash at most what was written since the last fsync. `verify` reports both as an
//! open tail or an unclean stop.
//!
//! Checkpoints: every `checkpoint_interval`, after an fsync, the writer has Vault sign a
//! [`CheckpointMessage`] for the record that comes next (its own seq is the head's + 1) and holds
//! new records back (in memory, at most [`CHECKPOINT_HOLD`]) until the signature is back, so
//! that the checkpoint lands exactly at the seq it signed. It then fsyncs and records the
//! checkpoint as the instance's anchor in the store ([`crate::store::anchor`]). A signature
//! later than the hold is dropped (alarm `audit_checkpoint_failed`); the next interval tries
//! again.
//!
//! Failure: when a write fails, the writer marks the sink unhealthy (data calls then fail
//! closed with `UNAVAILABLE`/`AUDIT_UNAVAILABLE`), raises an alarm, keeps the unwritten records
//! in memory and retries every tick in a fresh file; when it succeeds again, the kept records
//! are written in order and the chain continues.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde::Serialize;

use super::webhook::Webhook;
use super::{
    CHECKPOINT_V2, CallRecord, CheckpointMessage, GENESIS, Record, kind, open_line, seal_in_place,
    seal_line,
};
use crate::config::AuditConfig;
use crate::domain::time::rfc3339;
use crate::error::Error;
use crate::store::Store;
use crate::store::anchor::AuditAnchor;
use crate::vault::signer::Signer;

const TICK: Duration = Duration::from_millis(200);
/// Pause between drains while records keep coming (bounds how long a record waits in memory).
pub const BUSY_POLL: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 4096;
/// Records kept in memory while the sink is failing; beyond this they are counted as lost.
const MAX_PENDING: usize = 1_000_000;
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);
const FINAL_SEAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a periodic checkpoint signature may take before it is given up on.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest new records are held back in memory while a checkpoint is being signed (so that
/// the checkpoint can take the seq it signs). A slower signature is dropped.
pub const CHECKPOINT_HOLD: Duration = Duration::from_secs(2);

/// Why the audit log could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The audit folder cannot be created, or its first file cannot be opened.
    #[error("audit.dir {}: {source}", dir.display())]
    Folder {
        /// The configured audit folder.
        dir: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The writer thread cannot be started.
    #[error("audit writer thread: {0}")]
    Thread(std::io::Error),
}

/// Audit file names: `audit-<first seq, 20 digits>.jsonl`, so name order is chain order.
pub fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

/// Whether a file name is an audit file.
pub fn is_audit_file(name: &str) -> bool {
    name.starts_with("audit-") && name.ends_with(".jsonl")
}

// `Call` is the per-call message and travels inline: boxing it would cost every call an
// allocation freed on another thread.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Rec(Box<Record>),
    Call(CallRecord),
    Signed {
        message: CheckpointMessage,
        result: Result<crate::crypto::signature::Signature, Error>,
    },
    /// The anchor of a checkpoint could not be written to the store.
    AnchorFailed(String),
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

/// The handle to the audit log.
pub struct Auditor {
    tx: Sender<Msg>,
    /// Records queued and not yet taken by the writer; bounded by `capacity`.
    depth: Arc<AtomicUsize>,
    capacity: usize,
    /// `audit.max_refs_per_record`.
    max_refs: usize,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Opens the audit folder, finds the head of the existing chain, starts a new file and the
    /// writer thread. `signer` signs checkpoints (None: no checkpoints, for tools and tests);
    /// `anchors` receives the newest checkpoint each time one is written (None: not anchored).
    pub fn start(
        cfg: AuditConfig,
        instance: String,
        signer: Option<Arc<Signer>>,
        runtime: tokio::runtime::Handle,
        webhook: Option<Webhook>,
        anchors: Option<Arc<Store>>,
    ) -> Result<Arc<Self>, StartError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| StartError::Folder {
            dir: cfg.dir.clone(),
            source,
        })?;
        // Unbounded channel (memory grows with the backlog only), bounded by `depth`.
        let (tx, rx) = std::sync::mpsc::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let capacity = cfg.queue_capacity;
        let max_refs = cfg.max_refs_per_record;
        let healthy = Arc::new(AtomicBool::new(true));
        let lost = Arc::new(AtomicU64::new(0));
        let head = previous_head(&cfg.dir);
        let mut w = Writer {
            instance_json: serde_json::to_vec(&instance).unwrap_or_else(|_| b"\"\"".to_vec()),
            instance,
            depth: depth.clone(),
            buf: Vec::new(),
            file: None,
            file_name: String::new(),
            file_bytes: 0,
            file_opened: Instant::now(),
            dirty: false,
            seq: head.seq,
            head: head.hash,
            pending: VecDeque::new(),
            healthy: healthy.clone(),
            lost: lost.clone(),
            failing: false,
            checkpointed_seq: head.seq,
            last_checkpoint_seq: head.last_checkpoint,
            // The first checkpoint comes at once (it signs the link to the previous run).
            last_checkpoint: Instant::now()
                .checked_sub(cfg.checkpoint_interval)
                .unwrap_or_else(Instant::now),
            last_fsync: Instant::now(),
            last_retention: Instant::now() - RETENTION_SWEEP,
            signing: None,
            signer,
            anchors,
            runtime,
            tx: tx.clone(),
            webhook,
            prev_clean: head.clean,
            prev_file: head.file,
            cfg,
        };
        // The first file must open now: an unwritable audit folder stops the start-up.
        w.open_segment().map_err(|source| StartError::Folder {
            dir: w.cfg.dir.clone(),
            source,
        })?;
        if !head.clean && head.seq > 0 {
            tracing::warn!(
                last_seq = head.seq,
                "audit: the previous run ended without a final checkpoint (crash?); recorded"
            );
        }
        let thread = std::thread::Builder::new()
            .name("piiguard-audit".into())
            .spawn(move || w.run(rx))
            .map_err(StartError::Thread)?;
        Ok(Arc::new(Self {
            tx,
            depth,
            capacity,
            max_refs,
            healthy,
            lost,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// How many subject references (and key ids) one call record lists by name
    /// (`audit.max_refs_per_record`); see [`super::call::Touched`].
    pub fn max_refs_per_record(&self) -> usize {
        self.max_refs
    }

    /// Whether the sink is writing. Data calls are refused while it is not.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn enqueue(&self, m: Msg, limit: usize) -> bool {
        if self.depth.fetch_add(1, Ordering::Relaxed) >= limit {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        } else if self.tx.send(m).is_ok() {
            return true;
        }
        self.lost.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("piiguard_audit_lost_records_total").increment(1);
        false
    }

    /// Queues a call's record without blocking. Fails (fail closed) if the sink is unhealthy
    /// or the queue is full.
    pub fn record_call(&self, r: CallRecord) -> Result<(), Error> {
        if !self.is_healthy() {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return Err(Error::AuditUnavailable);
        }
        if self.enqueue(Msg::Call(r), self.capacity) {
            Ok(())
        } else {
            Err(Error::AuditUnavailable)
        }
    }

    /// Queues a call's record whatever the sink's health (a call cancelled by its client:
    /// kept in memory and written when the sink recovers).
    pub fn record_call_event(&self, r: CallRecord) {
        self.enqueue(Msg::Call(r), self.capacity.saturating_mul(2));
    }

    /// Queues a record whatever the sink's health (security events: they are kept in memory
    /// and written when the sink recovers).
    pub fn record_event(&self, r: Record) {
        self.enqueue(Msg::Rec(Box::new(r)), self.capacity.saturating_mul(2));
    }

    /// Writes a `stop` event and a final signed checkpoint, flushes, fsyncs and stops the
    /// writer. Idempotent.
    pub async fn shutdown(&self) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Shutdown(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

struct Head {
    seq: u64,
    hash: [u8; 32],
    clean: bool,
    file: Option<String>,
    /// Seq of the newest checkpoint record in the folder (0: none).
    last_checkpoint: u64,
}

/// Reads the last complete record of the newest audit file in `dir`.
fn previous_head(dir: &Path) -> Head {
    let none = Head {
        seq: 0,
        hash: GENESIS,
        clean: true,
        file: None,
        last_checkpoint: 0,
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return none;
    };
    let newest = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_audit_file(n))
        .max();
    let Some(name) = newest else { return none };
    let path = dir.join(&name);
    let tail = read_tail(&path, 1 << 20).unwrap_or_default();
    // Only complete lines count: a crash may have left a partial last line.
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => &tail[..i],
        None => &tail[..0],
    };
    for line in complete.split(|&b| b == b'\n').rev() {
        let Some((body, hash, true)) = open_line(line) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            continue;
        };
        let Some(seq) = v["seq"].as_u64() else {
            continue;
        };
        let clean = v["kind"] == kind::CHECKPOINT
            && v["final_seal"].as_bool() == Some(true)
            && complete.len() + 1 == tail.len();
        return Head {
            seq,
            hash,
            clean,
            file: Some(name),
            last_checkpoint: last_checkpoint_seq(dir),
        };
    }
    tracing::error!(file = %path.display(), "audit: cannot read the head of the previous audit file; starting a new chain");
    Head {
        clean: false,
        file: Some(name),
        last_checkpoint: last_checkpoint_seq(dir),
        ..none
    }
}

/// Seq of the newest checkpoint record in the audit files of `dir` (0: none), the
/// `prev_checkpoint` of the next one. Files are read newest first, each from its tail.
fn last_checkpoint_seq(dir: &Path) -> u64 {
    fn newest_in(data: &[u8]) -> Option<u64> {
        data.split(|&b| b == b'\n').rev().find_map(|line| {
            const NEEDLE: &[u8] = b"\"kind\":\"checkpoint\"";
            if !line.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
                return None;
            }
            let (body, _, true) = open_line(line)? else {
                return None;
            };
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            (v["kind"] == kind::CHECKPOINT)
                .then(|| v["seq"].as_u64())
                .flatten()
        })
    }
    for path in list_files(dir).iter().rev() {
        let tail = read_tail(path, 1 << 20).unwrap_or_default();
        if let Some(s) = newest_in(&tail) {
            return s;
        }
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len > tail.len() as u64
            && let Some(s) = std::fs::read(path).ok().as_deref().and_then(newest_in)
        {
            return s;
        }
    }
    0
}

fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    if start > 0 {
        // Drop the first, partial line.
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            buf.drain(..=i);
        }
    }
    Ok(buf)
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    ts: &'a str,
    instance: &'a str,
    #[serde(flatten)]
    rec: &'a Record,
    prev: &'a str,
}

/// A record waiting to be written.
enum Entry {
    Rec(Record),
    Call(CallRecord),
}

struct Writer {
    cfg: AuditConfig,
    instance: String,
    /// `instance` as a JSON string.
    instance_json: Vec<u8>,
    depth: Arc<AtomicUsize>,
    /// Reused output buffer.
    buf: Vec<u8>,
    file: Option<File>,
    file_name: String,
    file_bytes: u64,
    file_opened: Instant,
    dirty: bool,
    seq: u64,
    head: [u8; 32],
    pending: VecDeque<Entry>,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    failing: bool,
    /// Seq of the newest checkpoint written (or the head at start): no new checkpoint until
    /// records come after it.
    checkpointed_seq: u64,
    /// Seq of the newest checkpoint record of the chain (0: none): the next one's
    /// `prev_checkpoint`.
    last_checkpoint_seq: u64,
    last_checkpoint: Instant,
    last_fsync: Instant,
    last_retention: Instant,
    /// When the periodic signature in flight was asked for.
    signing: Option<Instant>,
    signer: Option<Arc<Signer>>,
    anchors: Option<Arc<Store>>,
    runtime: tokio::runtime::Handle,
    tx: Sender<Msg>,
    webhook: Option<Webhook>,
    prev_clean: bool,
    prev_file: Option<String>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let mut taken = 0usize;
            match rx.recv_timeout(TICK) {
                Ok(m) => {
                    let stop = self.handle(m, &mut taken);
                    let stop = stop.or_else(|| {
                        for _ in 0..MAX_BATCH {
                            match rx.try_recv() {
                                Ok(m) => {
                                    if let Some(done) = self.handle(m, &mut taken) {
                                        return Some(done);
                                    }
                                }
                                Err(_) => break,
                            }
                        }
                        None
                    });
                    self.depth.fetch_sub(taken, Ordering::Relaxed);
                    if let Some(done) = stop {
                        self.finish(done);
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if !self.holding() {
                self.write_pending();
            }
            self.maintenance();
            if taken > 0 {
                // Busy: let records gather instead of being woken for each one.
                std::thread::sleep(BUSY_POLL);
            }
        }
    }

    fn handle(&mut self, m: Msg, taken: &mut usize) -> Option<tokio::sync::oneshot::Sender<()>> {
        match m {
            Msg::Rec(r) => self.take(Entry::Rec(*r), taken),
            Msg::Call(c) => self.take(Entry::Call(c), taken),
            Msg::Signed { message, result } => {
                self.signing = None;
                self.last_checkpoint = Instant::now();
                match result {
                    // Nothing was written while it was being signed: it goes exactly where it
                    // said it would, before the records that waited for it.
                    Ok(sig)
                        if self.file.is_some()
                            && message.covers_seq == self.seq
                            && message.prev_checkpoint == self.last_checkpoint_seq =>
                    {
                        if let Some(a) = self.write_checkpoint(&message, &sig) {
                            self.anchor(a, false);
                        }
                    }
                    Ok(_) => self.alarm(
                        "audit_checkpoint_failed",
                        "warning",
                        format!(
                            "the signature of the audit checkpoint for seq {} came after records had to be written (more than {} ms); dropped",
                            message.seq,
                            CHECKPOINT_HOLD.as_millis()
                        ),
                    ),
                    Err(e) => self.alarm(
                        "audit_checkpoint_failed",
                        "warning",
                        format!("could not sign an audit checkpoint: {}", detail(&e)),
                    ),
                }
            }
            Msg::AnchorFailed(e) => self.alarm(
                "audit_anchor_failed",
                "warning",
                format!("could not record the newest audit checkpoint in the store: {e}"),
            ),
            Msg::Shutdown(done) => return Some(done),
        }
        None
    }

    fn take(&mut self, e: Entry, taken: &mut usize) {
        *taken += 1;
        if self.pending.len() >= MAX_PENDING {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pending.push_back(e);
        }
    }

    /// Clean stop: `stop` event, final signed checkpoint, fsync.
    fn finish(&mut self, done: tokio::sync::oneshot::Sender<()>) {
        let mut stop = Record::event("stop", "piiguard stopping");
        stop.at = Some(SystemTime::now());
        self.pending.push_back(Entry::Rec(stop));
        // A periodic signature still in flight is given up: the final seal covers everything.
        self.signing = None;
        self.write_pending();
        self.sync();
        if let (Some(signer), true) = (self.signer.clone(), self.file.is_some()) {
            let message = self.next_checkpoint(true);
            let text = message.text();
            let r = self.runtime.block_on(async move {
                tokio::time::timeout(FINAL_SEAL_TIMEOUT, signer.sign(text.as_bytes())).await
            });
            match r {
                Ok(Ok(sig)) => {
                    if let Some(a) = self.write_checkpoint(&message, &sig) {
                        self.anchor(a, true);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %detail(&e), "audit: final checkpoint not signed; verify will report an open tail")
                }
                Err(_) => tracing::error!(
                    "audit: final checkpoint timed out; verify will report an open tail"
                ),
            }
        }
        self.sync();
        let _ = done.send(());
    }

    fn alarm(&mut self, kind_: &'static str, severity: &'static str, detail: String) {
        tracing::error!(alarm = kind_, severity, detail = %detail, "ALARM");
        metrics::counter!("piiguard_alarms_total", "kind" => kind_, "severity" => severity)
            .increment(1);
        let r = Record {
            at: Some(SystemTime::now()),
            kind: kind::ALARM,
            event: Some(kind_),
            severity: Some(severity),
            detail: Some(detail),
            ..Record::default()
        };
        if let Some(w) = &self.webhook {
            w.send(&r, &self.instance);
        }
        self.pending.push_back(Entry::Rec(r));
    }

    /// Serializes `r` as the next line of the chain.
    fn line(&self, seq: u64, prev: &[u8; 32], r: &Record) -> (Vec<u8>, [u8; 32]) {
        let ts = rfc3339(r.at.unwrap_or_else(SystemTime::now));
        let prev = hex::encode(prev);
        let l = Line {
            seq,
            ts: &ts,
            instance: &self.instance,
            rec: r,
            prev: &prev,
        };
        // Serializing plain data (strings, integers, booleans) cannot fail.
        let body = serde_json::to_vec(&l).unwrap_or_else(|_| b"{}".to_vec());
        seal_line(&body)
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        let first = self.seq + 1;
        let name = file_name(first);
        let path = self.cfg.dir.join(&name);
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let start = Record {
            at: Some(SystemTime::now()),
            kind: kind::SEGMENT_START,
            prev_clean: Some(self.prev_clean),
            file: self.prev_file.clone(),
            detail: (!self.prev_clean).then(|| {
                format!(
                    "the previous file ended at seq {} without a final checkpoint (crash, write failure or truncation)",
                    self.seq
                )
            }),
            ..Record::default()
        };
        let (mut line, hash) = self.line(first, &self.head, &start);
        line.push(b'\n');
        f.write_all(&line)?;
        self.seq = first;
        self.head = hash;
        self.file = Some(f);
        self.file_bytes = line.len() as u64;
        self.file_opened = Instant::now();
        self.file_name = name;
        self.dirty = true;
        Ok(())
    }

    fn set_healthy(&mut self, ok: bool) {
        if ok && self.failing {
            self.failing = false;
            let lost = self.lost.swap(0, Ordering::Relaxed);
            tracing::warn!(lost, "audit: sink writing again");
            let mut r = Record::event(
                "audit_recovered",
                format!(
                    "audit sink writing again; {lost} records refused or lost while it was failing"
                ),
            );
            r.severity = Some("warning");
            self.pending.push_front(Entry::Rec(r));
        }
        self.healthy.store(ok, Ordering::Relaxed);
    }

    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.file.is_none() {
            match self.open_segment() {
                Ok(()) => {}
                Err(e) => {
                    self.fail(format!("cannot open a new audit file: {e}"));
                    return;
                }
            }
            self.set_healthy(true);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let (mut seq, mut head) = (self.seq, self.head);
        for e in &self.pending {
            seq += 1;
            head = match e {
                Entry::Rec(r) => {
                    let (line, h) = self.line(seq, &head, r);
                    buf.extend_from_slice(&line);
                    h
                }
                Entry::Call(c) => {
                    let start = buf.len();
                    c.write_body(&mut buf, seq, &self.instance_json, &head);
                    seal_in_place(&mut buf, start)
                }
            };
            buf.push(b'\n');
        }
        self.write_buf(&buf, seq, head);
        // Keep the buffer for the next batch unless a burst made it large.
        if buf.capacity() <= 4 << 20 {
            self.buf = buf;
        }
    }

    fn write_buf(&mut self, buf: &[u8], seq: u64, head: [u8; 32]) {
        if self.append(buf, seq, head) {
            metrics::counter!("piiguard_audit_records_total").increment(self.pending.len() as u64);
            self.pending.clear();
            self.set_healthy(true);
        }
    }

    /// Appends `buf` (lines up to `seq`, whose last hash is `head`) to the current file.
    fn append(&mut self, buf: &[u8], seq: u64, head: [u8; 32]) -> bool {
        let Some(f) = self.file.as_mut() else {
            return false;
        };
        match f.write_all(buf) {
            Ok(()) => {
                self.seq = seq;
                self.head = head;
                self.file_bytes += buf.len() as u64;
                self.dirty = true;
                true
            }
            Err(e) => {
                // The file may now end with a partial line: never append to it again.
                self.file = None;
                self.prev_clean = false;
                self.prev_file = Some(self.file_name.clone());
                self.fail(format!("audit write failed: {e}"));
                false
            }
        }
    }

    /// The checkpoint that would come next: right after the head.
    fn next_checkpoint(&self, final_seal: bool) -> CheckpointMessage {
        CheckpointMessage {
            instance: self.instance.clone(),
            seq: self.seq + 1,
            covers_seq: self.seq,
            covers_hash: hex::encode(self.head),
            final_seal,
            prev_checkpoint: self.last_checkpoint_seq,
        }
    }

    /// Writes a signed checkpoint as the next line (it must be `message.seq`) and fsyncs it.
    /// Returns its anchor.
    fn write_checkpoint(
        &mut self,
        message: &CheckpointMessage,
        sig: &crate::crypto::signature::Signature,
    ) -> Option<AuditAnchor> {
        if message.seq != self.seq + 1 {
            return None;
        }
        let signature = base64::engine::general_purpose::STANDARD.encode(&sig.bytes);
        let rec = Record {
            at: Some(SystemTime::now()),
            kind: kind::CHECKPOINT,
            covers_seq: Some(message.covers_seq),
            covers_hash: Some(message.covers_hash.clone()),
            key_version: Some(sig.key_version),
            signature: Some(signature.clone()),
            final_seal: Some(message.final_seal),
            message: Some(CHECKPOINT_V2),
            prev_checkpoint: Some(message.prev_checkpoint),
            ..Record::default()
        };
        let (mut line, hash) = self.line(message.seq, &self.head, &rec);
        line.push(b'\n');
        if !self.append(&line, message.seq, hash) {
            return None;
        }
        metrics::counter!("piiguard_audit_records_total").increment(1);
        self.set_healthy(true);
        // On disk before the store says it exists.
        self.sync();
        self.checkpointed_seq = message.seq;
        self.last_checkpoint_seq = message.seq;
        Some(AuditAnchor {
            instance: message.instance.clone(),
            checkpoint_seq: message.seq,
            covers_seq: message.covers_seq,
            covers_hash: message.covers_hash.clone(),
            final_seal: message.final_seal,
            prev_checkpoint: message.prev_checkpoint,
            key_version: sig.key_version,
            signature,
            updated_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        })
    }

    /// Records a written checkpoint as the instance's anchor in the store: in the background
    /// (a failure raises `audit_anchor_failed`), or, for the final seal, before returning.
    fn anchor(&self, a: AuditAnchor, wait: bool) {
        let Some(store) = self.anchors.clone() else {
            return;
        };
        if wait {
            let r = self.runtime.block_on(async move {
                tokio::time::timeout(FINAL_SEAL_TIMEOUT, store.put_audit_anchor(&a)).await
            });
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %detail(&e), "audit: final checkpoint not anchored in the store")
                }
                Err(_) => tracing::error!("audit: anchoring the final checkpoint timed out"),
            }
            return;
        }
        let tx = self.tx.clone();
        self.runtime.spawn(async move {
            if let Err(e) = store.put_audit_anchor(&a).await {
                let _ = tx.send(Msg::AnchorFailed(detail(&e)));
            }
        });
    }

    /// Whether new records wait for the checkpoint being signed.
    fn holding(&self) -> bool {
        self.signing
            .is_some_and(|started| started.elapsed() < CHECKPOINT_HOLD)
    }

    fn fail(&mut self, detail: String) {
        metrics::counter!("piiguard_audit_write_errors_total").increment(1);
        if !self.failing {
            self.failing = true;
            self.healthy.store(false, Ordering::Relaxed);
            self.alarm("audit_unavailable", "critical", detail);
        }
    }

    fn sync(&mut self) {
        if let Some(f) = &self.file
            && self.dirty
        {
            if let Err(e) = f.sync_data() {
                tracing::error!(error = %e, "audit: fsync failed");
            }
            self.dirty = false;
        }
        self.last_fsync = Instant::now();
    }

    fn maintenance(&mut self) {
        if self.last_fsync.elapsed() >= self.cfg.fsync_interval {
            self.sync();
        }
        if self.file.is_some()
            && !self.holding()
            && (self.file_bytes >= self.cfg.rotate_bytes
                || self.file_opened.elapsed() >= self.cfg.rotate_interval)
        {
            self.rotate();
        }
        if self.failing && !self.pending.is_empty() && !self.holding() {
            // Retry in a fresh file (write_pending opens one).
            self.write_pending();
        }
        if self.signer.is_some()
            && self.signing.is_none()
            && self.file.is_some()
            && self.seq > self.checkpointed_seq
            && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval
        {
            self.start_checkpoint();
        }
        if self.last_retention.elapsed() >= RETENTION_SWEEP {
            self.last_retention = Instant::now();
            self.apply_retention();
        }
    }

    fn rotate(&mut self) {
        let end = Record {
            at: Some(SystemTime::now()),
            kind: kind::SEGMENT_END,
            file: Some(file_name(self.seq + 2)),
            ..Record::default()
        };
        self.pending.push_front(Entry::Rec(end));
        // Only the segment end goes into this file; the rest follows in the next one.
        let rest: VecDeque<Entry> = self.pending.split_off(1);
        self.write_pending();
        let wrote_end = self.pending.is_empty();
        self.pending.extend(rest);
        if !wrote_end {
            return;
        }
        self.sync();
        self.prev_clean = true;
        self.prev_file = Some(self.file_name.clone());
        self.file = None;
        if let Err(e) = self.open_segment() {
            self.fail(format!("cannot open a new audit file: {e}"));
        }
    }

    fn start_checkpoint(&mut self) {
        let Some(signer) = self.signer.clone() else {
            return;
        };
        // What is signed must be on disk first.
        self.sync();
        self.signing = Some(Instant::now());
        let message = self.next_checkpoint(false);
        let tx = self.tx.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(SIGN_TIMEOUT, signer.sign(message.text().as_bytes()))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Unavailable {
                        detail: format!("signing timed out after {} s", SIGN_TIMEOUT.as_secs()),
                    })
                });
            crate::metrics::vault_call("sign", started.elapsed(), result.is_ok());
            let _ = tx.send(Msg::Signed { message, result });
        });
    }

    fn apply_retention(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.cfg.dir) else {
            return;
        };
        let Some(cutoff) = SystemTime::now().checked_sub(self.cfg.retention) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !is_audit_file(&name) || name == self.file_name {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m < cutoff);
            if old {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(file = %name, "audit: file past retention removed");
                        let mut r = Record::event(
                            "audit_retention",
                            format!("removed {name} (older than the retention period)"),
                        );
                        r.file = Some(name);
                        self.pending.push_back(Entry::Rec(r));
                    }
                    Err(err) => {
                        tracing::warn!(file = %name, error = %err, "audit: cannot remove old file")
                    }
                }
            }
        }
    }
}

/// What an error says, internal details included (for the log and alarms, never a caller).
fn detail(e: &Error) -> String {
    e.detail()
}

/// The audit files of a folder, in chain order (by name: `audit-<first seq>.jsonl`).
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(is_audit_file))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
