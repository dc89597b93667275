//! One room as this instance sees it while it has local members: what each local member was
//! told, the remote members' owners (the route cache), and who has left.
//!
//! Pub/sub is fire and forget: a `peer_joined` or `peer_left` published while this instance's
//! subscription is down is gone. So the view remembers, per local member, the members it was
//! told of (its join snapshot, then every event delivered to it), and after a gap a fresh read
//! of `{S}:peers` ([`RoomView::repair`]) yields exactly what each one missed. Both ways are
//! idempotent per peer: an event is delivered only if it changes what the member was told, so a
//! live `peer_joined` after the repair sent it (or the repair after the live one) is not repeated.
//!
//! News of a member can be late: a `Learn` whose lookup raced a leave, a join snapshot or a
//! delayed `peer_joined` handled after the `peer_left`. It must never bring a departed member
//! back (peer ids are never reused). A departure leaves a tombstone (bounded, time-limited), and
//! the newest complete read of the room (the *horizon*: the join counter then and who was
//! present) rules out for good every member with a `seq` up to it that was not present.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::protocol::{PeerInfo, ServerMessage};

/// Entries per room (route cache, per-member sets) at most; rooms are far smaller
/// (`--max-room-peers` plus the host slots).
pub(crate) const MAX_PER_ROOM: usize = 1024;
/// Departures remembered per room at most (oldest forgotten first)...
const MAX_TOMBSTONES: usize = 256;
/// ...and for at most this long: far beyond any lookup, script or message in flight (each is
/// bounded by the call timeout). Members up to the horizon are ruled out for good anyway.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// A member as some message names it. `seq` is its place in the room's join order
/// (`lua/join.lua`); 0 when unknown (a message from an older instance).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    pub id: String,
    pub owner: String,
    pub seq: u64,
}

/// A member as the storage records it: its place in the join order, its owner, its PeerInfo.
#[derive(Clone, Debug)]
pub struct Member {
    pub seq: u64,
    pub owner: String,
    pub info: PeerInfo,
}

impl Member {
    pub fn to_known(&self) -> Known {
        Known {
            id: self.info.id.clone(),
            owner: self.owner.clone(),
            seq: self.seq,
        }
    }
}

/// A room event for one local member.
#[derive(Clone, Debug)]
pub enum Event {
    Joined(Known),
    Left(String),
}

/// `names` is first pruned at this size, then whenever it doubles what was left.
const PRUNE_AT: usize = 64;

/// The shared copy of `id` in `names`, added if missing.
fn intern(names: &mut HashSet<Arc<str>>, id: &str) -> Arc<str> {
    if let Some(name) = names.get(id) {
        return name.clone();
    }
    let name: Arc<str> = Arc::from(id);
    names.insert(name.clone());
    name
}

/// What one local member was told: the members (shared ids) with their seq, sorted by id and
/// exact in size. Every member of a room holds one, of the room's size: a hash map of 9 took
/// ~330 bytes where this takes 216 (rooms hold at most `--max-room-peers`, 32 by default).
#[derive(Debug, Default)]
struct Told(Vec<(Arc<str>, u64)>);

