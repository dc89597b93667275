//! The in-process engine: one node, no setup (used when `REDIS_URL` is unset).
//!
//! One actor task owns every piece of state, this node's sockets included. Callers send it a
//! closure over a bounded queue and await the reply with a timeout, so no lock exists at all,
//! nothing is held across an `.await`, and a stalled actor shows up as `Unavailable` instead of
//! a hang. The closures never await: each runs to completion on the state, in arrival order,
//! which is what makes registration, role choice and mailbox takes atomic.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Engine, EngineConfig, EngineError, EngineResult, Joined, NewPeer, SessionRecord};
use crate::peers::{LocalPeers, PeerQueue};
use crate::protocol::{new_id, unix_now, Frame, PeerInfo, Role, ServerMessage};

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
            Ok(None) => Err(EngineError::Unavailable("engine stopped".into())),
            Err(_) => Err(EngineError::Unavailable("engine busy".into())),
        }
    }
}

struct Expiring<T> {
    value: T,
    until: Instant,
}

impl<T> Expiring<T> {
    fn live(&self, now: Instant) -> bool {
        self.until > now
    }
}

struct SessionEntry {
    record: SessionRecord,
    peer_session: Option<String>,
}

struct State {
    config: EngineConfig,
    sessions: HashMap<String, Expiring<SessionEntry>>,
    /// Peer-session id → host session id.
    aliases: HashMap<String, String>,
    /// Session → (wrong codes, start of window).
    failures: HashMap<String, (u32, Instant)>,
    /// (room, recipient) → queued offers.
    offers: HashMap<(String, String), VecDeque<Expiring<String>>>,
    /// (room, handshake) → answer.
    answers: HashMap<(String, String), Expiring<String>>,
    /// Room → members in join order.
    rooms: HashMap<String, Vec<PeerInfo>>,
    local: LocalPeers,
}

impl State {
    fn new(config: EngineConfig) -> Self {
        let local = LocalPeers::new(config.queue);
        Self {
            config,
            sessions: HashMap::new(),
            aliases: HashMap::new(),
            failures: HashMap::new(),
            offers: HashMap::new(),
            answers: HashMap::new(),
            rooms: HashMap::new(),
            local,
        }
    }

    fn session(&self, id: &str, now: Instant) -> Option<&SessionEntry> {
        let host = self.aliases.get(id).map(String::as_str).unwrap_or(id);
        self.sessions
            .get(host)
            .filter(|s| s.live(now))
            .map(|s| &s.value)
    }

    fn failures(&self, session: &str, now: Instant) -> u32 {
        match self.failures.get(session) {
            Some((n, since)) if now.duration_since(*since) < self.config.code_failure_window => *n,
            _ => 0,
        }
    }

    /// Sends `frame` to every member of `room` but `except`.
    fn broadcast(&mut self, room: &str, except: &str, frame: &Frame) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        let targets: Vec<String> = members
            .iter()
            .filter(|p| p.id != except)
            .map(|p| p.id.clone())
            .collect();
        for id in targets {
            self.local.deliver(&id, frame);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.sessions.retain(|_, s| s.live(now));
        let sessions = &self.sessions;
        self.aliases.retain(|_, host| sessions.contains_key(host));
        let window = self.config.code_failure_window;
        self.failures
            .retain(|_, (_, since)| now.duration_since(*since) < window);
        for queue in self.offers.values_mut() {
            queue.retain(|o| o.live(now));
        }
        self.offers.retain(|_, q| !q.is_empty());
        self.answers.retain(|_, a| a.live(now));
    }
}

impl Engine for MemoryEngine {
    fn config(&self) -> &EngineConfig {
        &self.config
    }

    async fn register(&self, session: SessionRecord) -> EngineResult<bool> {
        self.call(move |s| {
            let now = Instant::now();
            if s.session(&session.id, now).is_some() || s.aliases.contains_key(&session.id) {
                return false;
            }
            let until = now + s.config.session_ttl;
            s.sessions.insert(
                session.id.clone(),
                Expiring {
                    value: SessionEntry {
                        record: session,
                        peer_session: None,
                    },
                    until,
                },
            );
            true
        })
        .await
    }

    async fn resolve(&self, id: &str) -> EngineResult<Option<SessionRecord>> {
        let id = id.to_owned();
        self.call(move |s| s.session(&id, Instant::now()).map(|e| e.record.clone()))
            .await
    }

