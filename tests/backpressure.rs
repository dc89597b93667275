//! Backpressure across instances (issue 9): two real `beach-road` processes on one private
//! `redis-server`, the host on one, its joiner on the other, senders unpaced (the defaults
//! allow 50 signals/s after a burst of 200: these tests are about the recipient's queue).
//!
//! Pub/sub has no backpressure of its own: a relay published to the recipient's instance
//! arrives however far behind the recipient is. Its instance therefore queues frames past the
//! recipient's relay share (up to one more queue's worth) and tells the sender's instance to
//! hold that sender's reading until the recipient is back within its share. A burst at a peer
//! that drains loses nothing; a peer that reads nothing gets its senders refused (and told)
//! after the hold, as a local one does.
//!
//! Every test body is bounded; processes are killed when dropped.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::metrics::Scrape;
use common::pair::Pair;
use common::{bounded_for, find_peer, Session, Ws, UNPACED};

/// The two tests share the machine's two cores, so they run one at a time (`cargo test` runs a
/// file's tests in parallel): each measures a sender outrunning its reader.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Senders unpaced; the write timeout long, so the stalled reader below is ended by the queue
/// rules, not by a write.
fn pair_args() -> Vec<&'static str> {
    let mut args = UNPACED.to_vec();
    args.extend(["--write-timeout", "30s"]);
    args
}

/// A session on instance 0 with its host there and a joiner on instance 1.
async fn host_and_joiner(pair: &Pair) -> (Ws, Ws) {
    let s: Session = pair.servers[0].api().new_session(None).await;
    let mut host = Ws::connect(&pair.servers[0].ws_url(&s.host)).await;
    let ok = host.join(Some(&s.code)).await;
    assert_eq!(find_peer(&ok, &host.id())["role"], "server", "{ok}");
    let token = pair.servers[1].api().join_token(&s.id, &s.code).await;
    let mut joiner = Ws::connect(&pair.servers[1].ws_url(&token)).await;
    let ok = joiner.join(Some(&s.code)).await;
    assert_eq!(find_peer(&ok, &joiner.id())["role"], "client", "{ok}");
    host.recv_type("peer_joined").await;
    (host, joiner)
}

/// The paced reader's signals per second (~3 MB/s of these): slower than the sender, fast
/// enough to catch up within a hold.
const READER_RATE: f64 = 3000.0;

/// The server's hold of a sender (`beach_road::peers::HOLD_WAIT`).
const HOLD: Duration = beach_road::peers::HOLD_WAIT;

/// A signal of about 1 KiB carrying its sequence number.
fn signal(to: &str, n: usize) -> Value {
    json!({"type": "signal", "to_peer": to, "signal": {"n": n, "pad": "x".repeat(1000)}})
}

/// Reads signals from `ws` until `want` of them came (or nothing for 5 s), `per_second` on
/// average (`None`: as fast as they come); returns their sequence numbers and any other message.
/// The pace is kept to the clock, not by fixed sleeps, so a loaded machine does not slow the
/// reader below it (late sleeps would add up).
async fn read_paced(ws: &mut Ws, want: usize, per_second: Option<f64>) -> (Vec<usize>, Vec<Value>) {
    let (mut got, mut other) = (Vec::new(), Vec::new());
    let start = tokio::time::Instant::now();
    while got.len() < want {
        match ws.next(Duration::from_secs(5)).await {
            Ok(Some(v)) if v["type"] == "signal" => {
                got.push(v["signal"]["n"].as_u64().unwrap() as usize);
                if let Some(rate) = per_second {
                    let due = start + Duration::from_secs_f64(got.len() as f64 / rate);
                    tokio::time::sleep_until(due).await;
                }
            }
            Ok(Some(v)) => other.push(v),
            Ok(None) => break,
            Err(c) => panic!("the reader's socket closed: {c:?}"),
        }
    }
    (got, other)
}

/// Panics with the first place where `got` is not `0..want` (without printing thousands).
fn assert_in_order(got: &[usize], want: usize) {
    if let Some(i) = (0..got.len()).find(|&i| got[i] != i) {
        panic!(
            "signal {i} is {} (of {} received): lost or reordered",
            got[i],
            got.len()
        );
    }
    assert_eq!(got.len(), want, "signals missing at the end");
}

