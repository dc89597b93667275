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

use super::{
    Access, CodeCheck, Delivery, Engine, EngineConfig, EngineError, EngineResult, Grant,
    JoinResult, Joined, NewPeer, SessionRecord,
};
use crate::code::digests_match;
use crate::peers::{Class, LocalPeers, PeerQueue, Queued};
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
    /// Tokens minted so far (the host's included).
    minted: u32,
}

struct Token {
    session: String,
    grant: Grant,
    peer: Option<String>,
}

/// Failure times within the window, oldest first.
type Failures = VecDeque<Instant>;

struct State {
    config: EngineConfig,
    sessions: HashMap<String, Expiring<SessionEntry>>,
    /// Token → its session and grant (dropped with the session).
    tokens: HashMap<String, Token>,
    /// Session → wrong codes from everywhere; (session, client) → from one client.
    failures: HashMap<String, Failures>,
    client_failures: HashMap<(String, String), Failures>,
    /// Fixed-window counters: key → (count, window end).
    rates: HashMap<String, (u32, Instant)>,
    /// (room, recipient) → queued offers.
    offers: HashMap<(String, String), VecDeque<Expiring<String>>>,
    /// (room, recipient, handshake) → (sender, answer).
    answers: HashMap<(String, String, String), Expiring<(String, String)>>,
    /// Room → members in join order.
    rooms: HashMap<String, Vec<PeerInfo>>,
    /// Room → its current `server` peer.
    servers: HashMap<String, String>,
    local: LocalPeers,
}

/// Drops the entries older than `window` and returns how long until the oldest leaves it.
fn trim(f: &mut Failures, now: Instant, window: Duration) -> Duration {
    while f.front().is_some_and(|t| now.duration_since(*t) >= window) {
        f.pop_front();
    }
    f.front()
        .map(|t| window.saturating_sub(now.duration_since(*t)))
        .unwrap_or_default()
}

impl State {
    fn new(config: EngineConfig) -> Self {
        let local = LocalPeers::new(config.queue);
        Self {
            config,
            sessions: HashMap::new(),
            tokens: HashMap::new(),
            failures: HashMap::new(),
            client_failures: HashMap::new(),
            rates: HashMap::new(),
            offers: HashMap::new(),
            answers: HashMap::new(),
            rooms: HashMap::new(),
            servers: HashMap::new(),
            local,
        }
    }

    fn session(&self, id: &str, now: Instant) -> Option<&SessionEntry> {
        self.sessions
            .get(id)
            .filter(|s| s.live(now))
            .map(|s| &s.value)
    }

    fn is_member(&self, room: &str, peer: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|m| m.iter().any(|p| p.id == peer))
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
            self.local.deliver(&id, frame, Class::Control);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.sessions.retain(|_, s| s.live(now));
        let sessions = &self.sessions;
        self.tokens.retain(|_, t| sessions.contains_key(&t.session));
        let window = self.config.code_failure_window;
        for f in self.failures.values_mut() {
            trim(f, now, window);
        }
        self.failures.retain(|_, f| !f.is_empty());
        for f in self.client_failures.values_mut() {
            trim(f, now, window);
        }
        self.client_failures.retain(|_, f| !f.is_empty());
        self.rates.retain(|_, (_, until)| *until > now);
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

