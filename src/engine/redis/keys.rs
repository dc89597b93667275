//! The Redis key schema (see `docs/architecture.md`).
//!
//! Every key of one session carries the hash tag `{<session id>}` so each script touches a single
//! slot (Redis Cluster later). Instance-level keys carry their own tags. Ids were validated by the
//! caller (`protocol::valid_id`: no `{`, `}`, `:` or `|`), so they cannot alias other keys.

/// Builds every key and channel name of one deployment from its prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
    /// On a Redis Cluster: an instance's bus is a shard channel (`SPUBLISH` reaches only the
    /// node owning its slot; a plain `PUBLISH` would be broadcast to every node).
    sharded: bool,
}

impl Keys {
    pub(crate) fn new(prefix: &str, sharded: bool) -> Self {
        Self {
            prefix: prefix.to_owned(),
            sharded,
        }
    }

    /// Whether instances talk over shard channels (a cluster), without legacy channels.
    pub(crate) fn sharded(&self) -> bool {
        self.sharded
    }

    /// The command publishing to a bus channel.
    pub(crate) fn publish(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    fn session_key(&self, s: &str, what: &str) -> String {
        format!("{}:{{{s}}}:{what}", self.prefix)
    }

    /// Hash: created_at, hash (the code's HMAC), minted (tokens so far).
    pub(crate) fn session(&self, s: &str) -> String {
        self.session_key(s, "session")
    }

    /// Hash in the token's own slot: s (its session), g (grant), p (its peer, once bound).
    pub(crate) fn token(&self, t: &str) -> String {
        self.session_key(t, "token")
    }

    /// Set of the session's tokens, so a refresh of the session refreshes them too.
    pub(crate) fn tokens(&self, s: &str) -> String {
        self.session_key(s, "tokens")
    }

    /// The relay's waiting lists and mark: `relay:hosts`, `relay:joiners`, `relay:mark`.
    pub(crate) fn relay(&self, s: &str, what: &str) -> String {
        self.session_key(s, &format!("relay:{what}"))
    }

    /// Sorted set of wrong-code times of one session, from everywhere.
    pub(crate) fn code_failures(&self, s: &str) -> String {
        self.session_key(s, "codefail")
    }

    /// Sorted set of wrong-code times of one session from one client address.
    pub(crate) fn client_code_failures(&self, s: &str, client: &str) -> String {
        self.session_key(s, &format!("codefail@{client}"))
    }

    /// Fixed-window counter `what` (e.g. `reg@1.2.3.4`), in its own slot.
    pub(crate) fn rate(&self, what: &str) -> String {
        format!("{}:{{rate:{what}}}", self.prefix)
    }

    /// List of "<ms>|<payload>" offers for `peer`.
    pub(crate) fn offers(&self, s: &str, peer: &str) -> String {
        self.session_key(s, &format!("offers:{peer}"))
    }

    /// String: the answer of one handshake for peer `to`.
    pub(crate) fn answer(&self, s: &str, to: &str, handshake: &str) -> String {
        self.session_key(s, &format!("answer:{to}:{handshake}"))
    }

    /// Sorted set: handshakes `from` has answered to `to` within the mailbox ttl (its quota).
    pub(crate) fn answers_from(&self, s: &str, to: &str, from: &str) -> String {
        self.session_key(s, &format!("answers:{to}:{from}"))
    }

    /// Hash: peer -> "seq|role|joined_at|owner|blob".
    pub(crate) fn members(&self, s: &str) -> String {
        self.session_key(s, "peers")
    }

    /// Counter ordering the members by join.
    pub(crate) fn seq(&self, s: &str) -> String {
        self.session_key(s, "seq")
    }

    /// String: the room's `server` peer while it is a member.
    pub(crate) fn server(&self, s: &str) -> String {
        self.session_key(s, "server")
    }

    /// Sorted set: live instance -> last heartbeat (ms, Redis time).
    pub(crate) fn alive(&self) -> String {
        format!("{}:{{instances}}:alive", self.prefix)
    }

    /// Sorted set: written-off instance -> end of its reaper's lease (ms; 0 = unclaimed).
    pub(crate) fn dead(&self) -> String {
        format!("{}:{{instances}}:dead", self.prefix)
    }

    /// Hash: written-off instance -> reaper holding the claim.
    pub(crate) fn reaper(&self) -> String {
        format!("{}:{{instances}}:reaper", self.prefix)
    }

    /// Set of "<room>|<peer>" an instance owns: written *before* the room join and removed
    /// *after* the leave, so a crash in between leaves only entries a reaper can clean.
    pub(crate) fn instance_peers(&self, instance: &str) -> String {
        format!("{}:{{inst:{instance}}}:peers", self.prefix)
    }

    /// Legacy pub/sub channel of one instance: one message per `PUBLISH` (see `super::bus`).
    pub(crate) fn channel(&self, instance: &str) -> String {
        format!("{}:chan:{instance}", self.prefix)
    }

    /// Bus channel of one instance: packs of messages (see `super::bus`).
    pub(crate) fn bus(&self, instance: &str) -> String {
        format!("{}:bus:{instance}", self.prefix)
    }

    /// The channels an instance listens on: its bus and its legacy channel; in a cluster only
    /// its bus (no instance of the previous version runs on one, and a shard subscription
    /// takes channels of one slot).
    pub(crate) fn channels(&self, instance: &str) -> Vec<String> {
        if self.sharded {
            vec![self.bus(instance)]
        } else {
            vec![self.bus(instance), self.channel(instance)]
        }
    }

    /// Whether `channel` is some instance's bus channel (its messages are packed).
    pub(crate) fn is_bus(&self, channel: &[u8]) -> bool {
        channel
            .strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| rest.starts_with(b":bus:"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_share_one_hash_tag() {
        let k = Keys::new("p", false);
        assert_eq!(k.members("abc"), "p:{abc}:peers");
        assert_eq!(k.offers("abc", "x"), "p:{abc}:offers:x");
        assert_eq!(k.instance_peers("i"), "p:{inst:i}:peers");
        assert_eq!(k.alive(), "p:{instances}:alive");
        assert!(k.is_bus(k.bus("i").as_bytes()));
        assert!(!k.is_bus(k.channel("i").as_bytes()));
        assert!(!Keys::new("q", false).is_bus(k.bus("i").as_bytes()));
        assert_eq!(k.channels("i"), ["p:bus:i", "p:chan:i"]);
        let sharded = Keys::new("p", true);
        assert_eq!(sharded.channels("i"), ["p:bus:i"]);
        assert_eq!((k.publish(), sharded.publish()), ("PUBLISH", "SPUBLISH"));
    }
}
