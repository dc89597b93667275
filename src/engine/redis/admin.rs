//! The Admin API in Redis (see `crate::engine::admin`): a session's room as stored (one atomic
//! read of its slot), closing it (`lua/close.lua`, then one message per owning instance over
//! the bus), and the live instances from `{instances}:alive`.

use std::collections::BTreeMap;

use super::bus::{encode, parse_members, publish_one, Bus};
use super::Inner;
use crate::engine::admin::{CloseOutcome, InstanceView, PeerView, SessionView};
use crate::engine::EngineResult;
use crate::peers::CloseReason;
use crate::protocol::unix_now;

/// Instances listed at most (a deployment has a handful).
const MAX_INSTANCES: isize = 1000;

impl Inner {
    pub(super) async fn admin_session(&self, id: &str) -> EngineResult<Option<SessionView>> {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        // MULTI/EXEC: one consistent read of the session's slot.
        pipe.atomic()
            .cmd("HMGET")
            .arg(k.session(id))
            .arg("created_at")
            .arg("closed_at")
            .cmd("PTTL")
            .arg(k.session(id))
            .cmd("HGETALL")
            .arg(k.members(id));
        let mut cm = self.cm();
        let (fields, pttl, records): (Vec<Option<u64>>, i64, BTreeMap<String, String>) = self
            .redis("admin_session", pipe.query_async(&mut cm))
            .await?;
        let Some(created_at) = fields.first().copied().flatten() else {
            return Ok(None);
        };
        let closed_at = fields.get(1).copied().flatten();
        let flat: Vec<String> = records.into_iter().flat_map(|(k, v)| [k, v]).collect();
        let peers = parse_members(&flat)
            .into_iter()
            .map(|m| PeerView {
                id: m.info.id,
                role: m.info.role,
                instance: m.owner,
                joined_at: m.info.joined_at,
                supported_transports: m.info.supported_transports,
                preferred_transport: m.info.preferred_transport,
            })
            .collect();
        Ok(Some(SessionView {
            id: id.to_owned(),
            created_at,
            expires_at: (pttl > 0).then(|| unix_now() + (pttl as u64) / 1000),
            closed_at,
            peers,
        }))
    }

    pub(super) async fn admin_close(&self, id: &str) -> EngineResult<CloseOutcome> {
        let k = &self.keys;
        let mut cm = self.cm();
        let mut inv = self.scripts.close.prepare_invoke();
        inv.key(k.session(id))
            .key(k.tokens(id))
            .key(k.members(id))
            .key(k.seq(id))
            .key(k.server(id))
            .key(k.code_failures(id))
            .arg(Self::ttl_ms(self.config.session_ttl));
        let flat: Vec<String> = self.redis("close", inv.invoke_async(&mut cm)).await?;
        let again = match flat.first().map(String::as_str) {
            Some("closed") => false,
            Some("again") => true,
            _ => return Ok(CloseOutcome::NotFound),
        };
        let n: usize = flat.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        let tokens = flat.get(2..2 + n).unwrap_or_default();
        let members: Vec<(&String, &String)> = flat
            .get(2 + n..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|p| (&p[0], &p[1]))
            .collect();

        // Members here are closed at once; each other owner gets one message.
        let me = self.current().id;
        let mut remote: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut local = Vec::new();
        for (peer, owner) in &members {
            if **owner == me {
                local.push((*peer).clone());
            } else {
                remote
                    .entry(owner.as_str())
                    .or_default()
                    .push((*peer).clone());
            }
        }
        self.router
            .close_room(id, &local, CloseReason::SessionClosed);
        let mut pipe = redis::pipe();
        for (owner, peers) in remote {
            let bus = Bus::Close {
                room: id.to_owned(),
                peers,
            };
            publish_one(&mut pipe, k, owner, &encode(&bus, None)).ignore();
        }
        // Tokens no longer resolve (their session has no code now); they go anyway.
        // One DEL each: every token is in its own slot (a cluster refuses a DEL across slots).
        for t in tokens {
            pipe.cmd("DEL").arg(k.token(t)).ignore();
        }
        if pipe.cmd_iter().next().is_some() {
            let mut cm = self.cm();
            if let Err(e) = self
                .redis("admin_close_tell", pipe.query_async::<()>(&mut cm))
                .await
            {
                // Closed in Redis whatever happens here; a repeated close tells them again.
                tracing::warn!(session = %id, error = %e, "close: telling the instances failed");
                return Err(e);
            }
        }
        let peers = members.len();
        Ok(if again {
            CloseOutcome::AlreadyClosed { peers }
        } else {
            CloseOutcome::Closed { peers }
        })
    }

    pub(super) async fn admin_instances(&self) -> EngineResult<Vec<InstanceView>> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("ZRANGE")
            .arg(self.keys.alive())
            .arg(0)
            .arg(MAX_INSTANCES - 1)
            .arg("WITHSCORES");
        let mut cm = self.cm();
        let ((secs, micros), alive): ((u64, u64), Vec<(String, f64)>) = self
            .redis("admin_instances", pipe.query_async(&mut cm))
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        let me = self.current().id;
        Ok(alive
            .into_iter()
            .map(|(id, beat)| InstanceView {
                this: id == me,
                heartbeat_age_ms: now_ms.saturating_sub(beat as u64),
                id,
            })
            .collect())
    }
}
