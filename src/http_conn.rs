//! HTTP connections: the accept loop, and each connection served by hyper (HTTP/1.1 with
//! upgrades) until it ends, idles out, or the drain closes it.
//!
//! Without timeouts a half-sent request or an idle keep-alive connection held its slot forever,
//! and a few hundred of them starved `/health`. Two bounds, split as nginx and Go's net/http
//! split them:
//! - **header read**: a new connection, and a keep-alive one from the first byte of its next
//!   request, must deliver the whole request head within `--header-read-timeout`;
//! - **idle**: a keep-alive connection that sends nothing for `--http-idle-timeout` after a
//!   response is closed.
//!
//! hyper's own `header_read_timeout` starts the moment it waits for a head, idle time included,
//! so it cannot say "idle 30 s, then 10 s for the head"; it is set to the sum, as a backstop only.
//! A request being handled has no bound here: the router's `TimeoutLayer` bounds it. An upgraded
//! connection leaves hyper and this module's task at once; its WebSocket task has its own idle
//! timeout (these must not cut a socket the load balancer keeps for an hour).
//!
//! HTTP/1.1 only, as before (axum's `http2` feature was never on): the clients and the load
//! balancer speak it to instances, and its upgrades carry the WebSockets. Every connection task
//! is owned by the accept loop's `JoinSet`: reaped as it goes, aborted with it.

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::listener::{Counted, LimitedListener};
use crate::shutdown::{Phase, Shutdown};

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    /// `idle` for connections from a trusted proxy (see `--proxy-idle-timeout`).
    pub proxy_idle: Duration,
}

/// Accepts and serves until the drain's `Closing` phase, then stops accepting, asks every
/// connection to close after its current request, and returns once all have ended (the caller
/// bounds that wait and aborts this task past it, which drops the connections).
pub async fn serve(
    mut listener: LimitedListener,
    router: Router,
    timeouts: Timeouts,
    proxies: Vec<ipnet::IpNet>,
    shutdown: Shutdown,
) {
    let mut conns = JoinSet::new();
    let mut closing = pin!(shutdown.reached(Phase::Closing));
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut closing => break,
        };
        // Reaped here, not in the select: a finished task must not cancel an accept that holds
        // a connection waiting for a slot.
        while conns.try_join_next().is_some() {}
        let mut timeouts = timeouts;
        if crate::client::trusted(crate::client::canonical(peer.ip()), &proxies) {
            timeouts.idle = timeouts.proxy_idle;
        }
        conns.spawn(connection(
            io,
            peer,
            router.clone(),
            timeouts,
            shutdown.clone(),
        ));
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn connection(
    io: Counted,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    shutdown: Shutdown,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io,
        activity: activity.clone(),
    });
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let busy = requests.busy();
        let response = router.clone().oneshot(req);
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read + timeouts.idle);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut closing = pin!(shutdown.reached(Phase::Closing));
    let mut asked_to_close = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection failed");
                }
                return;
            }
            _ = &mut closing, if !asked_to_close => {
                asked_to_close = true;
                conn.as_mut().graceful_shutdown();
            }
            why = activity.expired(timeouts) => {
                // Nothing in flight: dropping the connection is a clean close.
                tracing::debug!(%peer, why, "closing an HTTP connection");
                return;
            }
        }
    }
}

/// Where a connection is between requests: set by its IO and its service (both polled by the
/// connection's task until an upgrade takes the IO away), watched by that task.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Waiting for a request head, since the connection opened or the head's first byte.
    Head(Instant),
    /// No request in flight and no byte since this instant (the previous response).
    Idle(Instant),
    /// This many requests are being handled (HTTP/1.1: one, but counting costs nothing).
    Busy(usize),
}

struct Activity {
    state: Mutex<State>,
    /// Mirrors `state` being `Idle`, so a read checks one atomic (WebSocket reads included).
    idle: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(State::Head(Instant::now())),
            idle: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn set(&self, f: impl FnOnce(State) -> State) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = f(*state);
        self.idle
            .store(matches!(*state, State::Idle(_)), Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn get(&self) -> State {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: an idle connection starts its next head.
    fn read(&self) {
        if self.idle.load(Ordering::Relaxed) {
            self.set(|s| match s {
                State::Idle(_) => State::Head(Instant::now()),
                other => other,
            });
        }
    }

    fn busy(self: &Arc<Self>) -> Busy {
        self.set(|s| match s {
            State::Busy(n) => State::Busy(n + 1),
            _ => State::Busy(1),
        });
        Busy(self.clone())
    }

    /// Resolves when the current state has outlived its bound; says which bound.
    async fn expired(&self, t: Timeouts) -> &'static str {
        loop {
            let (deadline, why) = match self.get() {
                State::Head(since) => (since + t.header_read, "request head not read in time"),
                State::Idle(since) => (since + t.idle, "idle keep-alive"),
                State::Busy(_) => {
                    self.changed.notified().await;
                    continue;
                }
            };
            if Instant::now() >= deadline {
                return why;
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// A request in flight; the connection idles from its drop (the response is built by then).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(|s| match s {
            State::Busy(n) if n > 1 => State::Busy(n - 1),
            _ => State::Idle(Instant::now()),
        });
    }
}

/// The connection's stream, reporting reads to its [`Activity`].
struct Watched {
    io: Counted,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
