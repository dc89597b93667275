//! Rooms in Redis: joining (role and room limit in `lua/join.lua`), leaving, and delivering a
//! frame to a member wherever its socket is (this instance's hub, or its owner's channel).

use super::hub::{parse_members, Blob, Bus, Cmd, Groups, Known, Member, Route};
use super::{fenced, unavailable, Inner};
use crate::engine::{Delivery, EngineResult, JoinResult, Joined, NewPeer};
use crate::peers::Queued;
use crate::protocol::{Frame, ServerMessage};

impl Inner {
    /// Publishes one bus message to an instance's channel; returns how many subscribers got it.
    async fn publish_to(&self, owner: &str, bus: &Bus) -> EngineResult<i64> {
        let payload = serde_json::to_string(bus).expect("bus messages serialize");
        let cmd = redis::cmd("PUBLISH")
            .arg(self.keys.channel(owner))
            .arg(payload)
            .clone();
        self.query::<i64>(&cmd).await
    }

    /// Publishes a room event to each remote owner's channel with the members it holds there.
    /// A failure is only logged: the room event has happened in Redis either way.
    async fn broadcast(
        &self,
        room: &str,
        groups: Groups,
        frame: &Frame,
        joined: Option<&Known>,
        left: Option<&str>,
    ) {
        for (owner, to) in groups {
            let bus = Bus::Deliver {
                room: room.to_owned(),
                to,
                frame: frame.to_string(),
                joined: joined.map(|k| (k.id.clone(), k.owner.clone())),
                joined_seq: joined.map(|k| k.seq),
                left: left.map(str::to_owned),
            };
            if let Err(e) = self.publish_to(&owner, &bus).await {
                tracing::warn!(%owner, error = %e, "publish to instance failed");
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
        Ok(rec.and_then(|rec| Member::known(to, &rec)))
    }

    /// Delivers `peer_left` for `peer` to the local `survivors` (the hub's room view decides
    /// who has to hear it) and returns the frame and the remote survivors by owner.
    pub(super) async fn tell_left(
        &self,
        room: &str,
        peer: &str,
        survivors: Vec<Known>,
    ) -> EngineResult<(Frame, Groups)> {
        let frame = ServerMessage::PeerLeft {
            peer_id: peer.to_owned(),
        }
        .to_frame();
        let groups = self
            .ask(|reply| Cmd::Left {
                room: room.to_owned(),
                peer: peer.to_owned(),
                recipients: survivors,
                frame: frame.clone(),
                reply,
            })
            .await?;
        Ok((frame, groups))
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
        let flat: Vec<String> = self.redis(inv.invoke_async(&mut cm)).await?;
        if flat.as_slice() == ["1"] {
            self.last_left(room).await;
        }
        if flat.first().map(String::as_str) == Some("1") {
            let survivors: Vec<Known> = parse_members(&flat[1..])
                .iter()
                .map(Member::to_known)
                .collect();
            if !survivors.is_empty() {
                let (frame, groups) = self.tell_left(room, peer, survivors).await?;
                self.broadcast(room, groups, &frame, None, Some(peer)).await;
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

    pub(super) async fn join(
        &self,
        room: &str,
        peer: NewPeer,
        max_peers: usize,
    ) -> EngineResult<JoinResult> {
        let inst = self.current();
        if !inst.registered {
            return Err(fenced("instance not registered"));
        }
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let k = &self.keys;
        // The intent first: if we die after the join below, a reaper finds the peer here.
        let cmd = redis::cmd("SADD")
            .arg(k.instance_peers(&inst.id))
            .arg(format!("{room}|{}", peer.id))
            .clone();
        self.query::<i64>(&cmd).await?;
        let blob = serde_json::to_string(&Blob {
            supported_transports: peer.supported_transports,
            preferred_transport: peer.preferred_transport,
            metadata: peer.metadata,
        })
        .expect("blob serializes");
        let role = match peer.role {
            crate::protocol::Role::Server => "server",
            crate::protocol::Role::Client => "client",
        };
        let mut cm = self.cm();
        let mut inv = self.scripts.join.prepare_invoke();
        inv.key(k.members(room))
            .key(k.seq(room))
            .key(k.server(room))
            .key(k.session(room))
            .key(k.tokens(room))
            .arg(&peer.id)
            .arg(&inst.id)
            .arg(blob)
            .arg(Self::ttl_ms(self.config.session_ttl))
            .arg(role)
            .arg(max_peers);
        let flat: Vec<String> = self.redis(inv.invoke_async(&mut cm)).await?;
        if flat.first().map(String::as_str) == Some("full") {
            let cmd = redis::cmd("SREM")
                .arg(k.instance_peers(&inst.id))
                .arg(format!("{room}|{}", peer.id))
                .clone();
            let _ = self.query::<i64>(&cmd).await;
            return Ok(JoinResult::Full);
        }
        let fresh = flat.first().map(String::as_str) == Some("1");
        if fresh {
            // The script refreshed the session; its tokens (other slots) follow. A failure only
            // shortens their life to what it was: not worth failing the join for.
            if let Err(e) = self.refresh_tokens(room).await {
                tracing::warn!(session = %room, error = %e, "token refresh failed");
            }
        }
        let members = parse_members(flat.get(1..).unwrap_or_default());
        let Some(me) = members.iter().find(|m| m.info.id == peer.id).cloned() else {
            return Err(unavailable("join script returned no record for the joiner"));
        };
        let frame = fresh.then(|| {
            ServerMessage::PeerJoined {
                peer: me.info.clone(),
            }
            .to_frame()
        });
        let owners: Vec<Known> = members.iter().map(Member::to_known).collect();
        // Frozen while the script ran: we may already be reaped, so the join must not stand
        // (the hub may not have been fenced yet to refuse it below).
        if !self.alive_locally() {
            let _ = self.leave_in_redis(room, &peer.id, &me.owner, true).await;
            return Err(fenced("instance may have been written off"));
        }
        let reply = self
            .ask(|reply| Cmd::Joined {
                room: room.to_owned(),
                peer: peer.id.clone(),
                owner: me.owner.clone(),
                members: owners,
                frame: frame.clone(),
                reply,
            })
            .await?;
        match reply {
            Ok(groups) => {
                if let Some(frame) = frame {
                    let me = me.to_known();
                    self.broadcast(room, groups, &frame, Some(&me), None).await;
                }
            }
            Err(()) => {
                // Fenced while joining: undo, since the old id's reaper may already be done.
                let _ = self.leave_in_redis(room, &peer.id, &me.owner, true).await;
                return Err(fenced("instance was fenced during the join"));
            }
        }
        Ok(JoinResult::Joined(Joined {
            me: me.info,
            peers: members.into_iter().map(|m| m.info).collect(),
            fresh,
        }))
    }

    pub(super) async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        let Some(m) = self
            .ask(|reply| Cmd::Leaving {
                room: room.to_owned(),
                peer: peer.to_owned(),
                reply,
            })
            .await?
        else {
            return Ok(());
        };
        let res = self.leave_in_redis(room, peer, &m.owner, true).await;
        if res.is_err() {
            let _ = self.hub.try_send(Cmd::RetryLeave {
                peer: peer.to_owned(),
                m,
            });
        }
        res
    }

    pub(super) async fn send(&self, room: &str, to: &str, frame: Frame) -> EngineResult<Delivery> {
        // The sender may have been reaped (and the room told it left): relay nothing for it.
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let route = self
            .ask(|reply| Cmd::Route {
                room: room.to_owned(),
                to: to.to_owned(),
                frame: frame.clone(),
                reply,
            })
            .await?;
        let (owner, looked_up) = match route {
            Route::Delivered => return Ok(Delivery::Sent),
            Route::Full => return Ok(Delivery::Full),
            Route::Absent => return Ok(Delivery::NotMember),
            Route::Remote(owner) => (owner, false),
            Route::Unknown { epoch } => {
                let Some(known) = self.lookup(room, to).await? else {
                    return Ok(Delivery::NotMember);
                };
                if known.owner == self.current().id {
                    // Ours by record but not (or no longer) recorded by the hub: a join in
                    // flight gets the frame, a peer on its way out does not.
                    let queued = self
                        .ask(|reply| Cmd::DeliverJoining {
                            room: room.to_owned(),
                            to: to.to_owned(),
                            frame: frame.clone(),
                            reply,
                        })
                        .await?;
                    return Ok(match queued {
                        Queued::Yes => Delivery::Sent,
                        Queued::Full => Delivery::Full,
                        Queued::Absent => Delivery::NotMember,
                    });
                }
                let _ = self.hub.try_send(Cmd::Learn {
                    room: room.to_owned(),
                    epoch,
                    known: known.clone(),
                });
                (known.owner, true)
            }
        };
        let bus = Bus::Deliver {
            room: room.to_owned(),
            to: vec![to.to_owned()],
            frame: frame.to_string(),
            joined: None,
            joined_seq: None,
            left: None,
        };
        // Again right before the PUBLISH: a freeze (SIGSTOP) during the awaits above can outlast
        // the deadline, and the room may have been told by now that this sender left.
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let receivers = self.publish_to(&owner, &bus).await.inspect_err(|e| {
            tracing::warn!(%owner, error = %e, "relay publish failed");
        })?;
        if receivers > 0 {
            return Ok(Delivery::Sent);
        }
        // Nobody listens on the owner's channel: its instance died (not reaped yet) or its
        // subscription is down. The frame is lost either way; the route goes.
        let _ = self.hub.try_send(Cmd::Forget {
            room: room.to_owned(),
            peer: to.to_owned(),
        });
        if !looked_up && self.lookup(room, to).await?.is_none() {
            return Ok(Delivery::NotMember);
        }
        Ok(Delivery::Unreachable)
    }
}
