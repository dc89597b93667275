//! What instances publish to each other, and the member records of `{S}:peers` as parsed.
//!
//! A bus message is a small JSON header, a newline, and (for `Deliver`) the frame itself, raw:
//! the frame is neither escaped into the header nor parsed again, and the receiver hands a
//! slice of the message it received to its sockets (see [`decode`]).
//!
//! An instance listens on two channels (`Keys::channels`): its *bus* channel takes a pack of
//! messages ([`Pack`]: what the outbox had queued for it, one `PUBLISH` for all), its legacy
//! channel one message per `PUBLISH`, as instances before the packs sent them. A pack
//! published to an instance that does not listen on its bus channel (an older one, during a
//! rolling deploy) reaches nobody, and the outbox sends its messages again one by one on the
//! legacy channel (`super::outbox`).

use std::collections::BTreeMap;
use std::io::Write;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};

use super::keys::Keys;
use crate::protocol::{valid_id, Frame, PeerInfo, Role};
use crate::router::{Known, Member};

/// The header of what instances publish to each other's channels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Bus<'a> {
    /// The self-message proving this instance's subscription still works.
    Tick { id: String },
    /// The frame after the header, for some members of `room` held by the receiving instance.
    /// Written by [`Deliver::write`], not serde (`encode_raw`).
    #[serde(borrow, skip_serializing)]
    Deliver(Deliver<'a>),
    /// Session `room` was closed (Admin API): the receiver closes the sockets of `peers` (the
    /// members it owns) and any other local member of the room.
    Close { room: String, peers: Vec<String> },
    /// A piece for relay socket `to` of the receiving instance (`crate::relay::Piece`, kind
    /// `p`); a client frame follows the header raw, text or binary.
    Relay {
        to: String,
        p: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<u32>,
    },
    /// Local member `to` is to hold its reading: a recipient of its relays on the sending
    /// instance is past its relay share (`crate::peers::Hold`).
    Hold { to: String },
    /// Local member `to` may read again.
    Release { to: String },
    /// A relayed frame from local member `to` could not be delivered to `peer`.
    Refused {
        room: String,
        to: String,
        peer: String,
        /// The recipient's queue was full (else it is no longer a member).
        full: bool,
    },
}

/// A `Deliver` header's fields: on the wire the same object, `{"t":"deliver",…}`. A struct of
/// its own so that [`decode`] reads the commonest header straight into it: serde's internally
/// tagged path buffers every field of the object first (~5 % of a burst across instances).
/// Its ids are borrowed, from the message read or the values written: ids are plain
/// (`crate::protocol::valid_id`, UUIDs), never escaped, and an owned copy of each was ~3 % of
/// a burst across instances.
#[derive(Debug, Deserialize)]
pub(crate) struct Deliver<'a> {
    pub(crate) room: &'a str,
    pub(crate) to: Vec<&'a str>,
    /// (peer, owner) that just joined: the receiver may cache its owner.
    #[serde(default)]
    pub(crate) joined: Option<(&'a str, &'a str)>,
    /// The join's `seq`, so late news is recognised as such.
    #[serde(default)]
    pub(crate) joined_seq: Option<u64>,
    /// Peer that just left: the receiver forgets its owner.
    #[serde(default)]
    pub(crate) left: Option<&'a str>,
    /// A relayed frame's sender and its instance: told if the frame cannot be delivered.
    #[serde(default)]
    pub(crate) from: Option<(&'a str, &'a str)>,
}

