//! Keeps live sessions alive. A session's keys expire `session_ttl` after its registration or
//! after its last member left, never while it has a member (`docs/architecture.md`, "Session
//! lifetime"): a join sets the ttl, `lua/leave.lua` resets it when the room empties, and in
//! between each instance's refresher task renews the rooms it holds members of.
//!
//! Every `period` (session_ttl/4, so three refreshes may fail before anything expires) the
//! refresher asks the router for its rooms and renews them in batches: one pipeline of
//! `lua/touch.lua` (one slot each) per [`ROOM_BATCH`] rooms, then one pipeline of PEXPIREs for
//! the tokens those scripts listed (each token has its own slot). Nothing is refreshed per
//! message, and a room whose members sit on several instances is renewed by each of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::Inner;
use crate::engine::EngineResult;

/// Rooms per pipeline of touch scripts.
const ROOM_BATCH: usize = 256;
/// Token PEXPIREs per pipeline (a session lists up to `max_tokens_per_session`).
const TOKEN_BATCH: usize = 1024;
/// Bounds of the period: no busy loop for a tiny ttl, and a 12 h session still renewed often
/// enough to ride out a Redis outage or a stalled instance.
const MIN_PERIOD: Duration = Duration::from_millis(100);
const MAX_PERIOD: Duration = Duration::from_secs(600);

/// How often the rooms with local members are renewed.
pub(crate) fn period(session_ttl: Duration) -> Duration {
    (session_ttl / 4).clamp(MIN_PERIOD, MAX_PERIOD)
}

/// The refresher task: ends on the engine's stop signal, also in the middle of a round.
pub(crate) async fn refresher(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let every = period(inner.config.session_ttl);
    // Nothing to renew at start: joins set the ttl themselves.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.changed() => break,
            res = inner.refresh_rooms() => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "session refresh failed; retried next period");
                }
            }
        }
    }
}

impl Inner {
    /// Renews every room with a local member, and their tokens. Stops at the first failed
    /// pipeline (Redis is likely down; the next period retries).
    async fn refresh_rooms(&self) -> EngineResult<()> {
        let rooms = self.router.rooms();
        let ttl = Self::ttl_ms(self.config.session_ttl);
        let k = &self.keys;
        for batch in rooms.chunks(ROOM_BATCH) {
            let mut pipe = redis::pipe();
            // A pipeline does not reload a script on NOSCRIPT (restart, SCRIPT FLUSH): load it
            // first, every time (a few hundred bytes per batch).
            pipe.load_script(&self.scripts.touch).ignore();
            for room in batch {
                let mut inv = self.scripts.touch.prepare_invoke();
                inv.key(k.members(room))
                    .key(k.seq(room))
                    .key(k.server(room))
                    .key(k.session(room))
                    .key(k.tokens(room))
                    .arg(ttl);
                pipe.invoke_script(&inv);
            }
            let mut cm = self.cm();
            let listed: Vec<Vec<String>> = self.redis("touch", pipe.query_async(&mut cm)).await?;
            let tokens: Vec<String> = listed.into_iter().flatten().collect();
            self.expire_tokens(&tokens, ttl).await?;
        }
        Ok(())
    }

    /// Gives each token `ttl` ms again, in pipelines of [`TOKEN_BATCH`].
    pub(super) async fn expire_tokens(&self, tokens: &[String], ttl: u64) -> EngineResult<()> {
        for batch in tokens.chunks(TOKEN_BATCH) {
            let mut pipe = redis::pipe();
            for t in batch {
                pipe.cmd("PEXPIRE")
                    .arg(self.keys.token(t))
                    .arg(ttl)
                    .ignore();
            }
            let mut cm = self.cm();
            self.redis("expire_tokens", pipe.query_async::<()>(&mut cm))
                .await?;
        }
        Ok(())
    }

    /// The room just emptied and `leave.lua` restarted its session's countdown: the tokens
    /// (other slots) follow. A failure only leaves them the life the last refresh gave them.
    pub(super) async fn last_left(&self, room: &str) {
        if let Err(e) = self.refresh_tokens(room).await {
            tracing::warn!(session = %room, error = %e, "token refresh after the last leave failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_a_quarter_of_the_ttl_within_bounds() {
        assert_eq!(period(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(period(Duration::from_millis(100)), MIN_PERIOD);
        assert_eq!(period(Duration::from_secs(12 * 3600)), MAX_PERIOD);
    }
}