/// Every message `ws` has for `d`.
async fn drain(ws: &mut Ws, d: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(v)) = ws.next(d).await {
        out.push(v);
    }
    out
}

/// 20,000 signals of 1 KiB (20 MiB, five times what the kernel's socket buffers take) fired
/// across instances at a joiner that reads steadily (3,000/s), slower than the sender sends: the
/// sender is held and slowed to the reader's pace; nothing is refused, lost or reordered.
/// Without the hold, its instance publishes at full speed and the recipient's queue (192 frames
/// of relay share) overflows by thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_instances_at_a_draining_reader_loses_nothing() {
    const N: usize = 20_000;
    let _serial = SERIAL.lock().await;
    let pair = Pair::start(&pair_args()).await;
    bounded_for(Duration::from_secs(90), async {
        let (host, mut joiner) = host_and_joiner(&pair).await;
        let to = joiner.id();
        // Serialized beforehand, so the sender outruns the reader by far.
        let texts: Vec<String> = (0..N).map(|n| signal(&to, n).to_string()).collect();
        let sender = tokio::spawn(async move {
            let mut host = host;
            for text in &texts {
                host.send_text(text).await;
            }
            host
        });
        let started = Instant::now();
        let (got, other) = read_paced(&mut joiner, N, Some(READER_RATE)).await;
        let took = started.elapsed();
        let mut host = sender.await.unwrap();
        let told = drain(&mut host, Duration::from_millis(500)).await;
        let held = Scrape::of(&pair.servers[0])
            .await
            .get("beach_road_senders_held_total", &[]);
        eprintln!(
            "{} of {N} in {took:?} ({:.0}/s), sender held {held} times",
            got.len(),
            got.len() as f64 / took.as_secs_f64()
        );
        assert!(
            told.is_empty(),
            "the sender was told of losses: {:?}",
            &told[..1]
        );
        assert!(other.is_empty(), "the reader got {:?}", &other[..1]);
        assert_in_order(&got, N);
        assert!(held > 0.0, "the sender was never held");
    })
    .await
}

/// A joiner that reads nothing: its sender is held for a moment, then what the joiner's queue
/// cannot take is refused and each refusal told to the sender (which reads its socket as it
/// sends, as a client does: a sender that reads nothing fills its own queue, and what does not
/// fit there cannot be told, only counted). When the joiner reads again it gets a prefix of
/// what was sent, in order: delivered plus refused is everything sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_gets_its_senders_refused_after_the_hold() {
    const N: usize = 8_000;
    let _serial = SERIAL.lock().await;
    let pair = Pair::start(&pair_args()).await;
    bounded_for(Duration::from_secs(90), async {
        let (host, mut joiner) = host_and_joiner(&pair).await;
        let to = joiner.id();
        let started = Instant::now();
        let (mut tx, mut rx) = host.into_stream().split();
        let reader = tokio::spawn(async move {
            let mut told = Vec::new();
            // Longer than the hold: refusals resume once it has run out.
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(3 * HOLD, rx.next()).await {
                if let Message::Text(t) = msg {
                    told.push(serde_json::from_str::<Value>(t.as_str()).unwrap());
                }
            }
            told
        });
        for n in 0..N {
            let text = signal(&to, n).to_string();
            tx.send(Message::text(text)).await.expect("sent");
        }
        let told = reader.await.unwrap();
        eprintln!("sent {N} and read the replies in {:?}", started.elapsed());
        for v in &told {
            assert_eq!(v["type"], "error", "{v}");
            assert!(
                v["message"].as_str().unwrap().contains("not keeping up"),
                "{v}"
            );
        }
        let (got, other) = read_paced(&mut joiner, N, None).await;
        assert!(other.is_empty(), "the reader got {:?}", &other[..1]);
        assert_in_order(&got, got.len());
        assert_eq!(got.len() + told.len(), N, "every refusal is told");
        assert!(
            !told.is_empty(),
            "nothing was refused: the queue is unbounded?"
        );
    })
    .await
}
