//! Joining a room in Redis: the intent and `lua/join.lua` in one round trip (the role and the
//! room limit are the script's), or `lua/code_join.lua` with the code checked in the same step
//! and the id read as a token alongside; then the members told, through the router and the
//! outbox.

use redis::RedisResult;

use super::bus::{parse_members, Blob};
use super::store::{code_check_reply, session_record, token_fields, SESSION_FIELDS, TOKEN_FIELDS};
use super::{fenced, unavailable, Inner};
use crate::engine::{Access, CodeCheck, EngineResult, Entry, JoinResult, Joined, NewPeer};
use crate::protocol::ServerMessage;
use crate::router::{Known, Member};

/// The join script's reply as a pipeline answers it.
type JoinReply = RedisResult<Vec<String>>;
/// A token's fields as a pipeline answers them (see `store::TOKEN_FIELDS`).
type TokenReply = RedisResult<Vec<Option<String>>>;

impl Inner {
    pub(super) async fn join(
        &self,
        room: &str,
        peer: NewPeer,
        max_peers: usize,
        entry: Entry<'_>,
    ) -> EngineResult<JoinResult> {
        let inst = self.current();
        if !inst.registered {
            return Err(fenced("instance not registered"));
        }
        if !self.alive_locally() {
            return Err(fenced("instance may have been written off"));
        }
        let k = &self.keys;
        let blob = serde_json::to_string(&Blob {
            supported_transports: peer.supported_transports,
            preferred_transport: peer.preferred_transport,
            metadata: peer.metadata,
        })
        .expect("blob serializes");
        let role = peer.role.as_str();
        // With a code, `lua/code_join.lua`: the code's check first, in the same step.
        let mut inv = match entry {
            Entry::Admitted => {
                let mut inv = self.scripts.join.prepare_invoke();
                inv.key(k.members(room))
                    .key(k.seq(room))
                    .key(k.server(room))
                    .key(k.session(room));
                inv
            }
            Entry::Code { client, digest } => {
                let mut inv = self.scripts.code_join.prepare_invoke();
                self.code_check_args(&mut inv, room, client, digest);
                inv.key(k.members(room))
                    .key(k.seq(room))
                    .key(k.server(room));
                inv
            }
        };
        inv.key(k.tokens(room))
            .arg(&peer.id)
            .arg(&inst.id)
            .arg(blob)
            .arg(Self::ttl_ms(self.config.session_ttl))
            .arg(role)
            .arg(max_peers);
        // The intent (so a reaper finds the peer if we die after the join) and the join in one
        // round trip: one node runs them in order; on a cluster (two slots, maybe two nodes)
        // an intent that failed while the join went is undone below.
        let intent = format!("{room}|{}", peer.id);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(k.instance_peers(&inst.id))
            .arg(&intent);
        pipe.invoke_script(&inv);
        pipe.ignore_errors();
        let mut cm = self.cm();
        let (what, added, reply, token) = match entry {
            Entry::Admitted => {
                let (added, reply): (RedisResult<i64>, JoinReply) =
                    self.redis("join", pipe.query_async(&mut cm)).await?;
                ("join", added, reply, None)
            }
            // With a code, the id as a token too, in the same round trip (`JoinResult::Token`).
            Entry::Code { .. } => {
                pipe.cmd("HMGET").arg(k.token(room)).arg(&TOKEN_FIELDS[..]);
                let (added, reply, token): (RedisResult<i64>, JoinReply, TokenReply) =
                    self.redis("code_join", pipe.query_async(&mut cm)).await?;
                ("code_join", added, reply, Some(token))
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            // Not loaded (a restart, SCRIPT FLUSH): the invocation loads it and runs it again.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                added.as_ref().map_err(|e| self.store_error(e))?;
                self.redis(what, inv.invoke_async(&mut cm)).await?
            }
            Err(e) => return Err(self.store_error(&e)),
        };
        // code_join's reply is code_check's, then join's when the code let the peer in.
        let (flat, refused) = match entry {
            Entry::Admitted => (&reply[..], None),
            Entry::Code { digest, .. } => match code_check_reply(room, digest, &reply) {
                CodeCheck::Correct(s) if s.relay => (&[][..], Some(JoinResult::RelayOnly)),
                CodeCheck::Correct(_) => (reply.get(3..).unwrap_or_default(), None),
                CodeCheck::NotFound => {
                    let token = token.and_then(Result::ok).unwrap_or_default();
                    return self.token_instead(&inst.id, &intent, &token).await;
                }
                refused => (&[][..], Some(JoinResult::Refused(refused))),
            },
        };
        let refused = refused.or(match flat.first().map(String::as_str) {
            Some("full") => Some(JoinResult::Full),
            Some("closed") => Some(JoinResult::Closed),
            _ => None,
        });
        if let Some(refused) = refused {
            let cmd = redis::cmd("SREM")
                .arg(k.instance_peers(&inst.id))
                .arg(&intent)
                .clone();
            let _ = self.query::<i64>(&cmd).await;
            return Ok(refused);
        }
        let fresh = flat.first().map(String::as_str) == Some("1");
        if let Err(e) = added {
            // Joined with no intent: a death of this instance would leave a ghost member.
            if fresh {
                let _ = self.leave_in_redis(room, &peer.id, &inst.id, false).await;
            }
            return Err(self.store_error(&e));
        }
        // The session's tokens, listed for the room's first member only, then the members.
        let listed = flat
            .get(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let (tokens, members) = flat
            .get(2..)
            .unwrap_or_default()
            .split_at_checked(listed)
            .unwrap_or_default();
        let members = parse_members(members);
        if !tokens.is_empty() {
            // The script refreshed the session; its tokens (other slots) follow. Only for the
            // first member: from then on the refresher renews them (`super::refresh`). A
            // failure only shortens their life to what it was: not worth failing the join for.
            let ttl = Self::ttl_ms(self.config.session_ttl);
            if let Err(e) = self.expire_tokens(tokens, ttl).await {
                tracing::warn!(session = %room, error = %e, "token refresh failed");
            }
        }
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
        // (the router may not have been fenced yet to refuse it below).
        if !self.alive_locally() {
            let _ = self.leave_in_redis(room, &peer.id, &me.owner, true).await;
            return Err(fenced("instance may have been written off"));
        }
        match self
            .router
            .joined(room, &peer.id, &me.owner, owners, frame.clone())
        {
            Some(groups) => {
                if let Some(frame) = frame {
                    let me = me.to_known();
                    let messages = self.room_event(room, groups, &frame, Some(&me), None);
                    self.broadcast(messages).await;
                }
            }
            None => {
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

    /// A code join whose id is no session's: the intent undone and, for a token's id, its
    /// session read in the same round trip.
    async fn token_instead(
        &self,
        owner: &str,
        intent: &str,
        token: &[Option<String>],
    ) -> EngineResult<JoinResult> {
        let srem = redis::cmd("SREM")
            .arg(self.keys.instance_peers(owner))
            .arg(intent)
            .clone();
        let Some((session, grant, peer)) = token_fields(token) else {
            let _ = self.query::<i64>(&srem).await;
            return Ok(JoinResult::Refused(CodeCheck::NotFound));
        };
        let mut pipe = redis::pipe();
        pipe.add_command(srem);
        pipe.cmd("HMGET")
            .arg(self.keys.session(session))
            .arg(&SESSION_FIELDS[..]);
        pipe.ignore_errors();
        let mut cm = self.cm();
        let (_, fields): (RedisResult<i64>, RedisResult<Vec<Option<String>>>) =
            self.redis("HMGET", pipe.query_async(&mut cm)).await?;
        let fields = fields.map_err(|e| self.store_error(&e))?;
        Ok(match session_record(session, &fields) {
            Some(session) => JoinResult::Token(Access {
                session,
                grant,
                peer,
            }),
            None => JoinResult::Refused(CodeCheck::NotFound),
        })
    }
}
