//! Rooms in Redis: room events, leaving, and delivering a frame to a member wherever its
//! socket is (this instance's router, or its owner's channel). Joining is `super::join`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::bus::{encode, known, parse_members, Bus, Deliver};
use super::outbox::{Failed, Relay};
use super::{fenced, Inner};
use crate::engine::{Delivery, EngineResult};
use crate::peers::Queued;
use crate::protocol::{Frame, ServerMessage};
use crate::router::{Groups, Known, Member, Membership, Route};

impl Inner {
    /// A room event's bus message for each remote owner: (owner, payload).
    pub(super) fn room_event(
        &self,
        room: &str,
        groups: Groups,
        frame: &Frame,
        joined: Option<&Known>,
        left: Option<&str>,
    ) -> Vec<(String, Vec<u8>)> {
        groups
            .into_iter()
            .map(|(owner, to)| {
                let bus = Bus::Deliver(Deliver {
                    room,
                    to: to.iter().map(String::as_str).collect(),
                    joined: joined.map(|k| (k.id.as_str(), k.owner.as_str())),
                    joined_seq: joined.map(|k| k.seq),
                    left,
                    from: None,
                });
                (owner, encode(&bus, Some(frame)))
            })
            .collect()
    }

    /// Queues a room event's messages (see [`Inner::room_event`]) in the outbox, behind
    /// whatever this instance sent before (the leaver's relays go out ahead of its `peer_left`)
    /// and ahead of what the joiner sends next; the join or leave goes on without waiting for
    /// the publish. A failure is only logged (here when the outbox is full, else by its
    /// publisher): the room event has happened in Redis.
    pub(super) async fn broadcast(&self, messages: Vec<(String, Vec<u8>)>) {
        for (owner, payload) in messages {
            if let Err(e) = self.outbox.event(owner, payload).await {
                tracing::warn!(error = %e, "room event not published");
            }
        }
    }

    /// `to`'s member record in `room`: its owner and seq.
    async fn lookup(&self, room: &str, to: &str) -> EngineResult<Option<Known>> {
        let cmd = redis::cmd("HGET")
            .arg(self.keys.members(room))
            .arg(to)
            .clone();
        let rec = self.query::<Option<String>>(&cmd).await?;
        Ok(rec.and_then(|rec| known(to, &rec)))
    }

    /// Delivers `peer_left` for `peer` to the local `survivors` (the router's room view
    /// decides who has to hear it) and returns the frame and the remote survivors by owner.
    pub(super) fn tell_left(
        &self,
        room: &str,
        peer: &str,
        survivors: Vec<Known>,
    ) -> (Frame, Groups) {
        let frame = ServerMessage::PeerLeft {
            peer_id: peer.to_owned(),
        }
        .to_frame();
        let groups = self.router.left(room, peer, survivors, &frame);
        (frame, groups)
    }