impl Deliver<'_> {
    /// The header's JSON, written by hand: serde_json's writer (every key and value scanned for
    /// escapes, a call per token) was ~5 % of a burst across instances. Ids are plain
    /// (`valid_id`, UUIDs) and go as they are; anything else would go through serde_json.
    fn write(&self, out: &mut Vec<u8>) {
        fn id(out: &mut Vec<u8>, s: &str) {
            if valid_id(s) {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            } else {
                serde_json::to_writer(&mut *out, s).expect("a string serializes");
            }
        }
        fn pair(out: &mut Vec<u8>, key: &[u8], (a, b): (&str, &str)) {
            out.extend_from_slice(key);
            out.push(b'[');
            id(out, a);
            out.push(b',');
            id(out, b);
            out.push(b']');
        }
        out.extend_from_slice(br#"{"t":"deliver","room":"#);
        id(out, self.room);
        out.extend_from_slice(br#","to":["#);
        for (i, to) in self.to.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            id(out, to);
        }
        out.push(b']');
        if let Some(joined) = self.joined {
            pair(out, br#","joined":"#, joined);
        }
        if let Some(seq) = self.joined_seq {
            write!(out, r#","joined_seq":{seq}"#).expect("writes to memory");
        }
        if let Some(left) = self.left {
            out.extend_from_slice(br#","left":"#);
            id(out, left);
        }
        if let Some(from) = self.from {
            pair(out, br#","from":"#, from);
        }
        out.push(b'}');
    }
}

/// A bus message: the header's JSON (which never contains a raw newline), `\n`, the frame.
pub(crate) fn encode(header: &Bus<'_>, frame: Option<&Frame>) -> Vec<u8> {
    encode_raw(header, frame.map_or(&[][..], |f| f.as_bytes()))
}

/// A bus message whose body is any bytes (a relayed client frame, binary or text).
pub(crate) fn encode_raw(header: &Bus<'_>, body: &[u8]) -> Vec<u8> {
    // Room for a header of a few ids up front: grown from empty, the buffer was reallocated
    // (and copied) several times per message, ~10 % of a burst across instances.
    let mut out = Vec::with_capacity(HEADER_ROOM + body.len());
    match header {
        Bus::Deliver(deliver) => deliver.write(&mut out),
        _ => serde_json::to_writer(&mut out, header).expect("bus headers serialize"),
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// A `Deliver` header for one recipient with a sender is ~200 bytes (four 36-byte ids).
const HEADER_ROOM: usize = 256;

/// Messages packed into one argument of a command: each is its length (4 bytes, big-endian),
/// then itself. Written straight into the command (packed into a buffer of its own first, the
/// messages were copied once more: ~1.3 % of a burst across instances).
pub(crate) struct Pack<'a>(pub(crate) Vec<&'a [u8]>);

impl redis::ToRedisArgs for Pack<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.reserve_space_for_args([self.0.iter().map(|m| 4 + m.len()).sum()]);
        let mut arg = out.writer_for_next_arg();
        for m in &self.0 {
            // A message is far below 4 GiB: the outbox holds 16 MiB at most.
            arg.write_all(&(m.len() as u32).to_be_bytes())
                .and_then(|()| arg.write_all(m))
                .expect("writes to memory");
        }
    }
}

impl redis::ToSingleRedisArg for Pack<'_> {}

/// Adds to `pipe` the publish of one message to `instance`, with writes it belongs to (the
/// reaper's, the Admin API's): on its legacy channel, read by every version; in a cluster,
/// which has none, as a pack of one on its bus.
pub(crate) fn publish_one<'a>(
    pipe: &'a mut redis::Pipeline,
    keys: &Keys,
    instance: &str,
    message: &[u8],
) -> &'a mut redis::Pipeline {
    if keys.sharded() {
        pipe.cmd(keys.publish())
            .arg(keys.bus(instance))
            .arg(Pack(vec![message]))
    } else {
        pipe.cmd("PUBLISH").arg(keys.channel(instance)).arg(message)
    }
}

/// The messages of a pack; `None` when it is cut short. Each message of a pack of several is
/// copied out: a frame that a slow recipient keeps queued must not keep the rest of its pack
/// (other recipients' frames, up to 64 of the largest size) alive with it.
pub(crate) fn unpack(payload: Bytes) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut rest = &payload[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let message = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        out.push(message);
    }
    Some(match out[..] {
        [only] => vec![payload.slice_ref(only)],
        _ => out.into_iter().map(Bytes::copy_from_slice).collect(),
    })
}

/// A decoded bus message's body: a JSON frame for the router, or raw bytes for the relay.
pub(crate) enum Body {
    None,
    Frame(Frame),
    Raw(Bytes),
}

