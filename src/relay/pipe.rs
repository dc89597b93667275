//! One side of a relay pair: frames from its socket to the partner, the partner's frames to
//! its socket, unchanged (opcode, bytes, order).
//!
//! Flow control is by credit, the same locally and across instances: a side sends a frame
//! only while fewer than [`WINDOW`] of its frames are unacknowledged, and the partner's side
//! acknowledges frames once written to its socket. A slow reader therefore stops its sender's
//! socket from being read (TCP pushes back to the sending client) and no frame is dropped; the
//! inbox ([`super::locals`]) can always take a window. Each side's sending rate is capped
//! (slowed, not cut) and a session relays for `--relay-max-duration` at most.

use std::num::NonZeroU32;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::time::Instant;
use tungstenite::Message;

use super::locals::Inbox;
use super::{post, Endpoint, Piece, ACK_EVERY, MAX_MESSAGE, WINDOW};
use crate::engine::{Engine, SessionRecord};
use crate::http::App;
use crate::peers::{CloseReason, PeerQueue};
use crate::shutdown::Phase;
use crate::ws::Socket;

type Sink = SplitSink<Socket, Message>;
type Stream = SplitStream<Socket>;
type Limiter = governor::DefaultDirectRateLimiter;

/// How a relay socket is closed: the close frame, if any.
pub(super) struct Close {
    pub(super) frame: Option<(u16, &'static str)>,
}

impl Close {
    pub(super) fn send(code: u16, reason: &'static str) -> Self {
        Close {
            frame: Some((code, reason)),
        }
    }

    fn silent() -> Self {
        Close { frame: None }
    }
}

pub(super) struct Pipe<'a, E: Engine> {
    app: &'a App<E>,
    partner: &'a Endpoint,
    /// Frames this side may still send before the partner acknowledges some.
    credit: u32,
    /// Frames written to this socket, not yet acknowledged to the partner.
    unacked: u32,
    limiter: Limiter,
    /// When the session's relay time is over.
    ends: Instant,
    room: &'a str,
}

impl<'a, E: Engine> Pipe<'a, E> {
    pub(super) fn new(
        app: &'a App<E>,
        session: &'a SessionRecord,
        partner: &'a Endpoint,
        left: Duration,
        credit: u32,
    ) -> Self {
        let relay = &app.config.relay;
        let rate = NonZeroU32::new(relay.bytes_per_second.max(1)).expect("non-zero");
        let burst = NonZeroU32::new(relay.byte_burst.max(MAX_MESSAGE as u32)).expect("non-zero");
        Pipe {
            app,
            partner,
            credit,
            unacked: 0,
            limiter: Limiter::direct(governor::Quota::per_second(rate).allow_burst(burst)),
            ends: Instant::now() + left,
            room: &session.id,
        }
    }

    /// Forwards until either side ends; says how to close this socket. The partner is told
    /// `End` unless it ended first.
    pub(super) async fn run(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut PeerQueue,
        inbox: &mut Inbox,
    ) -> Close {
        let (close, tell) = self.forward(sink, stream, queue, inbox).await;
        if tell {
            let _ = post(&self.app.engine, self.partner, Piece::End).await;
        }
        crate::metrics::relay_event("ended");
        close
    }