    /// `lua/leave.lua` for `peer`, owned by `owner`, in `room` (a room this empties restarts
    /// its session's countdown in the script).
    pub(super) fn leave_invocation(
        &self,
        room: &str,
        peer: &str,
        owner: &str,
    ) -> redis::ScriptInvocation<'_> {
        let k = &self.keys;
        let mut inv = self.scripts.leave.prepare_invoke();
        inv.key(k.members(room))
            .key(k.server(room))
            .key(k.offers(room, peer))
            .key(k.seq(room))
            .key(k.session(room))
            .key(k.tokens(room))
            .arg(peer)
            .arg(owner)
            .arg(Self::ttl_ms(self.config.session_ttl));
        inv
    }

    /// Removes `peer` (owned by `owner`) from `room` in Redis and tells the survivors. With
    /// `srem`, also drops the owner's record of it (the reaper removes its batch at once).
    pub(crate) async fn leave_in_redis(
        &self,
        room: &str,
        peer: &str,
        owner: &str,
        srem: bool,
    ) -> EngineResult<()> {
        let k = &self.keys;
        let mut cm = self.cm();
        let inv = self.leave_invocation(room, peer, owner);
        let flat: Vec<String> = self.redis("leave", inv.invoke_async(&mut cm)).await?;
        if flat.as_slice() == ["1"] {
            self.last_left(room).await;
        }
        if flat.first().map(String::as_str) == Some("1") {
            let survivors: Vec<Known> = parse_members(&flat[1..])
                .iter()
                .map(Member::to_known)
                .collect();
            if !survivors.is_empty() {
                let (frame, groups) = self.tell_left(room, peer, survivors);
                let messages = self.room_event(room, groups, &frame, None, Some(peer));
                self.broadcast(messages).await;
            }
        }
        if srem {
            let cmd = redis::cmd("SREM")
                .arg(k.instance_peers(owner))
                .arg(format!("{room}|{peer}"))
                .clone();
            self.query::<i64>(&cmd).await?;
        }
        Ok(())
    }

    pub(super) async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        match self.router.leaving(room, peer) {
            Some(m) => self.leave_member(peer, m).await,
            None => Ok(()),
        }
    }

    /// Leaves in Redis for a local membership the router has ended; a failure is retried by
    /// the liveness task.
    pub(super) async fn leave_member(&self, peer: &str, m: Membership) -> EngineResult<()> {
        let res = self.leave_in_redis(&m.room, peer, &m.owner, true).await;
        if res.is_err() {
            self.retry_leave(peer, m);
        }
        res
    }

    /// Delivers a relayed frame from local `from` to member `to` of `room`: to a local socket
    /// at once, to a remote one through the outbox to its owner's channel (a failure is told
    /// later; see [`crate::engine::Engine::send`]).
    pub(super) async fn send(
        self: &Arc<Self>,
        room: &str,
        from: &str,
        to: &str,
        frame: Frame,
    ) -> EngineResult<Delivery> {
        // The sender may have been reaped (and the room told it left): relay nothing for it.
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let (owner, looked_up) = match self.router.relay(room, to, &frame).await {
            Route::Delivered => return Ok(Delivery::Sent),
            Route::Full(_) => return Ok(Delivery::Full),
            Route::Absent => return Ok(Delivery::NotMember),
            Route::Remote(owner) => (owner, false),
            Route::Unknown { epoch } => {
                let Some(known) = self.lookup(room, to).await? else {
                    return Ok(Delivery::NotMember);
                };
                if known.owner == self.current().id {
                    // Ours by record but not (or no longer) recorded by the router: a join in
                    // flight gets the frame, a peer on its way out does not.
                    return Ok(match self.router.deliver_member(room, to, &frame) {
                        Queued::Yes | Queued::Hold(_) => Delivery::Sent,
                        Queued::Full(_) => Delivery::Full,
                        Queued::Absent => Delivery::NotMember,
                    });
                }
                self.router.learn(room, epoch, &known);
                (known.owner, true)
            }
        };
        let stall = self.stall_send.swap(0, Ordering::AcqRel);
        if stall > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(stall)).await;
        }
        // Again right before the PUBLISH: a freeze (SIGSTOP) during the awaits above can outlast
        // the deadline, and the room may have been told by now that this sender left.
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let instance = self.current().id;
        let bus = Bus::Deliver(Deliver {
            room,
            to: vec![to],
            joined: None,
            joined_seq: None,
            left: None,
            from: Some((from, &instance)),
        });
        // Queued in the socket task, before its next frame is read: a sender's relays (and its
        // leave's room event) leave this instance in order.
        let relay = Relay {
            room: room.to_owned(),
            sender: from.to_owned(),
            to: to.to_owned(),
            looked_up,
            _outstanding: self.router.outstanding(from),
        };
        self.outbox
            .relay(owner, encode(&bus, Some(&frame)), relay)
            .await?;
        Ok(Delivery::Published)
    }

    /// Tells the senders of relays that were not delivered (see [`super::outbox`]), each with
    /// an `error` in its own queue, as a refusal on the recipient's instance is told. A relay
    /// nobody heard (the owner died and is not reaped yet, or its subscription is down) loses
    /// its cached route; unless its record was just read, it is read again (one pipeline for
    /// all), so the sender hears `not in this session` if it is gone, else `unreachable`.
    pub(super) async fn undelivered(&self, failed: Vec<Failed>) {
        for (r, _) in failed.iter().filter(|(_, e)| e.is_none()) {
            self.router.forget(&r.room, &r.to);
        }
        let mut pipe = redis::pipe();
        let unread: Vec<usize> = (0..failed.len())
            .filter(|&i| failed[i].1.is_none() && !failed[i].0.looked_up)
            .collect();
        for &i in &unread {
            pipe.cmd("HEXISTS")
                .arg(self.keys.members(&failed[i].0.room))
                .arg(&failed[i].0.to);
        }
        let mut gone = vec![false; failed.len()];
        if !unread.is_empty() {
            let mut cm = self.cm();
            // Unread when Redis does not answer: `unreachable` is the truth then.
            if let Ok(exists) = self
                .redis("HEXISTS", pipe.query_async::<Vec<bool>>(&mut cm))
                .await
            {
                for (&i, exists) in unread.iter().zip(exists) {
                    gone[i] = !exists;
                }
            }
        }
        for ((r, error), gone) in failed.into_iter().zip(gone) {
            let (reason, message) = match error {
                Some(e) => {
                    tracing::info!(peer = %r.sender, kind = e.kind(), cause = e.cause(), "relay failed");
                    ("publish_failed", e.client_message().to_owned())
                }
                None if gone => Delivery::NotMember.refusal(&r.to).expect("a refusal"),
                None => Delivery::Unreachable.refusal(&r.to).expect("a refusal"),
            };
            crate::metrics::relay_error(reason);
            let frame = ServerMessage::error(message).to_frame();
            self.router.tell_sender(&r.room, &r.sender, &frame);
        }
    }
}
