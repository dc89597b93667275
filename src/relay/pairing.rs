//! Who waits for whom, for the in-process engine: per session, the fresh host sockets and the
//! joiner sockets waiting for each other, and the session's last host event (its mark). The
//! Redis engine does the same in `lua/relay_arrive.lua`, `relay_forget.lua` and
//! `relay_mark.lua`; both pass the same conformance tests.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Arrival, Endpoint, Limits, Mark, Side};

/// Sessions with nobody waiting and a mark older than this are forgotten (a host socket
/// arriving later is not fresh either way).
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Lists {
    /// Fresh host sockets (one at most), joiners and late host sockets waiting, with their
    /// arrival, oldest first.
    hosts: VecDeque<(Instant, Endpoint)>,
    joiners: VecDeque<(Instant, Endpoint)>,
    late: VecDeque<(Instant, Endpoint)>,
    /// Milliseconds since `Queues::origin` (0: none), as `Mark` carries them.
    mark: u64,
}

/// Drops entries older than `stale` from the head of a list (arrival order).
fn purge(list: &mut VecDeque<(Instant, Endpoint)>, now: Instant, stale: Duration) {
    while list
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > stale)
    {
        list.pop_front();
    }
}

pub struct Queues {
    rooms: HashMap<String, Lists>,
    origin: Instant,
    /// Forgotten sessions are pruned when `rooms` reaches this many (then it doubles from what
    /// remains), so pruning costs O(1) per call amortized instead of a scan each time.
    prune_at: usize,
}

/// Sessions kept before the first prune.
const PRUNE_FROM: usize = 64;

impl Default for Queues {
    fn default() -> Self {
        Queues {
            rooms: HashMap::new(),
            origin: Instant::now(),
            prune_at: PRUNE_FROM,
        }
    }
}

impl Queues {
    fn ms(&self, now: Instant) -> u64 {
        // 1 at the origin: 0 means "no mark".
        now.saturating_duration_since(self.origin).as_millis() as u64 + 1
    }

    /// As `lua/relay_arrive.lua`: a host socket is fresh when it comes within `p.fresh` of the
    /// mark and no fresh one waits already (the acceptor has one socket out at a time); other
    /// host sockets wait as late ones, which a joiner tries (newest first) when no fresh one
    /// waits.
    pub fn arrive(
        &mut self,
        room: &str,
        side: Side,
        me: &Endpoint,
        p: Limits,
        now: Instant,
    ) -> Arrival {
        let ms = self.ms(now);
        self.prune(now, p.stale);
        let lists = self.rooms.entry(room.to_owned()).or_default();
        for list in [&mut lists.hosts, &mut lists.joiners, &mut lists.late] {
            purge(list, now, p.stale);
        }
        let (list, arrival) = match side {
            Side::Host => {
                let fresh = lists.mark != 0
                    && ms.saturating_sub(lists.mark) <= p.fresh.as_millis() as u64
                    && lists.hosts.is_empty();
                if !fresh {
                    (&mut lists.late, Arrival::Late)
                } else if let Some((_, joiner)) = lists.joiners.pop_front() {
                    return Arrival::Paired(joiner);
                } else {
                    (&mut lists.hosts, Arrival::Queued)
                }
            }
            Side::Joiner => {
                let host = lists.hosts.pop_front().or_else(|| lists.late.pop_back());
                if let Some((_, host)) = host {
                    return Arrival::Paired(host);
                }
                (&mut lists.joiners, Arrival::Queued)
            }
        };
        // The fresh list holds one at most by construction; the others are capped.
        let fresh = side == Side::Host && arrival == Arrival::Queued;
        if !fresh && list.len() >= p.max_waiting {
            return Arrival::Crowded;
        }
        list.push_back((now, me.clone()));
        arrival
    }

    pub fn forget(&mut self, room: &str, me: &Endpoint) {
        if let Some(lists) = self.rooms.get_mut(room) {
            for list in [&mut lists.hosts, &mut lists.joiners, &mut lists.late] {
                list.retain(|(_, e)| e != me);
            }
        }
    }

    /// Forgets the sessions with nobody waiting (stale entries aside) and no recent mark, once
    /// there are `prune_at` of them.
    fn prune(&mut self, now: Instant, stale: Duration) {
        if self.rooms.len() < self.prune_at {
            return;
        }
        let (ms, forget) = (self.ms(now), FORGET_AFTER.as_millis() as u64);
        self.rooms.retain(|_, l| {
            for list in [&mut l.hosts, &mut l.joiners, &mut l.late] {
                purge(list, now, stale);
            }
            !l.hosts.is_empty()
                || !l.joiners.is_empty()
                || !l.late.is_empty()
                || ms.saturating_sub(l.mark) < forget
        });
        self.prune_at = (2 * self.rooms.len()).max(PRUNE_FROM);
    }