    async fn register(&self, session: SessionRecord, host_token: &str) -> EngineResult<bool> {
        let token = host_token.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            if s.session(&session.id, now).is_some()
                || s.tokens.contains_key(&session.id)
                || s.tokens.contains_key(&token)
            {
                return false;
            }
            let until = now + s.config.session_ttl;
            s.tokens.insert(
                token,
                Token {
                    session: session.id.clone(),
                    grant: Grant::Host,
                    peer: None,
                },
            );
            s.sessions.insert(
                session.id.clone(),
                Expiring {
                    value: SessionEntry {
                        record: session,
                        minted: 1,
                    },
                    until,
                },
            );
            true
        })
        .await
    }

    async fn resolve(&self, id: &str) -> EngineResult<Option<Access>> {
        let id = id.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            if let Some(e) = s.session(&id, now) {
                return Some(Access {
                    session: e.record.clone(),
                    grant: Grant::Public,
                    peer: None,
                });
            }
            let t = s.tokens.get(&id)?;
            let e = s.session(&t.session, now)?;
            Some(Access {
                session: e.record.clone(),
                grant: t.grant,
                peer: t.peer.clone(),
            })
        })
        .await
    }

    async fn mint_token(&self, session: &str) -> EngineResult<Option<String>> {
        let session = session.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            let max = s.config.max_tokens_per_session;
            let entry = s.sessions.get_mut(&session).filter(|e| e.live(now))?;
            if entry.value.minted >= max {
                return None;
            }
            entry.value.minted += 1;
            let token = new_id();
            s.tokens.insert(
                token.clone(),
                Token {
                    session,
                    grant: Grant::Joiner,
                    peer: None,
                },
            );
            Some(token)
        })
        .await
    }

    async fn bind_token(&self, token: &str, peer: &str) -> EngineResult<()> {
        let (token, peer) = (token.to_owned(), peer.to_owned());
        self.call(move |s| {
            if let Some(t) = s.tokens.get_mut(&token) {
                t.peer = Some(peer);
            }
        })
        .await
    }

    async fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> EngineResult<CodeCheck> {
        let (session, client, digest) = (session.to_owned(), client.to_owned(), digest.to_owned());
        self.call(move |s| {
            let now = Instant::now();
            let Some(entry) = s.session(&session, now) else {
                return CodeCheck::NotFound;
            };
            let expected = entry.record.code.clone();
            let window = s.config.code_failure_window;
            let mine = s
                .client_failures
                .entry((session.clone(), client))
                .or_default();
            let mine_wait = trim(mine, now, window);
            if mine.len() >= s.config.max_code_failures as usize {
                return CodeCheck::Locked(mine_wait);
            }
            let all = s.failures.entry(session).or_default();
            let all_wait = trim(all, now, window);
            if all.len() >= s.config.max_session_code_failures as usize {
                return CodeCheck::Locked(all_wait);
            }
            if digests_match(&digest, &expected) {
                return CodeCheck::Correct;
            }
            all.push_back(now);
            mine.push_back(now);
            CodeCheck::Wrong
        })
        .await
    }

    async fn rate(&self, key: &str, max: u32, window: Duration) -> EngineResult<Option<Duration>> {
        let key = key.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            let entry = s.rates.entry(key).or_insert((0, now + window));
            if entry.1 <= now {
                *entry = (0, now + window);
            }
            entry.0 += 1;
            (entry.0 > max).then(|| entry.1.duration_since(now))
        })
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
        self.call(move |s| {
            let now = Instant::now();
            let waiting = s
                .answers
                .iter()
                .filter(|((r, t, h), a)| {
                    *r == key.0 && *t == key.1 && *h != key.2 && a.value.0 == from && a.live(now)
                })
                .count();
            if waiting >= s.config.max_queued_answers {
                return false;
            }
            let until = now + s.config.mailbox_ttl;
            s.answers.insert(
                key,
                Expiring {
                    value: (from, payload),
                    until,
                },
            );
            true
        })
        .await
    }

    async fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> EngineResult<Option<String>> {
        let key = (room.to_owned(), to.to_owned(), handshake.to_owned());
        self.call(move |s| {
            s.answers
                .remove(&key)
                .filter(|a| a.live(Instant::now()))
                .map(|a| a.value.1)
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

    async fn join(&self, room: &str, peer: NewPeer, max_peers: usize) -> EngineResult<JoinResult> {
        let room = room.to_owned();
        self.call(move |s| {
            let now = Instant::now();
            if let Some(entry) = s.sessions.get_mut(&room) {
                entry.until = now + s.config.session_ttl;
            }
            let members = s.rooms.entry(room.clone()).or_default();
            if let Some(me) = members.iter().find(|p| p.id == peer.id) {
                return JoinResult::Joined(Joined {
                    me: me.clone(),
                    peers: members.clone(),
                    fresh: false,
                });
            }
            if members.len() >= max_peers {
                if members.is_empty() {
                    s.rooms.remove(&room);
                }
                return JoinResult::Full;
            }
            let me = PeerInfo {
                id: peer.id,
                role: peer.role,
                joined_at: unix_now(),
                supported_transports: peer.supported_transports,
                preferred_transport: peer.preferred_transport,
                metadata: peer.metadata,
            };
            members.push(me.clone());
            let peers = members.clone();
            if me.role == Role::Server {
                s.servers.insert(room.clone(), me.id.clone());
            }
            let frame = ServerMessage::PeerJoined { peer: me.clone() }.to_frame();
            s.broadcast(&room, &me.id, &frame);
            JoinResult::Joined(Joined {
                me,
                peers,
                fresh: true,
            })
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
            if s.servers.get(&room) == Some(&peer) {
                s.servers.remove(&room);
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
        self.call(move |s| s.is_member(&room, &peer)).await
    }

    async fn server_peer(&self, room: &str) -> EngineResult<Option<String>> {
        let room = room.to_owned();
        self.call(move |s| s.servers.get(&room).cloned()).await
    }

    async fn send(&self, room: &str, to: &str, frame: Frame) -> EngineResult<Delivery> {
        let (room, to) = (room.to_owned(), to.to_owned());
        self.call(move |s| {
            if !s.is_member(&room, &to) {
                return Delivery::NotMember;
            }
            match s.local.deliver(&to, &frame, Class::Relay) {
                Queued::Full => Delivery::Full,
                Queued::Yes | Queued::Absent => Delivery::Sent,
            }
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
