//! The TCP listener: a cap on open connections, a cap per peer address, and accept errors that
//! never stall serving.
//!
//! The original wedged at ~1000 peers under a 1024 descriptor limit: `accept` failed with
//! EMFILE, axum's default listener slept a full second after each failure, and `/health` timed
//! out. Here every accepted connection holds a permit of a semaphore sized below the descriptor
//! limit, and the descriptors between this cap and the WebSocket cap stay free for `/health`
//! and `/ready`. Once every permit is taken, the next connection waits at most [`SLOT_WAIT`]
//! for one (those after it wait in the kernel's backlog): a burst of upgrades refused with 503
//! holds slots for a few milliseconds only, and a health check arriving in that burst must be
//! served, not dropped. A connection still without a slot after that wait is accepted and
//! closed at once (a clean close, not a hang). An accept error backs off a few milliseconds.
//!
//! One directly connected host may hold at most `per_address` connections, so it cannot take
//! every slot (those `/health` needs included); a connection past that is closed at once, before
//! it waits for a slot. Trusted proxies are exempt: all their clients share their address, and
//! the per-client limits (`addr_limits`) apply behind them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::addr_limits::{Counter, Slot};
use crate::client::{canonical, trusted};

/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS…): short, so serving resumes as soon
/// as a descriptor frees up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// How long the next connection may wait for a slot when all are taken, before it is refused.
/// While it waits, no other connection is accepted; so this also paces refusals when slots
/// stay taken (one per `SLOT_WAIT`), and must stay short.
pub const SLOT_WAIT: Duration = Duration::from_millis(50);

pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    per_address: Counter,
    trusted_proxies: Vec<IpNet>,
    last_warning: Option<Instant>,
}

impl LimitedListener {
    pub fn new(
        inner: TcpListener,
        max_connections: usize,
        per_address: usize,
        trusted_proxies: Vec<IpNet>,
    ) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            per_address: Counter::new(per_address),
            trusted_proxies,
            last_warning: None,
        }
    }

    /// Logs at most once every ten seconds, so a storm cannot flood the log.
    fn warn(&mut self, what: &str, error: Option<&io::Error>) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        self.last_warning = Some(now);
        match error {
            Some(e) => tracing::warn!(error = %e, "{what}"),
            None => tracing::warn!("{what}"),
        }
    }

    /// The next connection that got a slot, with TCP_NODELAY set (signaling is small writes).
    pub async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.warn("accept failed", Some(&e));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let ip = canonical(addr.ip());
            let address_slot = if trusted(ip, &self.trusted_proxies) {
                None
            } else {
                match self.per_address.try_acquire(crate::client::limit_key(ip)) {
                    Some(slot) => Some(slot),
                    None => {
                        crate::metrics::refused("connections_per_address");
                        self.warn("per-address connection limit reached; refusing", None);
                        drop(stream);
                        continue;
                    }
                }
            };
            // All taken: wait briefly for one to free up. Only this connection holds a
            // descriptor meanwhile (taken from the reserve below the limit); the next ones wait
            // in the kernel's backlog.
            let slot = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => tokio::time::timeout(SLOT_WAIT, self.permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            match slot {
                Some(permit) => {
                    let _ = stream.set_nodelay(true);
                    let counted = Counted {
                        stream,
                        _permit: permit,
                        _address_slot: address_slot,
                    };
                    return (counted, addr);
                }
                None => {
                    crate::metrics::refused("connections_full");
                    self.warn("connection limit reached; refusing new connections", None);
                    drop(stream);
                }
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that gives its connection slots back when dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// `None` for a trusted proxy.
    _address_slot: Option<Slot>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
