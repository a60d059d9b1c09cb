//! Hot reload: one mechanism for every value built from files (the TLS server config, the
//! access policy).
//!
//! The value in force is an `Arc<T>` in a `tokio::sync::watch` channel. Readers
//! (`tls::incoming` for each handshake, the guard for each call) `borrow()` it, clone the `Arc`
//! and let go at once: no lock is held across an await, and a reload never waits for a reader.
//!
//! A [`Reloader`] loads its value once at start-up (an error there stops the start-up), then
//! [`Reloader::spawn`] reloads it
//! - when the content of one of its files changes (SHA-256 of the bytes, checked every
//!   `interval`; a modification time alone does not count, an edit within the same second
//!   does), and
//! - on SIGHUP (always, even if nothing changed).
//!
//! A new file set that does not load leaves the old value in force; the [`ReloadReport`] is told
//! which files changed and why the load failed (the errors of the loaders name files and
//! problems, never key material), and raises the alarm. The same broken content is not tried
//! again until it changes (or SIGHUP), so a broken file alarms once; a fixed file is picked up
//! at the next check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::access::alarms::{Severity, kinds};
use crate::access::guard::Sentry;
use crate::access::policy::Policy;

/// SHA-256 of a file's content; `None` if it cannot be read (missing, mid-rename, ...).
type Stamp = Option<[u8; 32]>;

fn stamp(path: &Path) -> Stamp {
    // A key file's bytes are wiped once hashed.
    let bytes = Zeroizing::new(std::fs::read(path).ok()?);
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Some(out)
}

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths.iter().map(|p| stamp(p)).collect()
}

type Loader<T, E> = Box<dyn Fn() -> Result<T, E> + Send + Sync>;

/// A value loaded from files, published through a `watch` channel and reloaded on change.
pub struct Reloader<T, E> {
    name: &'static str,
    paths: Vec<PathBuf>,
    load: Loader<T, E>,
    tx: watch::Sender<Arc<T>>,
    /// The files as they were at the last successful load.
    good: Vec<Stamp>,
    /// The files as they were at the last attempt (successful or not).
    tried: Vec<Stamp>,
}

/// One reload attempt.
#[derive(Debug)]
pub struct Attempt<T, E> {
    /// The files whose content differs from the last good load (before this attempt).
    pub changed: Vec<PathBuf>,
    /// The new value, now in force; or why the files did not load (the old value stays).
    pub result: Result<Arc<T>, E>,
}

/// Told about every reload attempt that changed something or failed.
pub trait ReloadReport<T>: Send + Sync + 'static {
    /// A new value is in force.
    fn reloaded(&self, value: &T, changed: &[PathBuf]);
    /// New files were refused; the previous value stays in force.
    fn refused(&self, changed: &[PathBuf], error: &dyn std::error::Error);
}

