//! The in-process engine's state: plain data with synchronous methods, behind the engine's
//! mutex (so each method runs to completion, alone: that is what makes registration, code
//! checks, roles and mailbox takes atomic). This instance's sockets are the router's.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::code::digests_match;
use crate::engine::admin::{PeerView, SessionView};
use crate::engine::{
    Access, CodeCheck, EngineConfig, Grant, JoinResult, Joined, NewPeer, SessionRecord,
};
use crate::protocol::{new_id, unix_now, PeerInfo, Role};

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
    /// Relay joiner tokens expire (and go once used).
    until: Option<Instant>,
}

/// One recipient's answers: handshake → (sender, answer).
type AnswerBox = HashMap<String, Expiring<(String, String)>>;

/// Failure times within the window, oldest first.
type Failures = VecDeque<Instant>;

/// Drops the entries older than `window` and returns how long until the oldest leaves it.
fn trim(f: &mut Failures, now: Instant, window: Duration) -> Duration {
    while f.front().is_some_and(|t| now.duration_since(*t) >= window) {
        f.pop_front();
    }
    f.front()
        .map(|t| window.saturating_sub(now.duration_since(*t)))
        .unwrap_or_default()
}

pub(super) struct State {
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
    /// (room, recipient) → handshake → (sender, answer): a post counts its sender's waiting
    /// answers in the recipient's box only.
    answers: HashMap<(String, String), AnswerBox>,
    /// Room → members in join order.
    rooms: HashMap<String, Vec<PeerInfo>>,
    /// Room → its current `server` peer.
    servers: HashMap<String, String>,
    /// Sessions closed through the Admin API → (created_at, closed_at), for the session ttl:
    /// the id cannot be registered or joined again, and a repeated close is recognised.
    closed: HashMap<String, Expiring<(u64, u64)>>,
}

