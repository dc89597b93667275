//! Who waits for whom, for the in-process engine: per session, the fresh host sockets and the
//! joiner sockets waiting for each other, and the session's last host event (its mark). The
//! Redis engine does the same in `lua/relay_arrive.lua`, `relay_forget.lua` and
//! `relay_mark.lua`; both pass the same conformance tests.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Arrival, Endpoint, Side};

/// Sessions with nobody waiting and a mark older than this are forgotten (a host socket
/// arriving later is not fresh either way).
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Lists {
    hosts: VecDeque<Endpoint>,
    joiners: VecDeque<Endpoint>,
    mark: Option<Instant>,
}

#[derive(Default)]
pub struct Queues {
    rooms: HashMap<String, Lists>,
}

impl Queues {
    pub fn arrive(
        &mut self,
        room: &str,
        side: Side,
        me: &Endpoint,
        fresh: Duration,
        max_waiting: usize,
        now: Instant,
    ) -> Arrival {
        let lists = self.rooms.entry(room.to_owned()).or_default();
        let (theirs, mine) = match side {
            Side::Host => {
                if lists.mark.is_none_or(|m| now.duration_since(m) > fresh) {
                    return Arrival::Late;
                }
                (&mut lists.joiners, &mut lists.hosts)
            }
            Side::Joiner => (&mut lists.hosts, &mut lists.joiners),
        };
        if let Some(other) = theirs.pop_front() {
            return Arrival::Paired(other);
        }
        if mine.len() >= max_waiting {
            return Arrival::Crowded;
        }
        mine.push_back(me.clone());
        Arrival::Queued
    }

    pub fn forget(&mut self, room: &str, me: &Endpoint) {
        if let Some(lists) = self.rooms.get_mut(room) {
            lists.hosts.retain(|e| e != me);
            lists.joiners.retain(|e| e != me);
        }
    }

    pub fn mark(&mut self, room: &str, now: Instant) {
        self.rooms.retain(|_, l| {
            !l.hosts.is_empty()
                || !l.joiners.is_empty()
                || l.mark.is_some_and(|m| now.duration_since(m) < FORGET_AFTER)
        });
        self.rooms.entry(room.to_owned()).or_default().mark = Some(now);
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

    #[test]
    fn fresh_hosts_and_joiners_meet_in_order() {
        let mut q = Queues::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(3);
        assert_eq!(
            q.arrive("s", Side::Host, &ep("h0"), w, 8, t0),
            Arrival::Late,
            "no mark yet"
        );
        q.mark("s", t0);
        assert_eq!(
            q.arrive("s", Side::Host, &ep("h1"), w, 8, t0),
            Arrival::Queued
        );
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j1"), w, 8, t0),
            Arrival::Paired(ep("h1"))
        );
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j2"), w, 8, t0),
            Arrival::Queued
        );
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j3"), w, 8, t0),
            Arrival::Queued
        );
        q.forget("s", &ep("j2"));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            q.arrive("s", Side::Host, &ep("h2"), w, 8, later),
            Arrival::Paired(ep("j3"))
        );
        let late = t0 + Duration::from_secs(19);
        assert_eq!(
            q.arrive("s", Side::Host, &ep("r"), w, 8, late),
            Arrival::Late,
            "a reconnect"
        );
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j4"), w, 1, late),
            Arrival::Queued
        );
        assert_eq!(
            q.arrive("s", Side::Joiner, &ep("j5"), w, 1, late),
            Arrival::Crowded
        );
    }
}
