//! What instances publish to each other, and the member records of `{S}:peers` as parsed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::view::Known;
use crate::protocol::{PeerInfo, Role};

/// What instances publish to each other's channels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Bus {
    /// The self-message proving this instance's subscription still works.
    Tick { id: String },
    /// A frame for some members of `room` held by the receiving instance.
    Deliver {
        room: String,
        to: Vec<String>,
        frame: String,
        /// (peer, owner) that just joined: the receiver may cache its owner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        joined: Option<(String, String)>,
        /// The join's `seq` (absent from older instances), so late news is recognised as such.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        joined_seq: Option<u64>,
        /// Peer that just left: the receiver forgets its owner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        left: Option<String>,
    },
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
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub seq: u64,
    pub owner: String,
    pub info: PeerInfo,
}

impl Member {
    pub(crate) fn parse(id: &str, rec: &str) -> Option<Member> {
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

    pub(crate) fn to_known(&self) -> Known {
        Known {
            id: self.info.id.clone(),
            owner: self.owner.clone(),
            seq: self.seq,
        }
    }
}

/// Parses flat `[id, rec, id, rec, ...]` (HGETALL order) into members in join order.
pub(crate) fn parse_members(flat: &[String]) -> Vec<Member> {
    let mut out: Vec<Member> = flat
        .chunks_exact(2)
        .filter_map(|kv| {
            let m = Member::parse(&kv[0], &kv[1]);
            if m.is_none() {
                tracing::warn!(peer = %kv[0], "unparsable member record ignored");
            }
            m
        })
        .collect();
    out.sort_by_key(|m| m.seq);
    out
}