    pub fn mark(&mut self, room: &str, now: Instant) -> Mark {
        let ms = self.ms(now);
        // (Entries age out with the arrivals' own limits; here only empty sessions go.)
        self.prune(now, Duration::MAX);
        let lists = self.rooms.entry(room.to_owned()).or_default();
        let prev = std::mem::replace(&mut lists.mark, ms);
        Mark { set: ms, prev }
    }

    pub fn unmark(&mut self, room: &str, mark: Mark) {
        if let Some(lists) = self.rooms.get_mut(room) {
            if lists.mark == mark.set {
                lists.mark = mark.prev;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint {
            owner: "i".into(),
            socket: s.into(),
        }
    }

    fn limits(max_waiting: usize) -> Limits {
        Limits {
            fresh: Duration::from_secs(3),
            max_waiting,
            stale: Duration::from_secs(30),
        }
    }

    #[test]
    fn fresh_hosts_and_joiners_meet_in_order() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let p = limits(8);
        let host = |q: &mut Queues, s: &str, at| q.arrive("s", Side::Host, &ep(s), p, at);
        let joiner = |q: &mut Queues, s: &str, at| q.arrive("s", Side::Joiner, &ep(s), p, at);
        assert_eq!(host(&mut q, "h0", t0), Arrival::Late, "no mark yet");
        q.forget("s", &ep("h0"));
        q.mark("s", t0);
        assert_eq!(host(&mut q, "h1", t0), Arrival::Queued);
        let r0 = host(&mut q, "r0", t0);
        assert_eq!(r0, Arrival::Late, "one fresh socket at a time");
        q.forget("s", &ep("r0"));
        assert_eq!(joiner(&mut q, "j1", t0), Arrival::Paired(ep("h1")));
        assert_eq!(joiner(&mut q, "j2", t0), Arrival::Queued);
        assert_eq!(joiner(&mut q, "j3", t0), Arrival::Queued);
        q.forget("s", &ep("j2"));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(host(&mut q, "h2", later), Arrival::Paired(ep("j3")));
        let late = t0 + Duration::from_secs(19);
        assert_eq!(host(&mut q, "r", late), Arrival::Late, "a reconnect");
        assert_eq!(host(&mut q, "r2", late), Arrival::Late);
        // No fresh socket: a joiner tries the newest late one (the approval check tells).
        assert_eq!(joiner(&mut q, "j4", late), Arrival::Paired(ep("r2")));
        let one = limits(1);
        let r3 = q.arrive("s", Side::Host, &ep("r3"), one, late);
        assert_eq!(r3, Arrival::Crowded, "late ones are capped");
        assert_eq!(joiner(&mut q, "j5", late), Arrival::Paired(ep("r")));
        let j6 = q.arrive("s", Side::Joiner, &ep("j6"), one, late);
        assert_eq!(j6, Arrival::Queued);
        let j7 = q.arrive("s", Side::Joiner, &ep("j7"), one, late);
        assert_eq!(j7, Arrival::Crowded);
    }

    #[test]
    fn a_mark_is_taken_back_only_if_it_is_still_the_last() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let p = limits(8);
        let first = q.mark("s", t0);
        let wrong = q.mark("s", t0 + Duration::from_secs(10));
        q.unmark("s", wrong);
        let at = t0 + Duration::from_secs(11);
        let h = q.arrive("s", Side::Host, &ep("h"), p, at);
        assert_eq!(h, Arrival::Late, "back to the first mark");
        q.forget("s", &ep("h"));
        let _again = q.mark("s", t0 + Duration::from_secs(12));
        q.unmark("s", first);
        let at = t0 + Duration::from_secs(13);
        let h2 = q.arrive("s", Side::Host, &ep("h2"), p, at);
        assert_eq!(h2, Arrival::Queued, "a later mark stays");
    }

    #[test]
    fn forgotten_sessions_are_pruned_as_they_grow() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        for i in 0..100 {
            q.mark(&format!("s{i}"), t0);
        }
        assert!(q.rooms.len() >= 100, "recent marks are kept");
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        for i in 0..200 {
            q.mark(&format!("t{i}"), later);
        }
        assert!(
            q.rooms.keys().all(|r| r.starts_with('t')),
            "the old ones went"
        );
    }

    #[test]
    fn stale_entries_are_skipped() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let p = limits(8);
        q.mark("s", t0);
        assert_eq!(
            q.arrive("s", Side::Host, &ep("gone"), p, t0),
            Arrival::Queued
        );
        let t1 = t0 + Duration::from_secs(31);
        q.mark("s", t1);
        let h = q.arrive("s", Side::Host, &ep("h"), p, t1);
        assert_eq!(h, Arrival::Queued, "the stale one does not count");
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j"), p, t1),
            Arrival::Paired(ep("h"))
        );
    }
}
