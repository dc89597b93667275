//! The WebSocket handshake (RFC 6455 §4.2) and the socket under tungstenite.
//!
//! Done here rather than by axum's `WebSocketUpgrade`, which hides the upgraded connection:
//! the socket goes to tungstenite through a [`BurstReader`], so an idle socket keeps a 1 KiB
//! read buffer and a burst is still read from the kernel in 16 KiB gulps (tungstenite reads at
//! most its buffer's size per call: with 1 KiB alone, one `recv` per three signals).

use std::future::Future;
use std::pin::Pin;
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
pub type Socket = WebSocketStream<BurstReader<TokioIo<hyper::upgrade::Upgraded>>>;

/// What the kernel is asked for at once when tungstenite wants less than this.
const GULP: usize = 16 * 1024;

/// A valid upgrade request, not answered yet.
pub struct Handshake {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

fn refuse(status: StatusCode, why: &str) -> Response {
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
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let io = BurstReader::new(TokioIo::new(upgraded));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            serve(socket).await;
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
/// reads. The gulp buffer exists only while it holds bytes, so an idle socket keeps none.
pub struct BurstReader<T> {
    io: T,
    buf: Vec<u8>,
    pos: usize,
    /// An error the gulp read met, reported once the gulp is served.
    err: Option<std::io::Error>,
}

impl<T> BurstReader<T> {
    fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            pos: 0,
            err: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BurstReader<T> {
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

impl<T: AsyncWrite + Unpin> AsyncWrite for BurstReader<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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
        let mut r = BurstReader::new(rx);
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
}
