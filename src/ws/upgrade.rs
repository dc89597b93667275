//! The WebSocket handshake (RFC 6455 §4.2) and the socket under tungstenite.
//!
//! Done here rather than by axum's `WebSocketUpgrade`, which hides the upgraded connection:
//! the socket goes to tungstenite through a [`BurstIo`], which holds buffers only while a
//! burst is under way. Reads: an idle socket keeps tungstenite's 512-byte read buffer, and a
//! burst is still read from the kernel in 16 KiB gulps (tungstenite reads at most its buffer's
//! size per call: with the buffer alone, one `recv` per signal or two). Writes: tungstenite writes each
//! frame through at once (its own buffer, which never shrinks, then holds one frame at most,
//! and [`FRAGMENT`] bounds that); they collect here until the socket task flushes its batch,
//! in one `send`, and the buffer is given back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// The upgraded connection as the socket task sees it.
pub type Socket = WebSocketStream<BurstIo<TokioIo<hyper::upgrade::Upgraded>>>;

/// Text frames are written in pieces of at most this many bytes (a fragmented message, RFC 6455
/// §5.4), so tungstenite's write buffer, which keeps the capacity of the largest frame it ever
/// wrote, stays small on sockets that once got a large `join_success` or SDP. 512 (was 1024):
/// an ICE candidate signal still goes whole, a room's `join_success` in a few pieces, and an idle
/// joined peer keeps 0.3 KiB less (9.37 → 9.02 KiB in-process, 8.43 → 8.13 KiB on Redis; 10,000
/// peers in rooms of 10).
pub const FRAGMENT: usize = 512;
/// Bytes collected for one flush at most; a larger batch is written as it grows.
const WRITE_GULP: usize = 64 * 1024;

/// What the kernel is asked for at once when tungstenite wants less than this.
const GULP: usize = 16 * 1024;

/// A valid upgrade request, not answered yet.
pub struct Handshake {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

fn refuse(status: StatusCode, why: &str) -> Response {
    crate::metrics::refused("bad_upgrade");
    (status, axum::Json(json!({ "error": why }))).into_response()
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "WebSocket upgrades use GET",
            ));
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
        {
            return Err(refuse(StatusCode::BAD_REQUEST, "not a WebSocket upgrade"));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "unsupported WebSocket version",
            ));
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "connection not upgradable",
            ));
        };
        Ok(Handshake { key, on_upgrade })
    }
}

impl Handshake {
    /// Answers 101 and, once hyper hands the connection over, runs `serve` on the socket in a
    /// task of its own (it ends with the socket; the caller's permits go with `serve`).
    pub fn accept<F, Fut>(self, config: WebSocketConfig, serve: F) -> Response
    where
        F: FnOnce(Socket, Cork) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        // Boxed: a task keeps room for its captures all its life, even once they are used up.
        let serve = Box::new(serve);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let cork = Cork::default();
            let io = BurstIo::new(TokioIo::new(upgraded), cork.clone());
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            serve(socket, cork).await;
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(axum::body::Body::empty())
            .expect("a valid response")
    }
}

/// Reads a burst in gulps: when a read fills the reader's buffer to the brim (more is likely
/// waiting), up to [`GULP`] bytes more are taken from the kernel at once and served to the next
/// reads. Writes collect until a flush. Both buffers exist only while they hold bytes, so an
/// idle socket keeps none.
pub struct BurstIo<T> {
    io: T,
    buf: Vec<u8>,
    pos: usize,
    /// An error the gulp read met, reported once the gulp is served.
    err: Option<std::io::Error>,
    out: Vec<u8>,
    /// Bytes of `out` written already.
    sent: usize,
    /// Set while the socket task writes a batch (see [`Cork`]); otherwise (tungstenite's own
    /// pongs and close replies) writes go straight through.
    cork: Cork,
}

/// Held by the socket task: while corked, writes collect in [`BurstIo`] until the flush.
#[derive(Clone, Default)]
pub struct Cork(Arc<AtomicBool>);

impl Cork {
    pub fn set(&self, corked: bool) {
        self.0.store(corked, Ordering::Relaxed);
    }

