//! Room events for the router's local members: recording a join (its snapshot, what it was
//! sent while in flight), telling members of joins and departures at most once each, frames
//! from other instances, and applying a repair read. An `impl Table` of its own so `mod.rs`
//! keeps to the router's interface.

use foldhash::{HashMap, HashMapExt};

use super::view::{Event, Known, Member, RoomView, MAX_PER_ROOM};
use super::{Groups, Membership, Table};
use crate::peers::{Class, Held, Queued, RemoteSender};
use crate::protocol::{Frame, ServerMessage};

/// Room events queued for a local socket whose join script has run but whose `Joined` has not
/// reached the hub (see [`Table::deliver_member`]); replayed into the view when it does.
pub(super) struct InFlight {
    pub room: String,
    pub events: Vec<Event>,
    /// A repair read listed the socket before its join was recorded: it needs one of its own.
    pub missed_repair: bool,
}

impl InFlight {
    pub(super) fn new(room: &str) -> Self {
        Self {
            room: room.to_owned(),
            events: Vec::new(),
            missed_repair: false,
        }
    }

    fn push(&mut self, ev: Event) {
        if self.events.len() < MAX_PER_ROOM {
            self.events.push(ev);
        }
    }
}

impl Table {
    /// Records a join: the view learns the snapshot, replays what the socket was sent while its
    /// join was in flight, and tells it now of snapshot members known to have left since. With
    /// `frame` (a fresh join), tells the other local members; returns the remote ones.
    pub(super) fn joined(
        &mut self,
        room: &str,
        peer: &str,
        owner: String,
        members: Vec<Known>,
        frame: Option<Frame>,
    ) -> Groups {
        let again = self.joined.get(peer).is_some_and(|m| m.room == room);
        let membership = Membership {
            room: room.to_owned(),
            owner,
        };
        self.joined.insert(peer.to_owned(), membership);
        if !self.rooms.contains_key(room) {
            self.epochs += 1;
            self.rooms
                .insert(room.to_owned(), RoomView::new(self.epochs));
        }
        let view = self.rooms.get_mut(room).expect("inserted above");
        let me = members.iter().find(|k| k.id == peer).cloned();
        if again {
            // A repeated join changes nothing: the member keeps what it was told.
            for k in &members {
                view.learn(&self.id, k);
            }
        } else {
            let seq = me.as_ref().map_or(0, |k| k.seq);
            view.add_local(&self.id, peer, seq, &members);
            if let Some(f) = self.inflight.remove(peer).filter(|f| f.room == room) {
                for ev in &f.events {
                    view.replay(&self.id, peer, ev);
                }
                if f.missed_repair {
                    self.pending.insert(room.to_owned());
                    self.wake = true;
                }
            }
            for gone in view.reconcile(peer) {
                let frame = ServerMessage::PeerLeft { peer_id: gone }.to_frame();
                self.peers.deliver(peer, &frame, Class::Control);
            }
        }
        match (frame, me) {
            (Some(frame), Some(me)) => {
                let others = members.into_iter().filter(|k| k.id != peer).collect();
                self.fanout(room, others, &Event::Joined(me), &frame)
            }
            _ => Vec::new(),
        }
    }

    /// Tells the local `recipients` of `ev` and returns the others grouped by owner.
    pub(super) fn fanout(
        &mut self,
        room: &str,
        recipients: Vec<Known>,
        ev: &Event,
        frame: &Frame,
    ) -> Groups {
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for k in recipients {
            if k.owner == self.id {
                self.tell(room, &k.id, ev, frame);
            } else {
                groups.entry(k.owner).or_default().push(k.id);
            }
        }
        groups.into_iter().collect()
    }

    /// Delivers room event `ev` (as `frame`) to local `peer`, unless it was told already (or
    /// the news is stale). A socket whose join is in flight gets it and it is logged for the
    /// join (see [`Table::deliver_member`]).
    pub(super) fn tell(&mut self, room: &str, peer: &str, ev: &Event, frame: &Frame) {
        match self.joined.get(peer) {
            Some(m) if m.room == room => {
                if self.rooms.get_mut(room).is_none_or(|v| v.tell(peer, ev)) {
                    self.peers.deliver(peer, frame, Class::Control);
                }
            }
            Some(_) => {}
            None => {
                if self.peers.deliver(peer, frame, Class::Control) != Queued::Absent {
                    let f = self
                        .inflight
                        .entry(peer.to_owned())
                        .or_insert_with(|| InFlight::new(room));
                    if f.room != room {
                        *f = InFlight::new(room);
                    }
                    f.push(ev.clone());
                }
            }
        }
    }

