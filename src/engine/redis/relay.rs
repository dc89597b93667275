//! The relay's pairing steps (`lua/relay_*.lua`) and its pieces between instances: a piece for
//! a relay socket of another instance is one PUBLISH to that instance's channel (`Bus::Relay`,
//! a client frame raw after the header), handed to the socket's inbox where it arrives.

use axum::body::Bytes;

use super::bus::{encode_raw, Bus};
use super::fenced;
use super::Inner;
use crate::engine::EngineResult;
use crate::relay::{Arrival, Endpoint, Limits, Mark, Piece, Side};

impl Inner {
    /// The pairing step; a full list is first cleared of the entries of instances that are no
    /// longer alive (killed while their sockets waited), so their dead entries cannot keep a
    /// live socket out until they age out.
    pub(super) async fn relay_arrive(
        &self,
        room: &str,
        side: Side,
        me: &Endpoint,
        limits: Limits,
    ) -> EngineResult<Arrival> {
        let arrival = self.arrive_once(room, side, me, limits).await?;
        if arrival != Arrival::Crowded || self.purge_dead(room).await? == 0 {
            return Ok(arrival);
        }
        self.arrive_once(room, side, me, limits).await
    }

    /// Removes the entries of the session's waiting lists whose instance is not in the live set;
    /// says how many went. One read of the live set, one of each list, and a removal per dead
    /// entry (by value: a concurrent change costs nothing but a missed removal). Two slots, the
    /// lists' and the live set's, so not one script.
    async fn purge_dead(&self, room: &str) -> EngineResult<usize> {
        let live = redis::cmd("ZRANGE")
            .arg(self.keys.alive())
            .arg(0)
            .arg(-1)
            .clone();
        let live: std::collections::HashSet<String> = self.query(&live).await?;
        let mut gone = 0;
        for list in ["late", "joiners", "hosts"] {
            let key = self.keys.relay(room, list);
            let range = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone();
            let entries: Vec<String> = self.query(&range).await?;
            for entry in entries {
                let owner = entry.split('|').nth(1).unwrap_or_default();
                if !live.contains(owner) {
                    let rem = redis::cmd("LREM").arg(&key).arg(0).arg(&entry).clone();
                    gone += self.query::<usize>(&rem).await?;
                }
            }
        }
        if gone > 0 {
            tracing::info!(
                session = room,
                gone,
                "relay entries of dead instances removed"
            );
        }
        Ok(gone)
    }

    async fn arrive_once(
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
            Piece::Text(t) => ("text", None, None, Some(Bytes::from(t))),
            Piece::Binary(b) => ("binary", None, None, Some(b)),
        };
        let bus = Bus::Relay {
            to: to.socket.clone(),
            p: kind.to_owned(),
            from,
            n,
        };
        let payload = encode_raw(&bus, body.as_deref().unwrap_or_default());
        let answer = self.outbox.publish(to.owner.clone(), payload).await?;
        Ok(answer.receivers().await? > 0)
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
        "text" => Piece::Text(body.try_into().ok()?),
        "binary" => Piece::Binary(body),
        _ => return None,
    })
}
