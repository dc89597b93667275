//! This instance's messages to other instances, published in the order they were queued.
//!
//! Relays, room events, relay pieces and refusal reports are queued here by whoever sends them
//! (a socket task waits only while the outbox is full) and one publisher task sends everything
//! waiting as one pipeline, then the next: a `PUBLISH` per instance of what is queued for it,
//! packed (`super::bus::Pack`, up to 64 messages), so a command, its reply and the push are
//! paid once per pack under load. Order is the point: publishes left to their senders' tasks
//! reached Redis in the order those tasks happened to be polled once the connection's command
//! queue was full (seen: a signal delivered four places early in a burst across instances),
//! and a member's relays could overtake the room event of its leave. One pipeline in flight
//! also batches by itself under load (everything queued while the last one was answered).
//!
//! A pack that reaches nobody (its instance is gone, or older and not on its bus channel) is
//! sent again message by message on the instance's legacy channel, in a second pipeline; what
//! that one answers is the messages' answer. In a cluster the bus is a shard channel (one
//! `SPUBLISH` per instance, to the node owning its slot) and there is no legacy channel. A
//! relayed frame is answered only if it failed, to its sender's queue (`Inner::undelivered`): a
//! relay costs no channel, future or wakeup of its own (those were a third of two instances' CPU
//! in a burst).
//!
//! Not here: the self-ping (`liveness`: it must not queue behind a burst, it measures the
//! subscription), and the reaper's and the Admin API's pipelines (each one command batch with
//! the writes it belongs to).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};

use super::bus::Pack;
use super::{fenced, Inner};
use crate::engine::{EngineError, EngineResult};

/// Messages waiting at most, and their bytes: a full outbox slows its senders (each waits up
/// to the call timeout, then its relay fails and it is told), never grows.
const MAX_MESSAGES: usize = 4096;
const MAX_BYTES: usize = 16 << 20;
/// Messages in one pipeline at most.
const BATCH: usize = 512;
/// Messages in one pack at most: one push stays a few MiB at most (64 of the largest
/// messages), handled by the receiver in one go. (Packs of 512 measured the same.)
const PACK: usize = 64;

/// What a publish is answered: the number of subscribers that received it (see
/// [`Answer::receivers`]).
pub(crate) struct Answer(oneshot::Receiver<EngineResult<i64>>);

impl Answer {
    /// The subscribers that received the message; a publisher that stopped (shutdown) fails it.
    pub(crate) async fn receivers(self) -> EngineResult<i64> {
        self.0
            .await
            .unwrap_or_else(|_| Err(EngineError::Busy("publisher stopped".into())))
    }
}

struct Message {
    /// The instance it is for.
    instance: String,
    payload: Vec<u8>,
    done: Done,
}

/// Who hears what became of a message.
enum Done {
    /// Nobody (a report, a hold, a release).
    Nobody,
    /// The log: a room event, whose sender (the server) goes on at once; its order against
    /// what follows is the queue's. A failure is logged here.
    Event,
    /// The caller, who awaits the number of receivers (relay pieces).
    Caller(oneshot::Sender<EngineResult<i64>>),
    /// A relayed frame: only a failure is answered, to its sender (see `Inner::undelivered`).
    Sender(Relay),
}

/// A relayed frame's sender and recipient, for the report should it not be delivered.
pub(crate) struct Relay {
    pub room: String,
    pub sender: String,
    pub to: String,
    /// The recipient's record was read for this frame (not a cached route).
    pub looked_up: bool,
    /// Counts against the sender's cap until the outbox is done with the frame.
    pub _outstanding: Option<crate::peers::Outstanding>,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<Message>,
    bytes: usize,
}

pub(crate) struct Outbox {
    /// How long a sender waits for room at most (the call timeout).
    wait: Duration,
    queue: Mutex<Queue>,
    /// Wakes the publisher when a message is queued.
    ready: Notify,
    /// Wakes senders waiting for room.
    space: Notify,
}