    /// Delivers to a local socket that Redis lists as a member of `room` owned by this
    /// instance. That is a recorded membership, or a join in flight: its script has run, but
    /// its `Joined` has not reached the hub yet, and a broadcast or signal computed from the
    /// script's member list (e.g. a concurrent joiner's `peer_joined`) can overtake it. Such a
    /// frame is queued behind nothing: the socket writes `join_success` before its queue.
    pub(super) fn deliver_member(
        &mut self,
        room: &str,
        peer: &str,
        frame: &Frame,
        class: Class,
    ) -> Queued {
        if self.is_member_here(room, peer) {
            self.peers.deliver(peer, frame, class)
        } else {
            Queued::Absent
        }
    }

    /// `peer` is a local member of `room`, or a local socket whose join is in flight.
    fn is_member_here(&self, room: &str, peer: &str) -> bool {
        match self.joined.get(peer) {
            Some(m) => m.room == room,
            None => self.peers.contains(peer),
        }
    }

    pub(super) fn forget_local(&mut self, room: &str, peer: &str) {
        if let Some(view) = self.rooms.get_mut(room) {
            if view.remove_local(peer) {
                // No more broadcasts for this room reach us: the view would go stale.
                self.rooms.remove(room);
            }
        }
    }

    pub(super) fn want_repair_all(&mut self) {
        if !self.rooms.is_empty() {
            self.pending.extend(self.rooms.keys().cloned());
            self.wake = true;
        }
    }

    pub(super) fn repair(
        &mut self,
        room: &str,
        epoch: u64,
        counter: Option<u64>,
        members: &[Member],
    ) {
        let Some(view) = self.rooms.get_mut(room) else {
            return;
        };
        if view.epoch != epoch {
            // The view was replaced after the read was asked for: read again for this one.
            self.pending.insert(room.to_owned());
            self.wake = true;
            return;
        }
        for (peer, msg) in view.repair(&self.id, counter, members) {
            self.peers.deliver(&peer, &msg.to_frame(), Class::Control);
        }
        // Sockets of ours the read lists but whose joins are not recorded yet: not repaired by
        // this read, so one follows their join.
        for m in members {
            let id = &m.info.id;
            if m.owner == self.id && !self.joined.contains_key(id) && self.peers.contains(id) {
                let f = self
                    .inflight
                    .entry(id.clone())
                    .or_insert_with(|| InFlight::new(room));
                if f.room == room {
                    f.missed_repair = true;
                }
            }
        }
    }

    /// Frames from another instance for local members `to` of `room` (see
    /// [`super::Router::deliver_remote`]).
    pub(super) fn deliver_remote(
        &mut self,
        room: &str,
        to: &[&str],
        frame: &Frame,
        ev: Option<Event>,
        from: Option<RemoteSender<'_>>,
    ) -> Remote {
        if let Some(view) = self.rooms.get_mut(room) {
            match &ev {
                Some(Event::Left(left)) => view.depart(left),
                Some(Event::Joined(k)) => view.learn(&self.id, k),
                None => {}
            }
        }
        let mut out = Remote::default();
        for &peer in to {
            let Some(ev) = &ev else {
                let queued = if self.is_member_here(room, peer) {
                    self.peers.deliver_remote(peer, frame, from)
                } else {
                    Queued::Absent
                };
                match queued {
                    Queued::Yes => {}
                    Queued::Hold(held) => out.holds.push(held),
                    Queued::Full(_) => out.refused.push((peer.to_owned(), true)),
                    Queued::Absent => out.refused.push((peer.to_owned(), false)),
                }
                continue;
            };
            self.tell(room, peer, ev, frame);
        }
        out
    }
}

/// What became of a relayed frame from another instance (see [`Table::deliver_remote`]).
#[derive(Debug, Default)]
pub struct Remote {
    /// Recipients that did not get it, each with whether its queue was full (else it is no
    /// member here any more): the sender is told.
    pub refused: Vec<(String, bool)>,
    /// Senders to hold: a recipient's queue is past its relay share.
    pub holds: Vec<Held>,
}
