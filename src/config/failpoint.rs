//! Test-only failpoints, read from the environment once. Compiled in (the shipped binary is the
//! one tested), off unless `PIIGUARD_FAILPOINT` is set, which production never does.
//!
//! `PIIGUARD_FAILPOINT` is a comma-separated list of actions:
//! - `<name>`: the process aborts at point `<name>`, exactly as a `kill -9` would (crash-safety
//!   tests).
//! - `pause:<name>`: the first task that reaches `<name>` writes `<dir>/<name>.reached` and waits
//!   until `<dir>/<name>.release` exists, `<dir>` being `PIIGUARD_FAILPOINT_DIR`; later arrivals
//!   pass. A test uses it to interleave another call at an exact point (race tests).
//! - `flag:<name>`: [`flag`] returns true for `<name>`: the process behaves as an older build
//!   did at that point (compatibility tests).
//!
//! Points: `shred-before-claim`, `shred-after-intent`, `shred-after-vault-delete`
//! (`ops::erasure`), `load-subject-after-state-check`, `load-subject-before-cache-insert`,
//! `create-after-wrap`, `rotate-before-dek-record-write`, `rotate-between-record-writes`
//! (`keys::manager`),
//! `publish-eviction-before-commit` (`store`), `kek-rewrap-after-batch` (`keys::kek`: a batch
//! of DEK or subject records rewrapped and its progress saved).
//!
//! Flags: `ff1-subkey-v1` (`ops::tokens`: new FF1 tokens take their tweak from the subkey of
//! builds before security finding 11, to make tokens as those builds made them);
//! `dek-record-at-creation` (`keys::manager`: a new subject also gets its DEK record, as
//! builds before store schema 3 made it); `hashed-random-tokens` (`ops::tokens`: a random
//! opaque token is stored by its keyed hash, as builds before token locators made it).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

struct Actions {
    abort: Vec<String>,
    pause: Vec<(String, AtomicBool)>,
    flags: Vec<String>,
    dir: PathBuf,
}

fn actions() -> &'static Option<Actions> {
    static ACTIONS: OnceLock<Option<Actions>> = OnceLock::new();
    ACTIONS.get_or_init(|| {
        let spec = std::env::var("PIIGUARD_FAILPOINT").ok()?;
        let mut a = Actions {
            abort: Vec::new(),
            pause: Vec::new(),
            flags: Vec::new(),
            dir: std::env::var_os("PIIGUARD_FAILPOINT_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        };
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some(name) = item.strip_prefix("pause:") {
                a.pause.push((name.to_string(), AtomicBool::new(false)));
            } else if let Some(name) = item.strip_prefix("flag:") {
                a.flags.push(name.to_string());
            } else {
                a.abort.push(item.to_string());
            }
        }
        Some(a)
    })
}

/// Whether the flag `name` is set (tests only; see the module documentation).
pub fn flag(name: &str) -> bool {
    actions()
        .as_ref()
        .is_some_and(|a| a.flags.iter().any(|n| n == name))
}

/// A failpoint: does nothing unless `PIIGUARD_FAILPOINT` names `name` (tests only; see the
/// module documentation).
pub async fn point(name: &str) {
    let Some(a) = actions() else { return };
    if a.abort.iter().any(|n| n == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting the process");
        std::process::abort();
    }
    let Some((_, taken)) = a.pause.iter().find(|(n, _)| n == name) else {
        return;
    };
    if taken.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(
        failpoint = name,
        "failpoint reached: pausing until released"
    );
    let release = a.dir.join(format!("{name}.release"));
    if let Err(e) = std::fs::write(a.dir.join(format!("{name}.reached")), b"") {
        tracing::error!(failpoint = name, error = %e, "failpoint: cannot write the reached file");
    }
    while !release.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(failpoint = name, "failpoint released");
}
