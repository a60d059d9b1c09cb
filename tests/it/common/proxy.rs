//! A loopback TCP proxy between piiguard and OpenBao that makes Vault slow or lossy on demand
//! (tests/it/vault_slow.rs). It forwards bytes, so TLS goes through it end to end: piiguard
//! still verifies OpenBao's certificate (issued for 127.0.0.1, whatever the port).
//!
//! Modes, switchable at run time with [`Proxy::set`], applied to connections already open as
//! well as to new ones:
//! - [`Mode::Pass`]: bytes go through as they come.
//! - [`Mode::Latency`]: every chunk from piiguard to Vault is held this long first (a request
//!   is one chunk or a few, so each request and each handshake flight is that much slower).
//! - [`Mode::Stall`]: connections are accepted, nothing is forwarded either way (held until the
//!   mode changes).
//! - [`Mode::Drop`]: every open connection is closed; new ones are closed as soon as accepted.
//!
//! The proxy and all its connections end when it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward as they come.
    Pass,
    /// Hold each chunk from piiguard to Vault this long.
    Latency(Duration),
    /// Accept, forward nothing.
    Stall,
    /// Close every connection.
    Drop,
}

/// A running proxy on 127.0.0.1 (port chosen by the kernel).
pub struct Proxy {
    /// Where piiguard connects.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, op) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                if *rx.borrow() == Mode::Drop {
                    drop(sock);
                    continue;
                }
                let (rx, op) = (rx.clone(), op.clone());
                op.fetch_add(1, Ordering::Relaxed);
                conns.spawn(async move {
                    relay(sock, upstream, rx).await;
                    op.fetch_sub(1, Ordering::Relaxed);
                });
                // Reap finished connections now and then.
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy {
            addr,
            mode,
            accepted,
            open,
            task,
        }
    }

    /// The address in the form of `vault.address`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Switches the mode (open connections follow at once).
    pub fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// Waits until the mode lets bytes through; `None` = close (Drop, or the proxy is gone).
/// Returns the latency to add.
async fn passable(rx: &mut watch::Receiver<Mode>) -> Option<Duration> {
    loop {
        let m = *rx.borrow_and_update();
        match m {
            Mode::Pass => return Some(Duration::ZERO),
            Mode::Latency(d) => return Some(d),
            Mode::Drop => return None,
            Mode::Stall => rx.changed().await.ok()?,
        }
    }
}

/// Resolves when the mode becomes Drop (or the proxy is gone).
async fn dropped(mut rx: watch::Receiver<Mode>) {
    loop {
        if *rx.borrow_and_update() == Mode::Drop {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
    // A stalled proxy does not even connect upstream until the stall ends.
    if passable(&mut rx).await.is_none() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, rx.clone(), true);
    let down = pump(sr, cw, rx.clone(), false);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = dropped(rx) => {}
    }
}

/// Copies chunks from `r` to `w`, each only when the mode lets it through (held during a
/// stall, delayed in latency mode when `to_vault`).
async fn pump(
    mut r: impl tokio::io::AsyncRead + Unpin,
    mut w: impl tokio::io::AsyncWrite + Unpin,
    mut rx: watch::Receiver<Mode>,
    to_vault: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Some(delay) = passable(&mut rx).await else {
            return;
        };
        if to_vault && !delay.is_zero() {
            tokio::time::sleep(delay).await;
            // The mode may have changed meanwhile (a stall or a drop).
            if passable(&mut rx).await.is_none() {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