impl Outbox {
    pub(crate) fn new(wait: Duration) -> Outbox {
        Outbox {
            wait,
            queue: Mutex::default(),
            ready: Notify::new(),
            space: Notify::new(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message if there is room; gives it back otherwise.
    // Given back by value (a few words, no heap) only when the outbox is full.
    #[allow(clippy::result_large_err)]
    fn try_push(&self, m: Message) -> Result<(), Message> {
        {
            let mut q = self.queue();
            let len = m.payload.len();
            if q.messages.len() >= MAX_MESSAGES || (q.bytes + len > MAX_BYTES && q.bytes > 0) {
                return Err(m);
            }
            q.bytes += len;
            q.messages.push_back(m);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Queues a message whose answer the caller awaits, waiting for room up to the call
    /// timeout (then the outbox is full: `Busy`). The message is queued when this returns: a
    /// caller's messages go out in the order of its calls.
    pub(crate) async fn publish(&self, instance: String, payload: Vec<u8>) -> EngineResult<Answer> {
        let (done, answer) = oneshot::channel();
        self.push(Message {
            instance,
            payload,
            done: Done::Caller(done),
        })
        .await?;
        Ok(Answer(answer))
    }

    /// Queues a room event (`peer_joined`, `peer_left`), as [`publish`](Self::publish) does;
    /// nobody waits for it: the join or leave that sent it is answered at once, and what its
    /// peer sends next is queued behind it.
    pub(crate) async fn event(&self, instance: String, payload: Vec<u8>) -> EngineResult<()> {
        self.push(Message {
            instance,
            payload,
            done: Done::Event,
        })
        .await
    }

    /// Queues a relayed frame, as [`publish`](Self::publish) does; nothing is answered unless
    /// it fails, and then to its sender's queue.
    pub(crate) async fn relay(
        &self,
        instance: String,
        payload: Vec<u8>,
        relay: Relay,
    ) -> EngineResult<()> {
        self.push(Message {
            instance,
            payload,
            done: Done::Sender(relay),
        })
        .await
    }

    /// Queues `m`, waiting for room up to the call timeout (then `Busy`).
    async fn push(&self, m: Message) -> EngineResult<()> {
        // Nearly always there is room: no timer then.
        let Err(mut m) = self.try_push(m) else {
            return Ok(());
        };
        let queued = tokio::time::timeout(self.wait, async {
            loop {
                let space = self.space.notified();
                tokio::pin!(space);
                space.as_mut().enable();
                match self.try_push(m) {
                    Ok(()) => return,
                    Err(back) => m = back,
                }
                space.await;
            }
        });
        queued
            .await
            .map_err(|_| EngineError::Busy("outbox full".into()))
    }

    /// Queues a message nobody waits for (a report); false if the outbox is full.
    pub(crate) fn post(&self, instance: String, payload: Vec<u8>) -> bool {
        let m = Message {
            instance,
            payload,
            done: Done::Nobody,
        };
        self.try_push(m).is_ok()
    }

    /// The next batch, in queue order.
    fn take(&self) -> Vec<Message> {
        let batch: Vec<Message> = {
            let mut q = self.queue();
            let n = q.messages.len().min(BATCH);
            let batch: Vec<Message> = q.messages.drain(..n).collect();
            q.bytes -= batch.iter().map(|m| m.payload.len()).sum::<usize>();
            batch
        };
        if !batch.is_empty() {
            self.space.notify_waiters();
        }
        batch
    }
}

/// The publisher task: one pipeline at a time, each bounded by the call timeout. A message
/// queued by an instance that may have been written off since (it froze with messages
/// waiting) is not published: its senders are told, as a relay checked before queueing is.
pub(crate) async fn publisher(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let batch = inner.outbox.take();
        if batch.is_empty() {
            tokio::select! {
                _ = stop.changed() => return,
                _ = inner.outbox.ready.notified() => continue,
            }
        }
        let mut failed = Vec::new();
        tokio::select! {
            _ = stop.changed() => return,
            () = publish(&inner, batch, &mut failed) => {}
        }
        if !failed.is_empty() {
            inner.undelivered(failed).await;
        }
    }
}

/// A relayed frame that was not delivered: the publish failed, or nobody heard it (`None`).
pub(crate) type Failed = (Relay, Option<EngineError>);

/// Publishes one batch: a pack per instance, then what nobody heard one by one on the legacy
/// channels. Callers are answered; relays that failed are added to `failed`.
async fn publish(inner: &Inner, batch: Vec<Message>, failed: &mut Vec<Failed>) {
    if !inner.alive_locally() {
        let fenced = fenced("instance may have been written off");
        return answer(batch, Err(fenced), failed);
    }
    let packs = by_instance(batch);
    let mut pipe = redis::pipe();
    for (instance, messages) in &packs {
        let packed = Pack(messages.iter().map(|m| &m.payload[..]).collect());
        pipe.cmd(inner.keys.publish())
            .arg(inner.keys.bus(instance))
            .arg(packed);
    }
    let outcomes = match send(inner, pipe, packs.len()).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            let messages: usize = packs.iter().map(|(_, m)| m.len()).sum();
            tracing::warn!(error = %e, messages, "publish to instances failed");
            return answer(packs.into_iter().flat_map(|(_, m)| m), Err(e), failed);
        }
    };
    let mut unheard = Vec::new();
    for ((instance, messages), outcome) in packs.into_iter().zip(outcomes) {
        match outcome {
            // A cluster has no legacy channels: nobody heard it.
            Ok(0) if !inner.keys.sharded() => unheard.push((instance, messages)),
            outcome => answer(messages, outcome, failed),
        }
    }
    if unheard.is_empty() {
        return;
    }
    // Nobody on those bus channels: one by one on the legacy channels.
    let messages: Vec<(String, Message)> = unheard
        .into_iter()
        .flat_map(|(instance, m)| m.into_iter().map(move |m| (instance.clone(), m)))
        .collect();
    let mut pipe = redis::pipe();
    for (instance, m) in &messages {
        pipe.cmd("PUBLISH")
            .arg(inner.keys.channel(instance))
            .arg(&m.payload);
    }
    match send(inner, pipe, messages.len()).await {
        Ok(outcomes) => {
            for ((_, m), outcome) in messages.into_iter().zip(outcomes) {
                answer([m], outcome, failed);
            }
        }
        Err(e) => answer(messages.into_iter().map(|(_, m)| m), Err(e), failed),
    }
}

/// The batch grouped by instance, each group in queue order (order matters only within an
/// instance's channel), groups in the order of their first message.
fn by_instance(batch: Vec<Message>) -> Vec<(String, Vec<Message>)> {
    let mut packs: Vec<(String, Vec<Message>)> = Vec::new();
    for m in batch {
        // A batch is for a handful of instances: a scan beats a map.
        match packs
            .iter_mut()
            .find(|(i, messages)| *i == m.instance && messages.len() < PACK)
        {
            Some((_, messages)) => messages.push(m),
            None => packs.push((m.instance.clone(), vec![m])),
        }
    }
    packs
}

/// Sends one pipeline of `n` publishes; each one's receiver count. In a cluster some may fail
/// while others went (their nodes differ: see `super::slots`), so each has its own outcome.
async fn send(
    inner: &Inner,
    mut pipe: redis::Pipeline,
    n: usize,
) -> EngineResult<Vec<EngineResult<i64>>> {
    let mut cm = inner.cm();
    let replies = inner
        .redis(
            "PUBLISH",
            pipe.ignore_errors()
                .query_async::<Vec<redis::RedisResult<i64>>>(&mut cm),
        )
        .await?;
    if replies.len() != n {
        return Err(EngineError::StoreUnavailable("short pipeline reply".into()));
    }
    let outcomes: Vec<EngineResult<i64>> = replies
        .into_iter()
        .map(|r| r.map_err(|e| inner.store_error(&e)))
        .collect();
    // A part failed while the rest went: an error of the call all the same.
    if let Some(Err(e)) = outcomes.iter().find(|o| o.is_err()) {
        crate::metrics::redis_error("PUBLISH", e.kind());
    }
    Ok(outcomes)
}

/// Answers what became of `messages`: their callers, and the senders of relays that failed.
fn answer(
    messages: impl IntoIterator<Item = Message>,
    outcome: EngineResult<i64>,
    failed: &mut Vec<Failed>,
) {
    for m in messages {
        match m.done {
            Done::Nobody => {}
            Done::Event => {
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "room event publish to an instance failed");
                }
            }
            Done::Caller(done) => {
                let _ = done.send(outcome.clone());
            }
            Done::Sender(relay) => match &outcome {
                Ok(0) => failed.push((relay, None)),
                Ok(_) => {}
                Err(e) => failed.push((relay, Some(e.clone()))),
            },
        }
    }
}