impl State {
    pub(super) fn new(config: EngineConfig) -> Self {
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
            closed: HashMap::new(),
        }
    }

    /// A session lives while its room has members, and `session_ttl` after registration or
    /// after its last member left (`leave` restarts the countdown).
    fn session(&self, id: &str, now: Instant) -> Option<&SessionEntry> {
        self.sessions
            .get(id)
            .filter(|s| s.live(now) || self.rooms.contains_key(id))
            .map(|s| &s.value)
    }

    pub(super) fn is_member(&self, room: &str, peer: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|m| m.iter().any(|p| p.id == peer))
    }

    pub(super) fn sweep(&mut self, now: Instant) {
        let rooms = &self.rooms;
        self.sessions
            .retain(|id, s| s.live(now) || rooms.contains_key(id));
        let sessions = &self.sessions;
        self.tokens
            .retain(|_, t| sessions.contains_key(&t.session) && t.until.is_none_or(|u| u > now));
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
        for answers in self.answers.values_mut() {
            answers.retain(|_, a| a.live(now));
        }
        self.answers.retain(|_, box_| !box_.is_empty());
        self.closed.retain(|_, c| c.live(now));
    }

    fn is_closed(&self, id: &str, now: Instant) -> bool {
        self.closed.get(id).is_some_and(|c| c.live(now))
    }

    pub(super) fn register(&mut self, session: SessionRecord, token: String) -> bool {
        let now = Instant::now();
        if self.session(&session.id, now).is_some()
            || self.is_closed(&session.id, now)
            || self.tokens.contains_key(&session.id)
            || self.tokens.contains_key(&token)
        {
            return false;
        }
        let until = now + self.config.session_ttl;
        let host = Token {
            session: session.id.clone(),
            grant: Grant::Host,
            peer: None,
            until: None,
        };
        self.tokens.insert(token, host);
        let entry = SessionEntry {
            record: session,
            minted: 1,
        };
        let id = entry.record.id.clone();
        self.sessions.insert(
            id,
            Expiring {
                value: entry,
                until,
            },
        );
        true
    }

    pub(super) fn resolve(&self, id: &str) -> Option<Access> {
        let now = Instant::now();
        if let Some(e) = self.session(id, now) {
            return Some(Access {
                session: e.record.clone(),
                grant: Grant::Public,
                peer: None,
            });
        }
        let t = self.tokens.get(id)?;
        if t.until.is_some_and(|u| u <= now) {
            return None;
        }
        let e = self.session(&t.session, now)?;
        Some(Access {
            session: e.record.clone(),
            grant: t.grant,
            peer: t.peer.clone(),
        })
    }

    pub(super) fn mint_token(&mut self, session: String, grant: Grant) -> Option<String> {
        let now = Instant::now();
        let max = self.config.max_tokens_per_session;
        let members = self.rooms.contains_key(&session);
        let entry = self
            .sessions
            .get_mut(&session)
            .filter(|e| members || e.live(now))?;
        if entry.value.minted >= max {
            return None;
        }
        entry.value.minted += 1;
        let token = new_id();
        let until = (grant == Grant::Relay).then(|| now + self.config.relay_token_ttl);
        let joiner = Token {
            session,
            grant,
            peer: None,
            until,
        };
        self.tokens.insert(token.clone(), joiner);
        Some(token)
    }

    /// A relay token's session, once: the token goes with the first take.
    pub(super) fn take_relay_token(&mut self, token: &str) -> Option<SessionRecord> {
        let now = Instant::now();
        let t = self.tokens.get(token)?;
        if t.grant != Grant::Relay {
            return None;
        }
        let t = self.tokens.remove(token)?;
        if t.until.is_some_and(|u| u <= now) {
            return None;
        }
        self.session(&t.session, now).map(|e| e.record.clone())
    }

    pub(super) fn bind_token(&mut self, token: &str, peer: String) {
        if let Some(t) = self.tokens.get_mut(token) {
            t.peer = Some(peer);
        }
    }

    pub(super) fn check_code(
        &mut self,
        session: String,
        client: String,
        digest: &str,
    ) -> CodeCheck {
        let now = Instant::now();
        let Some(entry) = self.session(&session, now) else {
            return CodeCheck::NotFound;
        };
        let record = entry.record.clone();
        let window = self.config.code_failure_window;
        let mine = self
            .client_failures
            .entry((session.clone(), client))
            .or_default();
        let mine_wait = trim(mine, now, window);
        if mine.len() >= self.config.max_code_failures as usize {
            return CodeCheck::Locked(mine_wait);
        }
        let all = self.failures.entry(session).or_default();
        let all_wait = trim(all, now, window);
        if all.len() >= self.config.max_session_code_failures as usize {
            return CodeCheck::Locked(all_wait);
        }
        if digests_match(digest, &record.code) {
            return CodeCheck::Correct(record);
        }
        all.push_back(now);
        mine.push_back(now);
        CodeCheck::Wrong
    }

    pub(super) fn rate(&mut self, key: String, max: u32, window: Duration) -> Option<Duration> {
        let now = Instant::now();
        let entry = self.rates.entry(key).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        (entry.0 > max).then(|| entry.1.duration_since(now))
    }

    pub(super) fn push_offer(&mut self, key: (String, String), payload: String) {
        let until = Instant::now() + self.config.mailbox_ttl;
        let max = self.config.max_queued_offers.max(1);
        let queue = self.offers.entry(key).or_default();
        queue.push_back(Expiring {
            value: payload,
            until,
        });
        while queue.len() > max {
            queue.pop_front();
        }
    }

    pub(super) fn pop_offer(&mut self, key: (String, String)) -> Option<String> {
        let now = Instant::now();
        let queue = self.offers.get_mut(&key)?;
        let offer = std::iter::from_fn(|| queue.pop_front()).find(|o| o.live(now));
        if queue.is_empty() {
            self.offers.remove(&key);
        }
        offer.map(|o| o.value)
    }

    /// `key` is (room, recipient, handshake).
    pub(super) fn put_answer(
        &mut self,
        key: (String, String, String),
        from: String,
        payload: String,
    ) -> bool {
        let now = Instant::now();
        let (room, to, handshake) = key;
        let max = self.config.max_queued_answers;
        let answers = self.answers.entry((room, to)).or_default();
        let waiting = answers
            .iter()
            .filter(|(h, a)| **h != handshake && a.value.0 == from && a.live(now))
            .count();
        if waiting >= max {
            return false;
        }
        let until = now + self.config.mailbox_ttl;
        let answer = Expiring {
            value: (from, payload),
            until,
        };
        answers.insert(handshake, answer);
        true
    }

    pub(super) fn take_answer(&mut self, key: (String, String, String)) -> Option<String> {
        let (room, to, handshake) = key;
        let box_key = (room, to);
        let answers = self.answers.get_mut(&box_key)?;
        let answer = answers.remove(&handshake);
        if answers.is_empty() {
            self.answers.remove(&box_key);
        }
        answer.filter(|a| a.live(Instant::now())).map(|a| a.value.1)
    }

    pub(super) fn join(&mut self, room: String, peer: NewPeer, max_peers: usize) -> JoinResult {
        let now = Instant::now();
        if self.is_closed(&room, now) {
            return JoinResult::Closed;
        }
        if let Some(entry) = self.sessions.get_mut(&room) {
            entry.until = now + self.config.session_ttl;
        }
        let members = self.rooms.entry(room.clone()).or_default();
        if let Some(me) = members.iter().find(|p| p.id == peer.id) {
            return JoinResult::Joined(Joined {
                me: me.clone(),
                peers: members.clone(),
                fresh: false,
            });
        }
        if members.len() >= max_peers {
            if members.is_empty() {
                self.rooms.remove(&room);
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
            self.servers.insert(room.clone(), me.id.clone());
        }
        JoinResult::Joined(Joined {
            me,
            peers,
            fresh: true,
        })
    }

    /// Removes `peer` from `room`; the members left, or `None` when it was not a member.
    pub(super) fn leave(&mut self, room: String, peer: String) -> Option<Vec<PeerInfo>> {
        let members = self.rooms.get_mut(&room)?;
        let before = members.len();
        members.retain(|p| p.id != peer);
        if members.len() == before {
            return None;
        }
        let survivors = members.clone();
        if self.servers.get(&room) == Some(&peer) {
            self.servers.remove(&room);
        }
        if survivors.is_empty() {
            self.rooms.remove(&room);
            if let Some(entry) = self.sessions.get_mut(&room) {
                entry.until = Instant::now() + self.config.session_ttl;
            }
        }
        self.offers.remove(&(room, peer));
        Some(survivors)
    }

    pub(super) fn server_peer(&self, room: &str) -> Option<String> {
        self.servers.get(room).cloned()
    }
}

