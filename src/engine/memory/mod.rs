//! The in-process engine: one node, no setup (used when `REDIS_URL` is unset).
//!
//! Its state ([`state::State`]: sessions, tokens, code checks, the mailbox, rooms and roles) is
//! plain data behind one `std::sync::Mutex`, reached only through synchronous methods (the
//! model is mini-redis's `db.rs`): each runs to completion alone, which is what makes
//! registration, code checks, role choice and mailbox takes atomic, and no guard can be held
//! across an `.await`. Its sockets and their delivery are the shared [`Router`]'s. A join or a
//! leave tells the router while the state's lock is held (always state, then router; the
//! router never takes the state's lock), so room events reach the members in the order the
//! state decided them.

mod state;

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use self::state::State;
use super::admin::{CloseOutcome, InstanceView, SessionView};
use super::{
    Access, CodeCheck, Delivery, Engine, EngineConfig, EngineResult, Entry, Grant, JoinResult,
    NewPeer, SessionRecord,
};
use crate::peers::CloseReason;
use crate::protocol::{Frame, PeerInfo, ServerMessage};
use crate::relay::pairing::Queues;
use crate::relay::{Arrival, Endpoint, Limits, Mark, Piece, Side};
use crate::router::{Known, Route, Router};

/// How often expired sessions and mailbox entries are swept.
const SWEEP: Duration = Duration::from_secs(30);
/// The one owner every member has here.
const LOCAL: &str = "local";

#[derive(Clone)]
pub struct MemoryEngine {
    state: Arc<Mutex<State>>,
    /// Relay sockets waiting for each other (its own lock: never taken with `state`'s).
    relay: Arc<Mutex<Queues>>,
    router: Arc<Router>,
    config: Arc<EngineConfig>,
}

fn known(peers: &[PeerInfo]) -> Vec<Known> {
    peers
        .iter()
        .map(|p| Known {
            id: p.id.clone(),
            owner: LOCAL.to_owned(),
            seq: 0,
        })
        .collect()
}

impl MemoryEngine {
    /// Starts the engine and its sweeper, which ends once the last handle is dropped.
    pub fn start(config: EngineConfig) -> Self {
        let router = Arc::new(Router::new(LOCAL, config.queue));
        let state = Arc::new(Mutex::new(State::new(config.clone())));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP);
            loop {
                sweep.tick().await;
                let Some(state) = weak.upgrade() else { break };
                lock(&state).sweep(Instant::now());
            }
        });
        Self {
            state,
            relay: Arc::default(),
            router,
            config: Arc::new(config),
        }
    }

    /// Runs `f` on the state. A panic elsewhere under the lock leaves plain data behind, so a
    /// poisoned lock is used as it is.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.state))
    }
}

fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine for MemoryEngine {
    fn config(&self) -> &EngineConfig {
        &self.config
    }

    async fn register(&self, session: SessionRecord, host_token: &str) -> EngineResult<bool> {
        let token = host_token.to_owned();
        Ok(self.with(|s| s.register(session, token)))
    }

    async fn resolve(&self, id: &str) -> EngineResult<Option<Access>> {
        let id = id.to_owned();
        Ok(self.with(|s| s.resolve(&id)))
    }

    async fn mint_token(&self, session: &str, grant: Grant) -> EngineResult<Option<String>> {
        let session = session.to_owned();
        Ok(self.with(|s| s.mint_token(session, grant)))
    }

    async fn take_relay_token(&self, token: &str) -> EngineResult<Option<SessionRecord>> {
        Ok(self.with(|s| s.take_relay_token(token)))
    }

    async fn relay_arrive(
        &self,
        room: &str,
        side: Side,
        me: &Endpoint,
        limits: Limits,
    ) -> EngineResult<Arrival> {
        let now = Instant::now();
        Ok(lock(&self.relay).arrive(room, side, me, limits, now))
    }

    async fn relay_forget(&self, room: &str, me: &Endpoint) -> EngineResult<()> {
        lock(&self.relay).forget(room, me);
        Ok(())
    }

    async fn relay_mark(&self, room: &str) -> EngineResult<Mark> {
        Ok(lock(&self.relay).mark(room, Instant::now()))
    }

    async fn relay_unmark(&self, room: &str, mark: Mark) -> EngineResult<()> {
        lock(&self.relay).unmark(room, mark);
        Ok(())
    }

    /// Every relay socket is on this one instance: never called.
    async fn relay_post(&self, _to: &Endpoint, _piece: Piece) -> EngineResult<bool> {
        Ok(false)
    }

    async fn bind_token(&self, token: &str, peer: &str) -> EngineResult<()> {
        let (token, peer) = (token.to_owned(), peer.to_owned());
        self.with(|s| s.bind_token(&token, peer));
        Ok(())
    }

    async fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> EngineResult<CodeCheck> {
        let (session, client, digest) = (session.to_owned(), client.to_owned(), digest.to_owned());
        Ok(self.with(|s| s.check_code(session, client, &digest)))
    }

    async fn rate(&self, key: &str, max: u32, window: Duration) -> EngineResult<Option<Duration>> {
        let key = key.to_owned();
        Ok(self.with(|s| s.rate(key, max, window)))
    }

    async fn push_offer(&self, room: &str, to: &str, payload: String) -> EngineResult<()> {
        let key = (room.to_owned(), to.to_owned());
        self.with(|s| s.push_offer(key, payload));
        Ok(())
    }

    async fn pop_offer(&self, room: &str, to: &str) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned());
        Ok(self.with(|s| s.pop_offer(key)))
    }

    async fn put_answer(
        &self,
        room: &str,
        from: &str,
        to: &str,
        handshake: &str,
        payload: String,
    ) -> EngineResult<bool> {
        let key = (room.to_owned(), to.to_owned(), handshake.to_owned());
        let from = from.to_owned();
        Ok(self.with(|s| s.put_answer(key, from, payload)))
    }

    async fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned(), handshake.to_owned());
        Ok(self.with(|s| s.take_answer(key)))
    }

    fn router(&self) -> &Router {
        &self.router
    }

    async fn disconnect(&self, peer: &str) {
        if let Some(m) = self.router.disconnect(peer) {
            let _ = self.leave(&m.room, peer).await;
        }
    }

    async fn join(
        &self,
        room: &str,
        peer: NewPeer,
        max_peers: usize,
        entry: Entry<'_>,
    ) -> EngineResult<JoinResult> {
        let id = peer.id.clone();
        Ok(self.with(|state| {
            if let Entry::Code { client, digest } = entry {
                match state.check_code(room.to_owned(), client.to_owned(), digest) {
                    CodeCheck::Correct(session) if session.relay => return JoinResult::RelayOnly,
                    CodeCheck::Correct(_) => {}
                    CodeCheck::NotFound => {
                        return state
                            .resolve(room)
                            .map_or(JoinResult::Refused(CodeCheck::NotFound), JoinResult::Token)
                    }
                    refused => return JoinResult::Refused(refused),
                }
            }
            let result = state.join(room.to_owned(), peer, max_peers);
            if let JoinResult::Joined(j) = &result {
                let frame = j
                    .fresh
                    .then(|| ServerMessage::PeerJoined { peer: j.me.clone() }.to_frame());
                // Under the state's lock: the next room event is decided after this one is told.
                let _ = self.router.joined(room, &id, LOCAL, known(&j.peers), frame);
            }
            result
        }))
    }

    async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        self.router.leaving(room, peer);
        self.with(|state| {
            if let Some(survivors) = state.leave(room.to_owned(), peer.to_owned()) {
                let frame = ServerMessage::PeerLeft {
                    peer_id: peer.to_owned(),
                }
                .to_frame();
                self.router.left(room, peer, known(&survivors), &frame);
            }
        });
        Ok(())
    }

    async fn is_member(&self, room: &str, peer: &str) -> EngineResult<bool> {
        Ok(self.with(|s| s.is_member(room, peer)))
    }

    async fn server_peer(&self, room: &str) -> EngineResult<Option<String>> {
        Ok(self.with(|s| s.server_peer(room)))
    }

    async fn send(
        &self,
        room: &str,
        _from: &str,
        to: &str,
        frame: Frame,
    ) -> EngineResult<Delivery> {
        // Every member is a local socket whose membership the router recorded with its join.
        Ok(match self.router.relay(room, to, &frame).await {
            Route::Delivered => Delivery::Sent,
            Route::Full(_) => Delivery::Full,
            Route::Absent | Route::Remote(_) | Route::Unknown { .. } => Delivery::NotMember,
        })
    }

    async fn ready(&self) -> EngineResult<()> {
        Ok(())
    }

    async fn admin_session(&self, id: &str) -> EngineResult<Option<SessionView>> {
        Ok(self.with(|s| s.admin_view(id, LOCAL)))
    }

    async fn admin_close(&self, id: &str) -> EngineResult<CloseOutcome> {
        Ok(self.with(|state| {
            let Some((again, members)) = state.admin_close(id) else {
                return CloseOutcome::NotFound;
            };
            // Under the state's lock, as joins and leaves tell the router (state, then router).
            self.router
                .close_room(id, &members, CloseReason::SessionClosed);
            let peers = members.len();
            if again {
                CloseOutcome::AlreadyClosed { peers }
            } else {
                CloseOutcome::Closed { peers }
            }
        }))
    }

    async fn admin_instances(&self) -> EngineResult<Vec<InstanceView>> {
        Ok(vec![InstanceView {
            id: LOCAL.to_owned(),
            heartbeat_age_ms: 0,
            this: true,
        }])
    }

    async fn shutdown(&self) {}
}