impl<T, E> Reloader<T, E>
where
    T: Send + Sync + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Loads the value for the first time. `name` names it in logs; `paths` are the files
    /// `load` reads (their change triggers a reload).
    pub fn load(
        name: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let now = stamps(&paths);
        let value = load()?;
        let (tx, _) = watch::channel(Arc::new(value));
        Ok(Self {
            name,
            paths,
            load: Box::new(load),
            tx,
            good: now.clone(),
            tried: now,
        })
    }

    /// A receiver of the value in force (`borrow()` it, clone the `Arc`, let go).
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.tx.subscribe()
    }

    /// One check. `force` (SIGHUP) loads even if no file changed. `None`: nothing changed.
    pub fn check(&mut self, force: bool) -> Option<Attempt<T, E>> {
        let now = stamps(&self.paths);
        if !force && now == self.tried {
            return None;
        }
        self.tried = now.clone();
        let changed: Vec<PathBuf> = self
            .paths
            .iter()
            .zip(now.iter().zip(&self.good))
            .filter(|(_, (n, g))| n != g)
            .map(|(p, _)| p.clone())
            .collect();
        let result = (self.load)().map(|v| {
            let v = Arc::new(v);
            self.tx.send_replace(v.clone());
            self.good = now;
            v
        });
        Some(Attempt { changed, result })
    }

    /// Reloads on SIGHUP and, if `interval` is set, when a file's content changes; tells
    /// `report` the outcome. Stops when every receiver is gone or the handle is aborted.
    pub fn spawn(
        mut self,
        interval: Option<Duration>,
        report: impl ReloadReport<T>,
    ) -> JoinHandle<()> {
        // Registered before the task starts: a SIGHUP sent once this returns is not lost.
        let mut hup = hangups(self.name);
        tokio::spawn(async move {
            let mut tick = interval.map(|d| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                let forced = tokio::select! {
                    _ = next_hangup(&mut hup) => true,
                    _ = async {
                        match tick.as_mut() {
                            Some(t) => { t.tick().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => false,
                    _ = self.tx.closed() => return,
                };
                // Small files: read and parsed inline, as before the reloader existed.
                match self.check(forced) {
                    None => {}
                    Some(Attempt {
                        changed,
                        result: Ok(v),
                    }) => report.reloaded(&v, &changed),
                    Some(Attempt {
                        changed,
                        result: Err(e),
                    }) => report.refused(&changed, &e),
                }
            }
        })
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn hangups(name: &str) -> Hangups {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(reloading = name, error = %e, "no SIGHUP handler; reload on file change only");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = name;
    }
}

async fn next_hangup(h: &mut Hangups) {
    #[cfg(unix)]
    if let Some(s) = h.as_mut()
        && s.recv().await.is_some()
    {
        return;
    }
    let _ = h;
    std::future::pending::<()>().await
}

fn names(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no file changed".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reports the reloads of one source to the audit log (an event on success, an alarm on
/// refusal: audit record, `piiguard_alarms_total`, log line, webhook) and to a
/// `<metric>{result="ok"|"error"}` counter.
pub struct AuditReport<T> {
    sentry: Weak<Sentry>,
    /// Audit event of a successful reload.
    event: &'static str,
    /// Alarm kind of a refused reload.
    alarm: &'static str,
    /// Counter of reload attempts.
    metric: &'static str,
    /// First words of the alarm text.
    refused: &'static str,
    /// Text of the success event.
    describe: fn(&T) -> String,
}

impl AuditReport<Policy> {
    /// Reports of the access policy reloader.
    pub fn policy(sentry: &Arc<Sentry>) -> Self {
        Self {
            sentry: Arc::downgrade(sentry),
            event: "policy_reload",
            alarm: kinds::POLICY_RELOAD_FAILED,
            metric: "piiguard_policy_reloads_total",
            refused: "new access policy refused, the previous one stays in force",
            describe: |p| {
                format!(
                    "policy reloaded: {} grants, sha256 {}",
                    p.grant_count, p.digest
                )
            },
        }
    }
}

impl AuditReport<crate::tls::ServerTls> {
    /// Reports of the TLS reloader (server certificate and key, client CA, CRLs).
    pub fn tls(sentry: &Arc<Sentry>) -> Self {
        Self {
            sentry: Arc::downgrade(sentry),
            event: "tls_reload",
            alarm: kinds::TLS_RELOAD_FAILED,
            metric: "piiguard_tls_reloads_total",
            refused: "TLS reload failed; the previous certificate, key, client CA and CRLs stay in force",
            describe: |_| "TLS certificate, key, client CA and CRLs reloaded".into(),
        }
    }
}

impl<T: Send + Sync + 'static> ReloadReport<T> for AuditReport<T> {
    fn reloaded(&self, value: &T, changed: &[PathBuf]) {
        metrics::counter!(self.metric, "result" => "ok").increment(1);
        let detail = (self.describe)(value);
        tracing::info!(event = self.event, files = %names(changed), "{detail}");
        if let Some(s) = self.sentry.upgrade() {
            s.event(self.event, None, detail);
        }
    }

    fn refused(&self, changed: &[PathBuf], error: &dyn std::error::Error) {
        metrics::counter!(self.metric, "result" => "error").increment(1);
        let detail = format!("{} (changed: {}): {error}", self.refused, names(changed));
        match self.sentry.upgrade() {
            Some(s) => s
                .alarms
                .raise(self.alarm, Severity::Warning, None, None, detail),
            None => tracing::error!(alarm = self.alarm, detail = %detail, "reload refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("not a number: {0}")]
    struct NotANumber(String);

    fn number(path: &Path) -> Result<u64, NotANumber> {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        t.trim()
            .parse()
            .map_err(|_| NotANumber(t.trim().to_string()))
    }

    fn reloader(path: &Path) -> Reloader<u64, NotANumber> {
        let p = path.to_path_buf();
        Reloader::load("number", vec![p.clone()], move || number(&p)).unwrap()
    }

    #[test]
    fn a_broken_file_keeps_the_old_value_once_and_a_fixed_one_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("n");
        std::fs::write(&f, "1").unwrap();
        let mut r = reloader(&f);
        let rx = r.subscribe();
        assert_eq!(**rx.borrow(), 1);
        assert!(r.check(false).is_none(), "nothing changed");

        std::fs::write(&f, "two").unwrap();
        let refused = r.check(false).unwrap();
        assert_eq!(refused.changed, vec![f.clone()]);
        assert_eq!(refused.result.unwrap_err().to_string(), "not a number: two");
        assert_eq!(**rx.borrow(), 1, "the old value stays in force");
        assert!(
            r.check(false).is_none(),
            "the same broken content alarms once"
        );
        assert!(r.check(true).unwrap().result.is_err(), "SIGHUP tries again");

        std::fs::write(&f, "3").unwrap();
        assert_eq!(*r.check(false).unwrap().result.unwrap(), 3);
        assert_eq!(**rx.borrow(), 3);
        // Same length, same second: content decides.
        std::fs::write(&f, "4").unwrap();
        let a = r.check(false).unwrap();
        assert_eq!(*a.result.unwrap(), 4);
        assert_eq!(a.changed, vec![f.clone()]);
        assert!(
            r.check(true).unwrap().changed.is_empty(),
            "SIGHUP, nothing changed"
        );
    }

    #[test]
    fn the_first_load_fails_like_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("n");
        std::fs::write(&f, "x").unwrap();
        let p = f.clone();
        let e = Reloader::load("number", vec![f], move || number(&p))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "not a number: x");
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl ReloadReport<u64> for Arc<Log> {
        fn reloaded(&self, value: &u64, _: &[PathBuf]) {
            self.0.lock().unwrap().push(format!("ok {value}"));
        }
        fn refused(&self, changed: &[PathBuf], error: &dyn std::error::Error) {
            self.0
                .lock()
                .unwrap()
                .push(format!("refused {} {error}", changed.len()));
        }
    }

    #[tokio::test]
    async fn the_task_publishes_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("n");
        std::fs::write(&f, "1").unwrap();
        let r = reloader(&f);
        let mut rx = r.subscribe();
        let log = Arc::new(Log::default());
        let task = r.spawn(Some(Duration::from_millis(10)), log.clone());
        std::fs::write(&f, "bad").unwrap();
        let wait = async |n: usize| {
            for _ in 0..500 {
                if log.0.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no report: {:?}", log.0.lock().unwrap());
        };
        wait(1).await;
        assert_eq!(**rx.borrow(), 1);
        std::fs::write(&f, "5").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(**rx.borrow(), 5);
        wait(2).await;
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![
                "refused 1 not a number: bad".to_string(),
                "ok 5".to_string()
            ]
        );
        task.abort();
    }
}
