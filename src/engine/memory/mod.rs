//! The in-process engine: one node, no setup (used when `REDIS_URL` is unset).
//!
//! One actor task owns every piece of state, this node's sockets included. Callers send it a
//! closure over a bounded queue and await the reply with a timeout, so no lock exists at all,
//! nothing is held across an `.await`, and a stalled actor shows up as `EngineError::Busy`
//! instead of a hang. The closures never await: each runs one synchronous method of [`state::State`] to
//! completion, in arrival order, which is what makes registration, code checks, role choice and
//! mailbox takes atomic.

mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use self::state::State;
use super::{
    Access, CodeCheck, Delivery, Engine, EngineConfig, EngineError, EngineResult, JoinResult,
    NewPeer, SessionRecord,
};
use crate::peers::PeerQueue;
use crate::protocol::Frame;

type Job = Box<dyn FnOnce(&mut State) + Send>;

/// Jobs waiting for the actor at most; callers wait (bounded by `call_timeout`) beyond it.
const QUEUE: usize = 4096;
/// How often expired sessions and mailbox entries are swept.
const SWEEP: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct MemoryEngine {
    jobs: mpsc::Sender<Job>,
    config: Arc<EngineConfig>,
}

impl MemoryEngine {
    /// Starts the actor. It ends when the last handle is dropped.
    pub fn start(config: EngineConfig) -> Self {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        let shared = Arc::new(config.clone());
        let mut state = State::new(config);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP);
            loop {
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => job(&mut state),
                        None => break,
                    },
                    _ = sweep.tick() => state.sweep(Instant::now()),
                }
            }
        });
        Self {
            jobs,
            config: shared,
        }
    }

    /// Runs `f` on the state inside the actor and returns its result.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> EngineResult<R> {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |state| {
            let _ = reply.send(f(state));
        });
        let round_trip = async {
            self.jobs.send(job).await.ok()?;
            result.await.ok()
        };
        match tokio::time::timeout(self.config.call_timeout, round_trip).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(EngineError::Busy("engine stopped".into())),
            Err(_) => Err(EngineError::Busy("engine busy".into())),
        }
    }
}

impl Engine for MemoryEngine {
    fn config(&self) -> &EngineConfig {
        &self.config
    }

    async fn register(&self, session: SessionRecord, host_token: &str) -> EngineResult<bool> {
        let token = host_token.to_owned();
        self.call(move |s| s.register(session, token)).await
    }

    async fn resolve(&self, id: &str) -> EngineResult<Option<Access>> {
        let id = id.to_owned();
        self.call(move |s| s.resolve(&id)).await
    }

    async fn mint_token(&self, session: &str) -> EngineResult<Option<String>> {
        let session = session.to_owned();
        self.call(move |s| s.mint_token(session)).await
    }

    async fn bind_token(&self, token: &str, peer: &str) -> EngineResult<()> {
        let (token, peer) = (token.to_owned(), peer.to_owned());
        self.call(move |s| s.bind_token(&token, peer)).await
    }

    async fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> EngineResult<CodeCheck> {
        let (session, client, digest) = (session.to_owned(), client.to_owned(), digest.to_owned());
        self.call(move |s| s.check_code(session, client, &digest))
            .await
    }

    async fn rate(&self, key: &str, max: u32, window: Duration) -> EngineResult<Option<Duration>> {
        let key = key.to_owned();
        self.call(move |s| s.rate(key, max, window)).await
    }

    async fn push_offer(&self, room: &str, to: &str, payload: String) -> EngineResult<()> {
        let key = (room.to_owned(), to.to_owned());
        self.call(move |s| s.push_offer(key, payload)).await
    }

    async fn pop_offer(&self, room: &str, to: &str) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned());
        self.call(move |s| s.pop_offer(key)).await
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
        self.call(move |s| s.put_answer(key, from, payload)).await
    }

    async fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned(), handshake.to_owned());
        self.call(move |s| s.take_answer(key)).await
    }

    async fn connect(&self, peer: &str) -> EngineResult<PeerQueue> {
        let peer = peer.to_owned();
        self.call(move |s| s.connect(&peer)).await
    }

    async fn disconnect(&self, peer: &str) {
        let peer = peer.to_owned();
        let _ = self.call(move |s| s.local.remove(&peer)).await;
    }

    async fn join(&self, room: &str, peer: NewPeer, max_peers: usize) -> EngineResult<JoinResult> {
        let room = room.to_owned();
        self.call(move |s| s.join(room, peer, max_peers)).await
    }

    async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        let (room, peer) = (room.to_owned(), peer.to_owned());
        self.call(move |s| s.leave(room, peer)).await
    }

    async fn is_member(&self, room: &str, peer: &str) -> EngineResult<bool> {
        let (room, peer) = (room.to_owned(), peer.to_owned());
        self.call(move |s| s.is_member(&room, &peer)).await
    }

    async fn server_peer(&self, room: &str) -> EngineResult<Option<String>> {
        let room = room.to_owned();
        self.call(move |s| s.server_peer(&room)).await
    }

    async fn send(&self, room: &str, to: &str, frame: Frame) -> EngineResult<Delivery> {
        let (room, to) = (room.to_owned(), to.to_owned());
        self.call(move |s| s.send(&room, &to, &frame)).await
    }

    async fn ready(&self) -> EngineResult<()> {
        self.call(|_| ()).await
    }

    async fn local_peers(&self) -> EngineResult<usize> {
        self.call(|s| s.local.len()).await
    }

    async fn shutdown(&self) {}
}