    fn corked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<T> BurstIo<T> {
    fn new(io: T, cork: Cork) -> Self {
        Self {
            io,
            buf: Vec::new(),
            pos: 0,
            err: None,
            out: Vec::new(),
            sent: 0,
            cork,
        }
    }
}

impl<T: AsyncWrite + Unpin> BurstIo<T> {
    /// Writes out what was collected; the buffer is given back once empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BurstIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            let n = out.remaining().min(this.buf.len() - this.pos);
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.err.take() {
            return Poll::Ready(Err(e));
        }
        let before = out.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
        if out.remaining() > 0 || out.filled().len() == before {
            return Poll::Ready(Ok(()));
        }
        let mut gulp: Vec<u8> = Vec::with_capacity(GULP);
        let mut rb = ReadBuf::uninit(gulp.spare_capacity_mut());
        match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
                unsafe { gulp.set_len(n) };
                if n > 0 {
                    this.buf = gulp;
                }
            }
            Poll::Ready(Err(e)) => this.err = Some(e),
            Poll::Pending => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BurstIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.cork.corked() || this.out.len() + buf.len() > WRITE_GULP {
            ready!(this.poll_drain(cx))?;
            if !this.cork.corked() {
                return Pin::new(&mut this.io).poll_write(cx, buf);
            }
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The frames that carry one text message: itself, or pieces of at most [`FRAGMENT`] bytes
/// (a first text frame, then continuations; the payload is shared, not copied).
pub fn text_frames(text: crate::protocol::Frame) -> impl Iterator<Item = tungstenite::Message> {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame as WsFrame;
    let pieces = text.len().div_ceil(FRAGMENT).max(1);
    // Holds the text alone: a socket task holds this across its writes, and a larger state
    // moved idle sockets into the next allocation size class (+0.27 KiB per idle peer).
    (0..pieces).map(move |i| {
        if pieces == 1 {
            // As the text it is: converted back from bytes, it was checked for UTF-8 again
            // (~1 % of a burst).
            return tungstenite::Message::Text(text.clone());
        }
        let bytes = axum::body::Bytes::from(text.clone());
        let piece = bytes.slice(i * FRAGMENT..((i + 1) * FRAGMENT).min(bytes.len()));
        let opcode = OpCode::Data(if i == 0 { Data::Text } else { Data::Continue });
        tungstenite::Message::Frame(WsFrame::message(piece, opcode, i + 1 == pieces))
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_reads_are_served_from_one_gulp_and_nothing_is_kept_after() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        tx.write_all(&data).await.unwrap();
        drop(tx);
        let mut r = BurstIo::new(rx, Cork::default());
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        let mut gulps = 0;
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            gulps += usize::from(r.pos == 0 && !r.buf.is_empty());
        }
        assert_eq!(got, data);
        assert!(gulps >= 2, "the burst came in gulps ({gulps})");
        assert_eq!(r.buf.capacity(), 0, "an idle reader keeps no buffer");
    }

    #[tokio::test]
    async fn writes_collect_until_a_flush_and_the_buffer_is_given_back() {
        let (tx, mut rx) = tokio::io::duplex(256 * 1024);
        let cork = Cork::default();
        let mut w = BurstIo::new(tx, cork.clone());
        cork.set(true);
        for _ in 0..100 {
            w.write_all(&[7u8; 300]).await.unwrap();
        }
        assert_eq!(w.out.len(), 30_000, "nothing written before the flush");
        w.flush().await.unwrap();
        cork.set(false);
        assert_eq!(w.out.capacity(), 0);
        w.write_all(b"uncorked").await.unwrap();
        assert!(w.out.is_empty(), "uncorked writes go straight through");
        let mut got = vec![0u8; 30_008];
        rx.read_exact(&mut got).await.unwrap();
        assert!(got[..30_000].iter().all(|b| *b == 7));
        assert_eq!(&got[30_000..], b"uncorked");
    }

    #[test]
    fn large_texts_go_out_in_pieces() {
        let text: String = (0..2500)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let frames: Vec<_> = text_frames(text.clone().into()).collect();
        assert_eq!(frames.len(), 2500usize.div_ceil(FRAGMENT));
        let mut back = Vec::new();
        for f in frames {
            let tungstenite::Message::Frame(f) = f else {
                panic!("not a raw frame")
            };
            back.extend_from_slice(f.payload());
        }
        assert_eq!(back, text.as_bytes());
        let small: Vec<_> = text_frames("hi".into()).collect();
        assert!(matches!(&small[..], [tungstenite::Message::Text(t)] if t.as_str() == "hi"));
    }
}
