//! One throw-away PostgreSQL server per test, from Debian's binaries (`initdb`, `pg_ctl`), on a
//! loopback port and a socket folder of its own.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A throw-away PostgreSQL server on a free loopback port (Debian's packages). Stopped on drop.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    /// The postmaster's options (port, listen address, socket folder), for a restart.
    opts: String,
    /// `postgres://piiguard@127.0.0.1:PORT/postgres` (trust authentication).
    pub url: String,
}

fn pg_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PIIGUARD_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("initdb").exists())
        .expect("PostgreSQL not found: apt-get install postgresql (or set PIIGUARD_PG_BIN)")
}

fn as_postgres_user(bin: &Path, args: &[&str]) -> std::process::Output {
    // initdb refuses to run as root: use the `postgres` account when we are root.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args).stdin(Stdio::null()).output().unwrap()
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the postmaster logs when its port is taken.
const BIND_FAILED: &str = "could not bind";

/// How often the postmaster is started on a new port after losing its port to someone else.
const PG_START_ATTEMPTS: usize = 5;

impl Postgres {
    /// `initdb` into a temporary folder, then `pg_ctl start` on a free loopback port.
    ///
    /// PostgreSQL cannot bind port 0 (it names its lock file and socket after the port, and
    /// reports no bound port), so a free port is picked, released and handed over; another
    /// process may bind it in between. The postmaster then exits at once logging
    /// [`BIND_FAILED`], `pg_ctl -w` fails, and the start is retried on a new port (the data
    /// folder stays: it does not depend on the port).
    pub fn start() -> Self {
        Self::start_on(free_port)
    }

    /// [`start`](Self::start) with the ports drawn from `pick`.
    fn start_on(mut pick: impl FnMut() -> u16) -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let _ = Command::new("chmod").arg("0777").arg(dir.path()).status();
        let d = data.to_str().unwrap();
        let out = as_postgres_user(
            &bin.join("initdb"),
            &[
                "-D",
                d,
                "-A",
                "trust",
                "-U",
                "piiguard",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = dir.path().join("pg.log");
        for attempt in 1..=PG_START_ATTEMPTS {
            let port = pick();
            let opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
                dir.path().display()
            );
            let _ = std::fs::remove_file(&log);
            let out = as_postgres_user(
                &bin.join("pg_ctl"),
                &[
                    "-D",
                    d,
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            );
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            if out.status.success() {
                return Self {
                    _dir: dir,
                    data,
                    bin,
                    opts,
                    url: format!("postgres://piiguard@127.0.0.1:{port}/postgres"),
                };
            }
            assert!(
                log_text.contains(BIND_FAILED) && attempt < PG_START_ATTEMPTS,
                "pg_ctl start: {}{log_text}",
                String::from_utf8_lossy(&out.stderr),
            );
            eprintln!(
                "PostgreSQL attempt {attempt}/{PG_START_ATTEMPTS}: port {port} was taken; trying another"
            );
        }
        unreachable!("the last attempt either returned or panicked")
    }
}

impl Postgres {
    /// `pg_ctl stop -m fast`: open sessions are terminated (FATAL 57P01), then the port closes.
    /// The data folder stays; [`restart`](Self::restart) brings the same database back.
    pub fn stop(&self) {
        let out = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again on the same port (same [`url`](Self::url)); returns
    /// once it accepts connections.
    pub fn restart(&self) {
        let log = self._dir.path().join("pg.log");
        let out = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &self.opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start (restart): {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

#[tokio::test]
async fn postgres_start_moves_on_when_its_port_was_taken() {
    // Someone else binds the first port handed out, between the pick and the postmaster's bind.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let mut picks = vec![free_port(), taken];
    let pg = Postgres::start_on(|| picks.pop().unwrap());
    assert!(picks.is_empty(), "a second port was needed");
    assert!(!pg.url.contains(&format!(":{taken}/")));
    let store = piiguard::store::Store::open(&pg.url).await.unwrap();
    drop(store);
}