    async fn forward(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        queue: &mut PeerQueue,
        inbox: &mut Inbox,
    ) -> (Close, bool) {
        let config = self.app.config.clone();
        let mut ping = crate::ws::ping_interval(config.ping_interval.min(config.idle_timeout));
        let mut last_seen = Instant::now();
        let closing = self.app.shutdown.reached(Phase::Closing);
        tokio::pin!(closing);
        let ends = tokio::time::sleep_until(self.ends);
        tokio::pin!(ends);
        loop {
            tokio::select! {
                piece = inbox.rx.recv() => match piece {
                    Some(Piece::Text(t)) => if !self.write(sink, Message::Text(t), inbox).await {
                        return (Close::silent(), true);
                    },
                    Some(Piece::Binary(b)) => if !self.write(sink, Message::Binary(b), inbox).await {
                        return (Close::silent(), true);
                    },
                    Some(Piece::Ack(n)) => self.credit = (self.credit + n).min(WINDOW),
                    Some(Piece::End) => return (self.partner_gone(), false),
                    // A host socket this joiner gave up on accepted it late: not the partner.
                    Some(Piece::Accepted { from }) if from != *self.partner => {
                        let _ = post(&self.app.engine, &from, Piece::End).await;
                    }
                    Some(_) => {}
                    // Overrun: the partner sent beyond its credit.
                    None => return (Close::send(1011, "relay overrun"), true),
                },
                msg = stream.next(), if self.credit > 0 => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        return (Close::silent(), true);
                    }
                    Some(Ok(msg)) => {
                        last_seen = Instant::now();
                        let n = msg.len();
                        let Some(piece) = Piece::frame(msg) else {
                            // A ping (tungstenite queued the pong: send it now) or a pong.
                            let _ = tokio::time::timeout(config.write_timeout, sink.flush()).await;
                            continue;
                        };
                        self.pace(n).await;
                        self.credit -= 1;
                        let delivered = post(&self.app.engine, self.partner, piece)
                            .await
                            .unwrap_or(false);
                        if !delivered {
                            crate::metrics::relay_event("partner_unreachable");
                            return (Close::send(1011, "the other side is unreachable"), false);
                        }
                    }
                },
                frame = queue.recv() => match frame {
                    // Room events: only the partner's departure matters (it left, or its
                    // instance died and was reaped).
                    Some(frame) => if left(frame.as_bytes(), &self.partner.socket) {
                        return (self.partner_gone(), false);
                    },
                    None => {
                        let reason = queue.close_reason().unwrap_or(CloseReason::GoingAway);
                        let (code, why) = reason.close_frame();
                        crate::metrics::disconnected(reason.metric());
                        return (Close::send(code, why), true);
                    }
                },
                _ = ping.tick() => {
                    if last_seen.elapsed() > config.idle_timeout {
                        crate::metrics::disconnected("idle_timeout");
                        return (Close::send(1001, "idle timeout"), true);
                    }
                    let ping = Message::Ping(Default::default());
                    if !matches!(tokio::time::timeout(config.write_timeout, sink.send(ping)).await, Ok(Ok(()))) {
                        return (Close::silent(), true);
                    }
                }
                _ = &mut ends => {
                    crate::metrics::relay_event("limit_duration");
                    tracing::info!(session = %self.room, "relay time limit reached");
                    return (Close::send(1008, "relay time limit reached"), true);
                }
                _ = &mut closing => {
                    return (Close::send(1001, "server shutting down"), true);
                }
            }
        }
    }

    /// Writes one of the partner's frames to this socket and acknowledges written frames in
    /// batches (or at once when nothing else waits); `false` when the socket is gone.
    async fn write(&mut self, sink: &mut Sink, msg: Message, inbox: &Inbox) -> bool {
        let n = msg.len();
        let timeout = self.app.config.write_timeout;
        if !matches!(
            tokio::time::timeout(timeout, sink.send(msg)).await,
            Ok(Ok(()))
        ) {
            return false;
        }
        crate::metrics::relay_bytes(n);
        self.unacked += 1;
        if self.unacked >= ACK_EVERY || inbox.rx.is_empty() {
            let n = std::mem::take(&mut self.unacked);
            let _ = post(&self.app.engine, self.partner, Piece::Ack(n)).await;
        }
        true
    }

    /// The partner ended: at the session's time limit (its side noticed first) this side is
    /// closed for the same reason.
    fn partner_gone(&self) -> Close {
        if Instant::now() >= self.ends {
            return Close::send(1008, "relay time limit reached");
        }
        Close::send(1000, "the other side left")
    }

    /// Waits until this side may send `n` more bytes (a faster sender is slowed, not cut).
    async fn pace(&self, n: usize) {
        let Some(n) = NonZeroU32::new(n.min(MAX_MESSAGE) as u32) else {
            return;
        };
        if let Ok(Ok(())) = self.limiter.check_n(n) {
            return;
        }
        crate::metrics::relay_event("paced");
        let _ = self.limiter.until_n_ready(n).await;
    }
}

/// Whether a room event is `peer_left` for `peer`.
fn left(frame: &[u8], peer: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(default)]
        peer_id: Option<&'a str>,
    }
    serde_json::from_slice::<Event>(frame)
        .is_ok_and(|e| e.kind == "peer_left" && e.peer_id == Some(peer))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_partners_departure_ends_the_pair() {
        assert!(super::left(br#"{"type":"peer_left","peer_id":"p"}"#, "p"));
        assert!(!super::left(br#"{"type":"peer_left","peer_id":"q"}"#, "p"));
        assert!(!super::left(
            br#"{"type":"peer_joined","peer":{"id":"p"}}"#,
            "p"
        ));
        assert!(!super::left(b"garbage", "p"));
    }
}
