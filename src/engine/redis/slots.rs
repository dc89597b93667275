//! Pipelines on a Redis Cluster, where one must stay on one slot: one that does not (the
//! outbox's publishes to several instances, a refresh of many rooms, a reap batch) is split into
//! a pipeline per slot, each in its commands' order, sent together, the replies put back in
//! order. A part whose node is down answers an error in place of each of its replies, so a
//! caller can tell what went (`Pipeline::ignore_errors`: the outbox tells only the senders whose
//! instance's node failed).

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Arg, Cmd, Pipeline, RedisError, RedisResult, Value};

/// The first key of a command we send (`EVALSHA`: after the digest and the key count); `None`
/// for one without ([`KEYLESS`]).
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    if KEYLESS.iter().any(|k| name.eq_ignore_ascii_case(k)) {
        return None;
    }
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        args.nth(1)?;
    }
    args.next()
}

/// The commands without a key that we pipeline.
const KEYLESS: [&[u8]; 2] = [b"SCRIPT", b"TIME"];

/// One slot's pipeline, and where each of its replies goes in the whole pipeline's (`None`: a
/// keyless command's copy, whose reply is not kept).
pub(super) type Part = (Pipeline, Vec<Option<usize>>);

/// A pipeline on several slots (the outbox's publishes to several instances, refreshes of many
/// sessions) as one [`Part`] per slot; a keyless command (`SCRIPT LOAD` ahead of the scripts it
/// loads) goes to every part, the first one's reply kept. `None` when it is on one slot, as a
/// cluster takes it. A transaction is never split (Redis refuses one across slots, as it should).
pub(super) fn split_by_slot(pipe: &Pipeline) -> Option<Vec<Part>> {
    if pipe.is_transaction() {
        return None;
    }
    let slots: Vec<Option<Slot>> = pipe
        .cmd_iter()
        .map(|c| first_key(c).map(Slot::for_key))
        .collect();
    let mut keys: Vec<Slot> = Vec::new();
    for s in slots.iter().flatten() {
        if !keys.contains(s) {
            keys.push(*s);
        }
    }
    if keys.len() < 2 {
        return None;
    }
    let mut parts: Vec<Part> = keys.iter().map(|_| (redis::pipe(), Vec::new())).collect();
    for (i, (cmd, slot)) in pipe.cmd_iter().zip(&slots).enumerate() {
        match slot {
            Some(s) => {
                let part = &mut parts[keys.iter().position(|k| k == s).unwrap_or(0)];
                part.0.add_command(cmd.clone());
                part.1.push(Some(i));
            }
            // Keyless: to every node, in its place.
            None => {
                for (j, part) in parts.iter_mut().enumerate() {
                    part.0.add_command(cmd.clone());
                    part.1.push((j == 0).then_some(i));
                }
            }
        }
    }
    Some(parts)
}

/// Sends the parts of a split pipeline together; the replies in the pipeline's order. A part
/// that failed while others went (its node is down) answers an error in place of each of its
/// replies, so a caller can tell what went (`Pipeline::ignore_errors`); every part failing is
/// the pipeline failing.
pub(super) async fn query_parts(
    conn: ClusterConnection,
    parts: Vec<Part>,
    n: usize,
) -> RedisResult<Vec<Value>> {
    let replies = futures::future::join_all(parts.iter().map(|(pipe, _)| {
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(pipe, 0, pipe.len()).await }
    }))
    .await;
    if replies.iter().all(Result::is_err) {
        return replies
            .into_iter()
            .next()
            .expect("two parts or more")
            .map(|_| Vec::new());
    }
    let mut out = vec![Value::Nil; n];
    for ((_, at), reply) in parts.iter().zip(replies) {
        match reply {
            Ok(values) => {
                for (i, v) in at.iter().zip(values) {
                    if let Some(i) = i {
                        out[*i] = v;
                    }
                }
            }
            Err(e) => {
                let error = as_reply(&e);
                at.iter().flatten().for_each(|&i| out[i] = error.clone());
            }
        }
    }
    Ok(out)
}

/// An error as the reply of a command (redis-rs has no public constructor for one).
fn as_reply(e: &RedisError) -> Value {
    let text = e.to_string().replace(['\r', '\n'], " ");
    let code = e.code().unwrap_or("UNAVAILABLE");
    redis::parse_redis_value(format!("-{code} {text}\r\n").as_bytes()).unwrap_or(Value::Nil)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: &str) -> Slot {
        Slot::for_key(key)
    }

    #[test]
    fn first_keys_of_commands_and_scripts() {
        let c = redis::cmd("HGET").arg("p:{s}:peers").arg("x").clone();
        assert_eq!(first_key(&c), Some(&b"p:{s}:peers"[..]));
        let e = redis::cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("p:{t}:x")
            .clone();
        assert_eq!(first_key(&e), Some(&b"p:{t}:x"[..]));
        assert_eq!(first_key(&redis::cmd("TIME")), None);
        let load = redis::cmd("SCRIPT").arg("LOAD").arg("return 1").clone();
        assert_eq!(first_key(&load), None);
    }

    #[test]
    fn a_pipeline_on_one_slot_is_left_whole() {
        let mut p = redis::pipe();
        p.cmd("GET")
            .arg("p:{s}:a")
            .cmd("TIME")
            .cmd("HGETALL")
            .arg("p:{s}:b");
        assert!(split_by_slot(&p).is_none());
        let mut t = redis::pipe();
        t.atomic()
            .cmd("GET")
            .arg("p:{s}:a")
            .cmd("GET")
            .arg("p:{u}:a");
        assert!(split_by_slot(&t).is_none(), "a transaction is never split");
    }

    #[test]
    fn a_pipeline_across_slots_is_split_in_order() {
        let (a, b) = ("p:bus:one", "p:bus:two");
        assert_ne!(slot(a), slot(b));
        let mut p = redis::pipe();
        p.cmd("SPUBLISH").arg(a).arg("1");
        p.cmd("SPUBLISH").arg(b).arg("2");
        p.cmd("TIME");
        p.cmd("SPUBLISH").arg(a).arg("3");
        let parts = split_by_slot(&p).expect("two slots");
        let at: Vec<Vec<Option<usize>>> = parts.iter().map(|(_, at)| at.clone()).collect();
        assert_eq!(at, [vec![Some(0), Some(2), Some(3)], vec![Some(1), None]]);
        let args = |pipe: &Pipeline| -> Vec<Vec<u8>> {
            pipe.cmd_iter()
                .filter_map(|c| match c.args_iter().last() {
                    Some(Arg::Simple(b)) => Some(b.to_vec()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(args(&parts[0].0), [&b"1"[..], b"TIME", b"3"]);
        assert_eq!(
            args(&parts[1].0),
            [&b"2"[..], b"TIME"],
            "keyless: to every node"
        );
    }

    #[test]
    fn a_failed_part_answers_an_error_in_place_of_each_reply() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\r\n");
        let error = as_reply(&RedisError::from(refused));
        let replies = Value::Array(vec![Value::Int(1), error]);
        let r: Vec<RedisResult<i64>> = redis::from_redis_value(replies).unwrap();
        assert_eq!(r[0].as_ref().ok(), Some(&1));
        assert!(r[1]
            .as_ref()
            .is_err_and(|e| e.to_string().contains("refused")));
    }
}