/// How every `Deliver` header begins.
const DELIVER_TAG: &[u8] = br#"{"t":"deliver","#;

/// The header (borrowing from the message) and the body (sharing its bytes) of a bus message.
pub(crate) fn decode(payload: &Bytes) -> Option<(Bus<'_>, Body)> {
    // memchr: a byte-at-a-time scan of the header was 2 % of a burst across instances.
    let split = memchr::memchr(b'\n', payload)?;
    let raw = &payload[..split];
    // The tag comes first (serde writes it first): a deliver is read without the tag's detour;
    // its `t` is an unknown field to `Deliver`, skipped.
    let header = if raw.starts_with(DELIVER_TAG) {
        Bus::Deliver(serde_json::from_slice(raw).ok()?)
    } else {
        serde_json::from_slice(raw).ok()?
    };
    let body = payload.slice(split + 1..);
    if matches!(header, Bus::Relay { .. }) {
        return Some((header, Body::Raw(body)));
    }
    if body.is_empty() {
        return Some((header, Body::None));
    }
    Some((header, Body::Frame(Frame::try_from(body).ok()?)))
}

/// The opaque part of a member record (`lua/join.lua`).
#[derive(Serialize, Deserialize)]
pub(crate) struct Blob {
    pub supported_transports: Vec<serde_json::Value>,
    pub preferred_transport: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A room member as stored in Redis: `seq|role|joined_at|owner|blob`.
pub(crate) fn parse_member(id: &str, rec: &str) -> Option<Member> {
    let mut it = rec.splitn(5, '|');
    let seq = it.next()?.parse().ok()?;
    let role = match it.next()? {
        "server" => Role::Server,
        _ => Role::Client,
    };
    let joined_at = it.next()?.parse().ok()?;
    let owner = it.next()?.to_owned();
    let blob: Blob = serde_json::from_str(it.next()?).ok()?;
    Some(Member {
        seq,
        owner,
        info: PeerInfo {
            id: id.to_owned(),
            role,
            joined_at,
            supported_transports: blob.supported_transports,
            preferred_transport: blob.preferred_transport,
            metadata: blob.metadata,
        },
    })
}

/// The owner and seq of a record without parsing the rest.
pub(crate) fn known(id: &str, rec: &str) -> Option<Known> {
    let mut it = rec.split('|');
    let seq = it.next()?.parse().ok()?;
    let owner = it.nth(2)?.to_owned();
    Some(Known {
        id: id.to_owned(),
        owner,
        seq,
    })
}

/// Parses flat `[id, rec, id, rec, ...]` (HGETALL order) into members in join order.
pub(crate) fn parse_members(flat: &[String]) -> Vec<Member> {
    let mut out: Vec<Member> = flat
        .chunks_exact(2)
        .filter_map(|kv| {
            let m = parse_member(&kv[0], &kv[1]);
            if m.is_none() {
                tracing::warn!(peer = %kv[0], "unparsable member record ignored");
            }
            m
        })
        .collect();
    out.sort_by_key(|m| m.seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_travels_raw_after_the_header() {
        let frame = Frame::from("{\"type\":\"signal\",\"x\":\"a\\nb\"}");
        let bus = Bus::Deliver(Deliver {
            room: "r",
            to: vec!["p"],
            joined: None,
            joined_seq: None,
            left: None,
            from: Some(("s", "i")),
        });
        let wire = encode(&bus, Some(&frame));
        assert!(wire.ends_with(frame.as_bytes()), "not escaped");
        assert!(wire.starts_with(DELIVER_TAG), "read by the fast path");
        let wire = Bytes::from(wire);
        let (header, back) = decode(&wire).unwrap();
        assert!(matches!(
            header,
            Bus::Deliver(Deliver { from: Some(_), .. })
        ));
        // The tag elsewhere (no writer of ours puts it there): the general path reads it.
        let moved = b"{\"room\":\"r\",\"t\":\"deliver\",\"to\":[\"p\"]}\n{\"type\":\"x\"}";
        let moved = Bytes::from_static(moved);
        let (header, _) = decode(&moved).unwrap();
        assert!(matches!(header, Bus::Deliver(Deliver { room: "r", .. })));
        // An escaped id (no writer of ours escapes one) is refused, not misread.
        let escaped = b"{\"t\":\"deliver\",\"room\":\"\\u0072\",\"to\":[\"p\"]}\n{}";
        assert!(decode(&Bytes::from_static(escaped)).is_none());
        assert!(matches!(back, Body::Frame(f) if f == frame));
        let tick = Bytes::from(encode(&Bus::Tick { id: "i".into() }, None));
        let (tick, none) = decode(&tick).unwrap();
        assert!(matches!(tick, Bus::Tick { .. }) && matches!(none, Body::None));
        let relay = Bus::Relay {
            to: "s".into(),
            p: "binary".into(),
            from: None,
            n: None,
        };
        let relay = Bytes::from(encode_raw(&relay, b"\xff\n\x00"));
        let (_, raw) = decode(&relay).unwrap();
        assert!(
            matches!(raw, Body::Raw(b) if &b[..] == b"\xff\n\x00"),
            "binary, raw"
        );
        assert!(decode(&Bytes::from_static(b"no newline")).is_none());
        assert!(decode(&Bytes::from_static(b"{\"t\":\"tick\",\"id\":\"i\"}\n\xff")).is_none());
    }

    /// The hand-written header is the object serde wrote before (older instances read it).
    #[test]
    fn a_deliver_header_is_the_object_serde_wrote() {
        use serde_json::{json, Value};
        let full = Deliver {
            room: "r-1",
            to: vec!["a", "b_2"],
            joined: Some(("j", "o")),
            joined_seq: Some(7),
            left: Some("l"),
            from: Some(("s", "i")),
        };
        let bare = Deliver {
            room: "r",
            to: vec![],
            joined: None,
            joined_seq: None,
            left: None,
            from: None,
        };
        // Not ids: escaped, still JSON.
        let odd = Deliver {
            room: "a\"b\\",
            to: vec!["\u{1}"],
            ..bare
        };
        let cases = [
            (
                full,
                json!({"t":"deliver","room":"r-1","to":["a","b_2"],"joined":["j","o"],
                       "joined_seq":7,"left":"l","from":["s","i"]}),
            ),
            (bare, json!({"t":"deliver","room":"r","to":[]})),
            (odd, json!({"t":"deliver","room":"a\"b\\","to":["\u{1}"]})),
        ];
        for (deliver, want) in cases {
            let wire = encode(&Bus::Deliver(deliver), None);
            let header = wire.strip_suffix(b"\n").expect("an empty body");
            assert_eq!(serde_json::from_slice::<Value>(header).unwrap(), want);
        }
    }

    #[test]
    fn a_pack_gives_back_its_messages_in_order() {
        let messages: [&[u8]; 4] = [b"", b"one", b"\n\x00\xff", &[7u8; 70_000]];
        let packed = redis::ToRedisArgs::to_redis_args(&Pack(messages.to_vec())).remove(0);
        // Written into a command: one argument, after the others.
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg("ch").arg(Pack(messages.to_vec()));
        let args: Vec<_> = cmd.args_iter().collect();
        assert!(matches!(args[..], [_, _, redis::Arg::Simple(p)] if p == &packed[..]));
        let back = unpack(Bytes::from(packed.clone())).unwrap();
        assert_eq!(back.len(), 4);
        for (b, m) in back.iter().zip(messages) {
            assert_eq!(&b[..], m);
        }
        // Copied out: a queued frame keeps only its own message alive, not the pack.
        let payload = Bytes::from(packed.clone());
        let pack_range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        for b in unpack(payload.clone())
            .unwrap()
            .iter()
            .filter(|b| !b.is_empty())
        {
            assert!(
                !pack_range.contains(&(b.as_ptr() as usize)),
                "a slice of the pack"
            );
        }
        assert!(unpack(Bytes::new()).unwrap().is_empty());
        for cut in [1, 3, 5, packed.len() - 1] {
            assert!(
                unpack(Bytes::from(packed[..cut].to_vec())).is_none(),
                "cut at {cut}"
            );
        }
    }
}