/// The Admin API's reads and the close (see `crate::engine::admin`).
impl State {
    /// The session and its members, with their owner (`owner` for all: one instance).
    pub(super) fn admin_view(&self, id: &str, owner: &str) -> Option<SessionView> {
        let now = Instant::now();
        let unix = |until: Instant| unix_now() + until.saturating_duration_since(now).as_secs();
        if let Some(c) = self.closed.get(id).filter(|c| c.live(now)) {
            return Some(SessionView {
                id: id.to_owned(),
                created_at: c.value.0,
                expires_at: Some(unix(c.until)),
                closed_at: Some(c.value.1),
                peers: Vec::new(),
            });
        }
        self.session(id, now)?;
        let entry = self.sessions.get(id)?;
        let peers = self
            .rooms
            .get(id)
            .into_iter()
            .flatten()
            .map(|p| PeerView {
                id: p.id.clone(),
                role: p.role,
                instance: owner.to_owned(),
                joined_at: p.joined_at,
                supported_transports: p.supported_transports.clone(),
                preferred_transport: p.preferred_transport.clone(),
            })
            .collect();
        Some(SessionView {
            id: id.to_owned(),
            created_at: entry.value.record.created_at,
            expires_at: Some(unix(entry.until)),
            closed_at: None,
            peers,
        })
    }

    /// Closes session `id` for good: it, its tokens, its room and its mailbox go; a tombstone
    /// stays for the session ttl. Returns whether it was closed before, and the members to
    /// disconnect; `None` for an unknown session.
    pub(super) fn admin_close(&mut self, id: &str) -> Option<(bool, Vec<String>)> {
        let now = Instant::now();
        let again = self.is_closed(id, now);
        if !again {
            let created_at = self.session(id, now)?.record.created_at;
            let until = now + self.config.session_ttl;
            let tombstone = Expiring {
                value: (created_at, unix_now()),
                until,
            };
            self.closed.insert(id.to_owned(), tombstone);
            self.sessions.remove(id);
            self.tokens.retain(|_, t| t.session != id);
            self.failures.remove(id);
            self.client_failures.retain(|(s, _), _| s != id);
            self.offers.retain(|(room, _), _| room != id);
            self.answers.retain(|(room, _), _| room != id);
        }
        self.servers.remove(id);
        let members = self.rooms.remove(id).unwrap_or_default();
        Some((again, members.into_iter().map(|p| p.id).collect()))
    }
}
