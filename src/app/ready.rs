//! The ready file (`server.ready_file`): where `piiguard serve` reports the addresses it bound.
//!
//! Each listener may be configured with port 0 (`127.0.0.1:0`); the kernel then picks a free
//! port at bind time, so no other process can take it between a "pick" and the bind. Whoever
//! started the server learns the ports from this file:
//!
//! - at start, before anything else, a ready file left by a previous run is removed;
//! - once every listener (gRPC, health, metrics) is bound, the file is written atomically (a
//!   temporary file in the same folder, fsynced, then renamed over the path): a reader sees
//!   either no file or the whole JSON object, never a partial one;
//! - on shutdown (SIGTERM/SIGINT) it is removed before in-flight calls are drained. A process
//!   killed with SIGKILL leaves it behind: compare `pid` with the process you started.
//!
//! The content is one JSON object and a newline:
//!
//! ```json
//! {"pid":4242,"instance":"dev","listen":"127.0.0.1:41013","health_listen":"127.0.0.1:38877","metrics_listen":null}
//! ```
//!
//! `health_listen` and `metrics_listen` are `null` when that listener is off.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The content of the ready file: the addresses actually bound, after port 0 was resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Process id of the server that wrote the file.
    pub pid: u32,
    /// `server.instance`.
    pub instance: String,
    /// The mutual-TLS gRPC listener.
    pub listen: SocketAddr,
    /// The plaintext health-only listener, if configured.
    pub health_listen: Option<SocketAddr>,
    /// The plaintext metrics listener, if configured.
    pub metrics_listen: Option<SocketAddr>,
}

/// A ready file that could not be written, removed or read.
#[derive(Debug, thiserror::Error)]
pub enum ReadyFileError {
    /// A file system operation on the ready file (or its temporary sibling) failed.
    #[error("ready file {path}: {source}")]
    Io {
        /// The file the operation was on.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a ready file's JSON object.
    #[error("ready file {path}: {source}")]
    Json {
        /// The file read.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReadyFileError + '_ {
    move |source| ReadyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Ready {
    /// Writes `self` to `path` atomically: a temporary file in the same folder, fsynced, then
    /// renamed over `path`.
    pub fn write(&self, path: &Path) -> Result<(), ReadyFileError> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(name);
        let mut text = serde_json::to_vec(self).map_err(|source| ReadyFileError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        text.push(b'\n');
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()
        })();
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(path)(e));
        }
        Ok(())
    }

    /// Reads a ready file: `Ok(None)` while it does not exist (the server is not ready yet).
    pub fn read(path: &Path) -> Result<Option<Self>, ReadyFileError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| ReadyFileError::Json {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }
}

/// Removes the ready file at `path`; a file that does not exist is not an error.
pub fn remove(path: &Path) -> Result<(), ReadyFileError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ready {
        Ready {
            pid: 4242,
            instance: "dev".into(),
            listen: "127.0.0.1:41013".parse().unwrap(),
            health_listen: Some("127.0.0.1:38877".parse().unwrap()),
            metrics_listen: None,
        }
    }

    #[test]
    fn written_atomically_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        assert_eq!(Ready::read(&path).unwrap(), None);
        sample().write(&path).unwrap();
        assert_eq!(Ready::read(&path).unwrap(), Some(sample()));
        // Only the file itself: the temporary sibling was renamed, not left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ready.json")]);
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(Ready::read(&path).unwrap(), None);
    }

    #[test]
    fn the_documented_format() {
        let text = r#"{"pid":4242,"instance":"dev","listen":"127.0.0.1:41013","health_listen":"127.0.0.1:38877","metrics_listen":null}"#;
        assert_eq!(serde_json::from_str::<Ready>(text).unwrap(), sample());
        assert_eq!(serde_json::to_string(&sample()).unwrap(), text);
    }

    #[test]
    fn a_partial_file_is_an_error_not_a_ready_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        std::fs::write(&path, b"{\"pid\":1,").unwrap();
        assert!(matches!(
            Ready::read(&path),
            Err(ReadyFileError::Json { .. })
        ));
        let missing_dir = dir.path().join("nope").join("ready.json");
        assert!(matches!(
            sample().write(&missing_dir),
            Err(ReadyFileError::Io { .. })
        ));
    }
}