    async fn attach(&self, host: &str) -> EngineResult<Option<String>> {
        let host = host.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            let entry = s.sessions.get_mut(&host).filter(|e| e.live(now))?;
            let pid = entry.value.peer_session.get_or_insert_with(new_id).clone();
            s.aliases.insert(pid.clone(), host);
            Some(pid)
        })
        .await
    }

    async fn code_failure(&self, session: &str) -> EngineResult<u32> {
        let session = session.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            let n = s.failures(&session, now) + 1;
            let since = match s.failures.get(&session) {
                Some((_, since)) if n > 1 => *since,
                _ => now,
            };
            s.failures.insert(session, (n, since));
            n
        })
        .await
    }

    async fn code_failures(&self, session: &str) -> EngineResult<u32> {
        let session = session.to_owned();
        self.call(move |s| s.failures(&session, Instant::now()))
            .await
    }

    async fn push_offer(&self, room: &str, to: &str, payload: String) -> EngineResult<()> {
        let key = (room.to_owned(), to.to_owned());
        self.call(move |s| {
            let until = Instant::now() + s.config.mailbox_ttl;
            let max = s.config.max_queued_offers.max(1);
            let queue = s.offers.entry(key).or_default();
            queue.push_back(Expiring {
                value: payload,
                until,
            });
            while queue.len() > max {
                queue.pop_front();
            }
        })
        .await
    }

    async fn pop_offer(&self, room: &str, to: &str) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned());
        self.call(move |s| {
            let now = Instant::now();
            let queue = s.offers.get_mut(&key)?;
            let offer = std::iter::from_fn(|| queue.pop_front()).find(|o| o.live(now));
            if queue.is_empty() {
                s.offers.remove(&key);
            }
            offer.map(|o| o.value)
        })
        .await
    }

    async fn put_answer(&self, room: &str, handshake: &str, payload: String) -> EngineResult<()> {
        let key = (room.to_owned(), handshake.to_owned());
        self.call(move |s| {
            let until = Instant::now() + s.config.mailbox_ttl;
            s.answers.insert(
                key,
                Expiring {
                    value: payload,
                    until,
                },
            );
        })
        .await
    }

    async fn take_answer(&self, room: &str, handshake: &str) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), handshake.to_owned());
        self.call(move |s| {
            s.answers
                .remove(&key)
                .filter(|a| a.live(Instant::now()))
                .map(|a| a.value)
        })
        .await
    }

    async fn connect(&self, peer: &str) -> EngineResult<PeerQueue> {
        let peer = peer.to_owned();
        self.call(move |s| s.local.register(&peer)).await
    }

    async fn disconnect(&self, peer: &str) {
        let peer = peer.to_owned();
        let _ = self.call(move |s| s.local.remove(&peer)).await;
    }

    async fn join(&self, room: &str, peer: NewPeer) -> EngineResult<Joined> {
        let room = room.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            if let Some(entry) = s.sessions.get_mut(&room) {
                entry.until = now + s.config.session_ttl;
            }
            let members = s.rooms.entry(room.clone()).or_default();
            if let Some(me) = members.iter().find(|p| p.id == peer.id) {
                return Joined {
                    me: me.clone(),
                    peers: members.clone(),
                    fresh: false,
                };
            }
            let me = PeerInfo {
                id: peer.id,
                role: if members.is_empty() {
                    Role::Server
                } else {
                    Role::Client
                },
                joined_at: unix_now(),
                supported_transports: peer.supported_transports,
                preferred_transport: peer.preferred_transport,
                metadata: peer.metadata,
            };
            members.push(me.clone());
            let peers = members.clone();
            let frame = ServerMessage::PeerJoined { peer: me.clone() }.to_frame();
            s.broadcast(&room, &me.id, &frame);
            Joined {
                me,
                peers,
                fresh: true,
            }
        })
        .await
    }

    async fn leave(&self, room: &str, peer: &str) -> EngineResult<()> {
        let (room, peer) = (room.to_owned(), peer.to_owned());
        self.call(move |s| {
            let Some(members) = s.rooms.get_mut(&room) else {
                return;
            };
            let before = members.len();
            members.retain(|p| p.id != peer);
            if members.len() == before {
                return;
            }
            if members.is_empty() {
                s.rooms.remove(&room);
            } else {
                let frame = ServerMessage::PeerLeft {
                    peer_id: peer.clone(),
                }
                .to_frame();
                s.broadcast(&room, &peer, &frame);
            }
            s.offers.remove(&(room, peer));
        })
        .await
    }

    async fn is_member(&self, room: &str, peer: &str) -> EngineResult<bool> {
        let (room, peer) = (room.to_owned(), peer.to_owned());
        self.call(move |s| {
            s.rooms
                .get(&room)
                .is_some_and(|m| m.iter().any(|p| p.id == peer))
        })
        .await
    }

    async fn server_peer(&self, room: &str) -> EngineResult<Option<String>> {
        let room = room.to_owned();
        self.call(move |s| {
            s.rooms
                .get(&room)?
                .iter()
                .find(|p| p.role == Role::Server)
                .map(|p| p.id.clone())
        })
        .await
    }

    async fn send(&self, room: &str, to: &str, frame: Frame) -> EngineResult<bool> {
        let (room, to) = (room.to_owned(), to.to_owned());
        self.call(move |s| {
            let member = s
                .rooms
                .get(&room)
                .is_some_and(|m| m.iter().any(|p| p.id == to));
            if member {
                s.local.deliver(&to, &frame);
            }
            member
        })
        .await
    }

    async fn ready(&self) -> EngineResult<()> {
        self.call(|_| ()).await
    }

    async fn local_peers(&self) -> EngineResult<usize> {
        self.call(|s| s.local.len()).await
    }

    async fn shutdown(&self) {}
}