impl Told {
    fn find(&self, id: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(id))
    }

    fn contains_key(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn insert(&mut self, id: Arc<str>, seq: u64) {
        match self.find(&id) {
            Ok(i) => self.0[i].1 = seq,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (id, seq));
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<u64> {
        let i = self.find(id).ok()?;
        Some(self.0.remove(i).1)
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &u64)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl FromIterator<(Arc<str>, u64)> for Told {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, u64)>>(iter: I) -> Self {
        let mut v: Vec<(Arc<str>, u64)> = iter.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v.shrink_to_fit();
        Told(v)
    }
}

pub(crate) struct RoomView {
    /// Tells this view from a later one of the same room: a lookup made for an earlier view is
    /// not learned into a later one, which never saw the departures in between.
    pub epoch: u64,
    /// Local member → the members it was told of, with their seq. The ids are shared through
    /// `names` (a room of n local members holds n² entries: one copy of each id, not n).
    told: HashMap<String, Told>,
    /// The ids `told` refers to; pruned of unreferenced ones when it doubles (see [`intern`]).
    names: HashSet<Arc<str>>,
    prune_at: usize,
    /// Remote member → (owner, seq).
    routes: HashMap<String, (String, u64)>,
    gone: HashMap<String, Instant>,
    gone_order: VecDeque<(String, Instant)>,
    /// Members with a seq up to `horizon` that are not in `present` have left.
    horizon: u64,
    present: HashSet<String>,
}

impl RoomView {
    pub(crate) fn new(epoch: u64) -> Self {
        Self {
            epoch,
            told: HashMap::new(),
            names: HashSet::new(),
            prune_at: PRUNE_AT,
            routes: HashMap::new(),
            gone: HashMap::new(),
            gone_order: VecDeque::new(),
            horizon: 0,
            present: HashSet::new(),
        }
    }

    /// Whether news of `id` (joined as `seq`) is older than its departure.
    pub(crate) fn stale(&self, id: &str, seq: u64) -> bool {
        self.gone.contains_key(id)
            || (seq != 0 && seq <= self.horizon && !self.present.contains(id))
    }

    /// A complete read of the room: `members`, every member that joined up to `seq` and has not
    /// left. Two reads at one counter differ only by departures: both count.
    fn observe(&mut self, seq: u64, members: &[Known]) {
        let ids = members.iter().map(|k| k.id.clone());
        if seq > self.horizon {
            self.horizon = seq;
            self.present = ids.take(MAX_PER_ROOM).collect();
        } else if seq == self.horizon {
            let now: HashSet<String> = ids.collect();
            self.present.retain(|id| now.contains(id));
        }
        let gone = &self.gone;
        self.present.retain(|id| !gone.contains_key(id));
    }

    /// Local `peer` (joined as `seq`) was sent `snapshot`, every member then, itself included.
    pub(crate) fn add_local(&mut self, instance: &str, peer: &str, seq: u64, snapshot: &[Known]) {
        self.observe(seq, snapshot);
        let names = &mut self.names;
        let told = snapshot
            .iter()
            .filter(|k| k.id != peer)
            .take(MAX_PER_ROOM)
            .map(|k| (intern(names, &k.id), k.seq))
            .collect();
        self.told.insert(peer.to_owned(), told);
        self.prune();
        for k in snapshot {
            self.learn(instance, k);
        }
    }

    /// Applies an event `peer` was sent while its join was in flight (it got the frame).
    pub(crate) fn replay(&mut self, instance: &str, peer: &str, ev: &Event) {
        match ev {
            Event::Joined(k) => {
                self.learn(instance, k);
                if let Some(told) = self.told.get_mut(peer) {
                    if k.id != peer && told.len() < MAX_PER_ROOM {
                        told.insert(intern(&mut self.names, &k.id), k.seq);
                    }
                }
                self.prune();
            }
            Event::Left(id) => {
                self.depart(id);
                if let Some(told) = self.told.get_mut(peer) {
                    told.remove(id.as_str());
                }
            }
        }
    }

    /// The members `peer` was told of that have left meanwhile (its snapshot was older than
    /// their departure, whose `peer_left` it did not get): they are dropped and returned, so it
    /// is told now, once.
    pub(crate) fn reconcile(&mut self, peer: &str) -> Vec<String> {
        let Some(told) = self.told.get(peer) else {
            return Vec::new();
        };
        let left: Vec<String> = told
            .iter()
            .filter(|(id, seq)| self.stale(id, **seq))
            .map(|(id, _)| id.to_string())
            .collect();
        if let Some(told) = self.told.get_mut(peer) {
            for id in &left {
                told.remove(id.as_str());
            }
        }
        left
    }

    /// Forgets the names no member's record refers to any more, once `names` has doubled since
    /// the last time: rooms live for days and see members come and go.
    fn prune(&mut self) {
        if self.names.len() >= self.prune_at {
            self.names.retain(|name| Arc::strong_count(name) > 1);
            self.prune_at = (2 * self.names.len()).max(PRUNE_AT);
        }
    }

    /// Returns true when the room has no local member left (the view is to be dropped).
    pub(crate) fn remove_local(&mut self, peer: &str) -> bool {
        self.told.remove(peer);
        self.told.is_empty()
    }

    /// Whether local `peer` is to be sent `ev`; records that it was. A peer without a record
    /// (cannot happen for a recorded membership) gets everything.
    pub(crate) fn tell(&mut self, peer: &str, ev: &Event) -> bool {
        let stale = matches!(ev, Event::Joined(k) if self.stale(&k.id, k.seq));
        let Some(told) = self.told.get_mut(peer) else {
            return true;
        };
        match ev {
            Event::Joined(k) => {
                if stale || k.id == peer || told.contains_key(k.id.as_str()) {
                    return false;
                }
                if told.len() < MAX_PER_ROOM {
                    told.insert(intern(&mut self.names, &k.id), k.seq);
                }
                self.prune();
                true
            }
            Event::Left(id) => told.remove(id.as_str()).is_some(),
        }
    }

    /// Caches a remote member's owner, unless the news is stale.
    pub(crate) fn learn(&mut self, instance: &str, k: &Known) {
        if k.owner == instance || self.stale(&k.id, k.seq) {
            return;
        }
        if self.routes.len() < MAX_PER_ROOM || self.routes.contains_key(&k.id) {
            self.routes.insert(k.id.clone(), (k.owner.clone(), k.seq));
        }
    }

    pub(crate) fn route(&self, peer: &str) -> Option<&str> {
        self.routes.get(peer).map(|(owner, _)| owner.as_str())
    }

    pub(crate) fn forget_route(&mut self, peer: &str) {
        self.routes.remove(peer);
    }

    pub(crate) fn clear_routes(&mut self) {
        self.routes.clear();
    }

    /// `id` left the room: nothing older may bring it back.
    pub(crate) fn depart(&mut self, id: &str) {
        self.routes.remove(id);
        self.present.remove(id);
        let now = Instant::now();
        while let Some((old, at)) = self.gone_order.front() {
            if now.duration_since(*at) < TOMBSTONE_TTL && self.gone_order.len() < MAX_TOMBSTONES {
                break;
            }
            self.gone.remove(old);
            self.gone_order.pop_front();
        }
        if !self.gone.contains_key(id) {
            self.gone.insert(id.to_owned(), now);
            self.gone_order.push_back((id.to_owned(), now));
        }
    }

    /// A fresh read of the room: `members`, read after the join counter was `counter` (`None`:
    /// the room is gone). Returns what the local members missed: `peer_left` for every member
    /// the read shows gone, to whoever was told of it; `peer_joined` for members a local member
    /// was not told of, to those the read lists (one it does not list joined after the read,
    /// so its own snapshot is newer).
    pub(crate) fn repair(
        &mut self,
        instance: &str,
        counter: Option<u64>,
        members: &[Member],
    ) -> Vec<(String, ServerMessage)> {
        let known: Vec<Known> = members.iter().map(Member::to_known).collect();
        let listed: HashSet<&str> = known.iter().map(|k| k.id.as_str()).collect();
        if let Some(c) = counter {
            self.observe(c, &known);
        }
        // Absent from the read and joined before it: gone. Joined after it: not judged here.
        let before = counter.unwrap_or(u64::MAX);
        let absent = |(id, seq): (&str, u64)| !listed.contains(id) && seq <= before;
        let departed: HashSet<String> = self
            .routes
            .iter()
            .map(|(id, (_, seq))| (id.as_str(), *seq))
            .chain(
                self.told
                    .values()
                    .flat_map(|t| t.iter().map(|(id, s)| (&**id, *s))),
            )
            .filter(|e| absent(*e))
            .map(|(id, _)| id.to_owned())
            .collect();
        for id in &departed {
            self.depart(id);
        }
        let mut out = Vec::new();
        let locals: Vec<String> = self.told.keys().cloned().collect();
        for local in locals {
            for id in self.reconcile(&local) {
                out.push((local.clone(), ServerMessage::PeerLeft { peer_id: id }));
            }
        }
        let fresh: Vec<&Member> = members
            .iter()
            .filter(|m| !self.stale(&m.info.id, m.seq))
            .collect();
        for (local, told) in self.told.iter_mut() {
            if !listed.contains(local.as_str()) {
                continue;
            }
            for m in &fresh {
                if m.info.id == *local || told.contains_key(m.info.id.as_str()) {
                    continue;
                }
                if told.len() < MAX_PER_ROOM {
                    told.insert(intern(&mut self.names, &m.info.id), m.seq);
                }
                let peer = m.info.clone();
                out.push((local.clone(), ServerMessage::PeerJoined { peer }));
            }
        }
        self.prune();
        for k in &known {
            self.learn(instance, k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids are shared between the members' records, and a room's churn does not grow them.
    #[test]
    fn names_are_shared_and_pruned() {
        let mut v = RoomView::new(1);
        let k = |id: &str, seq| Known {
            id: id.into(),
            owner: "me".into(),
            seq,
        };
        v.add_local("me", "a", 1, &[k("a", 1)]);
        v.add_local("me", "b", 2, &[k("a", 1), k("b", 2)]);
        assert!(v.tell("a", &Event::Joined(k("b", 2))));
        // One copy of "a" and of "b", however many records name them.
        assert_eq!(v.names.len(), 2);
        for n in 3..1000u64 {
            let id = format!("p{n}");
            assert!(v.tell("a", &Event::Joined(k(&id, n))));
            assert!(v.tell("b", &Event::Joined(k(&id, n))));
            assert!(v.tell("a", &Event::Left(id.clone())));
            assert!(v.tell("b", &Event::Left(id)));
        }
        assert!(
            v.names.len() <= 2 * PRUNE_AT,
            "{} names kept",
            v.names.len()
        );
    }
    use crate::protocol::Role;

    const ME: &str = "me";

    fn k(id: &str, owner: &str, seq: u64) -> Known {
        Known {
            id: id.into(),
            owner: owner.into(),
            seq,
        }
    }

    fn m(id: &str, owner: &str, seq: u64) -> Member {
        Member {
            seq,
            owner: owner.into(),
            info: PeerInfo {
                id: id.into(),
                role: Role::Client,
                joined_at: 0,
                supported_transports: Vec::new(),
                preferred_transport: None,
                metadata: None,
            },
        }
    }

    fn names(out: &[(String, ServerMessage)]) -> Vec<String> {
        let mut names: Vec<String> = out
            .iter()
            .map(|(to, msg)| match msg {
                ServerMessage::PeerJoined { peer } => format!("{to}+{}", peer.id),
                ServerMessage::PeerLeft { peer_id } => format!("{to}-{peer_id}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        names.sort();
        names
    }

    /// A local `l` (seq 2) joined after remote `h` (seq 1).
    fn view() -> RoomView {
        let mut v = RoomView::new(1);
        v.add_local(ME, "l", 2, &[k("h", "b", 1), k("l", ME, 2)]);
        v
    }

    #[test]
    fn repair_tells_what_was_missed_once() {
        let mut v = view();
        // Missed: h left, x joined (seq 3).
        let read = [m("l", ME, 2), m("x", "b", 3)];
        assert_eq!(names(&v.repair(ME, Some(3), &read)), ["l+x", "l-h"]);
        assert_eq!(v.route("x"), Some("b"));
        assert_eq!(v.route("h"), None);
        // The same read again, and the live events arriving late: nothing twice.
        assert!(v.repair(ME, Some(3), &read).is_empty());
        assert!(!v.tell("l", &Event::Joined(k("x", "b", 3))));
        assert!(!v.tell("l", &Event::Left("h".into())));
        // The late peer_joined of h does not bring it back either.
        assert!(!v.tell("l", &Event::Joined(k("h", "b", 1))));
        v.learn(ME, &k("h", "b", 1));
        assert_eq!(v.route("h"), None);
    }

    #[test]
    fn a_live_join_during_the_repair_is_not_repeated_or_taken_back() {
        let mut v = view();
        // Read at counter 2; y (seq 3) joins after the read and its peer_joined arrives first.
        assert!(v.tell("l", &Event::Joined(k("y", "b", 3))));
        let read = [m("h", "b", 1), m("l", ME, 2)];
        assert!(
            v.repair(ME, Some(2), &read).is_empty(),
            "y joined after the read"
        );
        // A departure after the read, handled before its result: not re-announced.
        assert!(v.tell("l", &Event::Left("h".into())));
        v.depart("h");
        assert!(v.repair(ME, Some(2), &read).is_empty());
    }

    #[test]
    fn an_older_read_takes_nothing_back() {
        let mut v = view();
        // n joins after z (seq 3), whose peer_joined l missed; a read from before z joined
        // neither takes z from n nor tells l (a later read will).
        v.add_local(
            ME,
            "n",
            4,
            &[k("h", "b", 1), k("l", ME, 2), k("z", "b", 3), k("n", ME, 4)],
        );
        let read = [m("h", "b", 1), m("l", ME, 2)];
        assert!(v.repair(ME, Some(2), &read).is_empty());
        assert_eq!(v.route("z"), Some("b"));
        let read = [m("h", "b", 1), m("l", ME, 2), m("z", "b", 3), m("n", ME, 4)];
        // (n's own peer_joined went to l through the hub, not this view: l is told here.)
        assert_eq!(names(&v.repair(ME, Some(4), &read)), ["l+n", "l+z"]);
    }

    #[test]
    fn stale_news_never_resurrects_a_departed_member() {
        let mut v = view();
        v.learn(ME, &k("x", "b", 3));
        v.depart("x");
        for seq in [0, 3] {
            v.learn(ME, &k("x", "b", seq));
            assert_eq!(v.route("x"), None, "seq {seq}");
        }
        // Below the horizon, absent from the snapshot: left before l joined, for good.
        assert!(v.stale("old", 1));
        assert!(!v.stale("new", 5));
        // A snapshot listing a departed member: the newcomer is told it left.
        v.add_local(ME, "n", 4, &[k("h", "b", 1), k("x", "b", 3), k("n", ME, 4)]);
        assert_eq!(v.reconcile("n"), ["x"]);
        assert_eq!(v.route("x"), None);
    }

    #[test]
    fn tombstones_are_bounded() {
        let mut v = RoomView::new(1);
        for i in 0..(MAX_TOMBSTONES * 3) {
            v.depart(&format!("p{i}"));
        }
        assert!(v.gone.len() <= MAX_TOMBSTONES && v.gone_order.len() <= MAX_TOMBSTONES);
        assert!(v.stale(&format!("p{}", MAX_TOMBSTONES * 3 - 1), 0));
    }
}
