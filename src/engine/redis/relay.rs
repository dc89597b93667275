//! The relay's pairing steps (`lua/relay_*.lua`) and its pieces between instances: a piece for
//! a relay socket of another instance is one PUBLISH to that instance's channel (`Bus::Relay`,
//! a client frame raw after the header), handed to the socket's inbox where it arrives.

use axum::body::Bytes;
use tungstenite::Message;

use super::bus::{encode_raw, Bus};
use super::fenced;
use super::Inner;
use crate::engine::EngineResult;
use crate::relay::{Arrival, Endpoint, Limits, Mark, Piece, Side};

impl Inner {
    pub(super) async fn relay_arrive(
        &self,
        room: &str,
        side: Side,
        me: &Endpoint,
        limits: Limits,
    ) -> EngineResult<Arrival> {
        let mut cm = self.cm();
        let mut inv = self.scripts.relay_arrive.prepare_invoke();
        inv.key(self.keys.relay(room, "hosts"))
            .key(self.keys.relay(room, "joiners"))
            .key(self.keys.relay(room, "mark"))
            .key(self.keys.relay(room, "late"))
            .arg(match side {
                Side::Host => "host",
                Side::Joiner => "joiner",
            })
            .arg(me.to_string())
            .arg(Inner::ttl_ms(limits.fresh))
            .arg(limits.max_waiting)
            .arg(Inner::ttl_ms(self.config.session_ttl))
            .arg(Inner::ttl_ms(limits.stale));
        let v: Vec<String> = self
            .redis("relay_arrive", inv.invoke_async(&mut cm))
            .await?;
        Ok(match v.first().map(String::as_str) {
            Some("paired") => match v.get(1).and_then(|e| Endpoint::parse(e)) {
                Some(other) => Arrival::Paired(other),
                None => Arrival::Crowded,
            },
            Some("queued") => Arrival::Queued,
            Some("late") => Arrival::Late,
            _ => Arrival::Crowded,
        })
    }

    pub(super) async fn relay_forget(&self, room: &str, me: &Endpoint) -> EngineResult<()> {
        let mut cm = self.cm();
        let mut inv = self.scripts.relay_forget.prepare_invoke();
        inv.key(self.keys.relay(room, "hosts"))
            .key(self.keys.relay(room, "joiners"))
            .key(self.keys.relay(room, "late"))
            .arg(me.to_string());
        let _: i64 = self
            .redis("relay_forget", inv.invoke_async(&mut cm))
            .await?;
        Ok(())
    }

    pub(super) async fn relay_mark(&self, room: &str) -> EngineResult<Mark> {
        let mut cm = self.cm();
        let mut inv = self.scripts.relay_mark.prepare_invoke();
        inv.key(self.keys.relay(room, "mark"))
            .arg(Inner::ttl_ms(self.config.session_ttl));
        let (set, prev): (u64, u64) = self.redis("relay_mark", inv.invoke_async(&mut cm)).await?;
        Ok(Mark { set, prev })
    }

    pub(super) async fn relay_unmark(&self, room: &str, mark: Mark) -> EngineResult<()> {
        let mut cm = self.cm();
        let mut inv = self.scripts.relay_unmark.prepare_invoke();
        inv.key(self.keys.relay(room, "mark"))
            .arg(mark.set)
            .arg(mark.prev)
            .arg(Inner::ttl_ms(self.config.session_ttl));
        let _: i64 = self
            .redis("relay_unmark", inv.invoke_async(&mut cm))
            .await?;
        Ok(())
    }

    pub(super) async fn relay_post(&self, to: &Endpoint, piece: Piece) -> EngineResult<bool> {
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let me = |from: Endpoint| Some(from.to_string());
        let (kind, from, n, body): (&str, Option<String>, Option<u32>, Option<Bytes>) = match piece
        {
            Piece::Offer { from } => ("offer", me(from), None, None),
            Piece::Accepted { from } => ("accepted", me(from), None, None),
            Piece::Declined => ("declined", None, None, None),
            Piece::Ack(n) => ("ack", None, Some(n), None),
            Piece::End => ("end", None, None, None),
            Piece::Frame(Message::Text(t)) => ("text", None, None, Some(Bytes::from(t))),
            Piece::Frame(Message::Binary(b)) => ("binary", None, None, Some(b)),
            Piece::Frame(_) => return Ok(true),
        };
        let bus = Bus::Relay {
            to: to.socket.clone(),
            p: kind.to_owned(),
            from,
            n,
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.keys.channel(&to.owner))
            .arg(encode_raw(&bus, body.as_deref().unwrap_or_default()));
        let receivers: i64 = self.query(&cmd).await?;
        Ok(receivers > 0)
    }
}

/// The piece of a `Bus::Relay` message; `None` when it does not parse.
pub(super) fn piece(p: &str, from: Option<&str>, n: Option<u32>, body: Bytes) -> Option<Piece> {
    let from = || from.and_then(Endpoint::parse);
    Some(match p {
        "offer" => Piece::Offer { from: from()? },
        "accepted" => Piece::Accepted { from: from()? },
        "declined" => Piece::Declined,
        "ack" => Piece::Ack(n?),
        "end" => Piece::End,
        "text" => Piece::Frame(Message::Text(body.try_into().ok()?)),
        "binary" => Piece::Frame(Message::Binary(body)),
        _ => return None,
    })
}
