//! Signals from each pair's host to its joiner: `burst` fires them all as fast as the socket
//! takes them; `paced` spreads them evenly at a total rate. Receivers count what arrives and, from
//! the stamp in each, its one-way latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::{watch, Barrier};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{is_error, stamp, Pair, Target, Template, Ws};
use crate::sys::{cpu_ns_sum, now_us, quantile};
use crate::{emit, Args};

/// Frames written before a flush: one syscall carries several signals, as a busy client's would.
const FLUSH_EVERY: usize = 32;

#[derive(Clone, Copy)]
enum Pace {
    /// Everything at once.
    Burst,
    /// Signals per second per pair.
    Rate(f64),
}

/// Totals shared by the receivers and the coordinator.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    errors: AtomicU64,
    /// µs (of `now_us`) of the last signal received anywhere.
    last_rx: AtomicU64,
}

struct Outcome {
    sent: u64,
    received: u64,
    errors: u64,
    /// µs from the first send to the last receipt.
    span_us: u64,
    /// µs from the first send to the last (paced senders fall behind when the server pushes back).
    send_span_us: u64,
    /// Sorted one-way latencies in µs.
    latencies: Vec<u64>,
    /// Server CPU nanoseconds over the run (instances, Redis).
    cpu: u64,
    redis_cpu: u64,
}

pub async fn burst(a: &Args) {
    let label = a.str("label");
    let key: String = a.get("prefix", "burst".to_owned());
    let pairs = a.get("pairs", 50usize);
    let n = a.get("signals", 2000usize);
    let o = run(a, pairs, n, Pace::Burst).await;
    let rate = o.received as f64 / (o.span_us.max(1) as f64 / 1e6);
    emit(&label, &format!("{key}_rate"), rate.round());
    emit(&label, &format!("{key}_lost"), (o.sent - o.received) as f64);
    emit(&label, &format!("{key}_errors"), o.errors as f64);
    emit(
        &label,
        &format!("{key}_p99_ms"),
        quantile(&o.latencies, 0.99) as f64 / 1000.0,
    );
    let per_msg = |ns: u64| (ns as f64 / 1e3 / o.received.max(1) as f64 * 1000.0).round() / 1000.0;
    if !a.pids("pids").is_empty() {
        emit(&label, &format!("{key}_cpu_us"), per_msg(o.cpu));
    }
    if !a.pids("redis-pid").is_empty() {
        emit(&label, &format!("{key}_redis_cpu_us"), per_msg(o.redis_cpu));
    }
    eprintln!(
        "  {label} {key}: {pairs} x {n}: {} of {} delivered in {:.2} s = {rate:.0}/s, {} errors",
        o.received,
        o.sent,
        o.span_us as f64 / 1e6,
        o.errors
    );
}

pub async fn paced(a: &Args) {
    let label = a.str("label");
    let pairs = a.get("pairs", 50usize);
    let rate = a.get("rate", 5000f64);
    let secs = a.get("secs", 5f64);
    let key: String = a.get("prefix", format!("paced{}", rate as u64));
    let per_pair = rate / pairs as f64;
    let n = (per_pair * secs).round().max(1.0) as usize;
    let o = run(a, pairs, n, Pace::Rate(per_pair)).await;
    let ms = |p: f64| quantile(&o.latencies, p) as f64 / 1000.0;
    emit(&label, &format!("{key}_p50_ms"), ms(0.50));
    emit(&label, &format!("{key}_p99_ms"), ms(0.99));
    emit(&label, &format!("{key}_max_ms"), ms(1.0));
    emit(&label, &format!("{key}_lost"), (o.sent - o.received) as f64);
    emit(&label, &format!("{key}_errors"), o.errors as f64);
    let sent_rate = o.sent as f64 / (o.send_span_us.max(1) as f64 / 1e6);
    emit(&label, &format!("{key}_sent_rate"), sent_rate.round());
    eprintln!(
        "  {label} {key}: {} of {} delivered, sent at {sent_rate:.0}/s of {rate}/s: p50 {:.2} p99 {:.2} max {:.2} ms",
        o.received,
        o.sent,
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
}

async fn run(a: &Args, pairs: usize, n: usize, pace: Pace) -> Outcome {
    let target = Target::from_args(a);
    let pids = a.pids("pids");
    let redis = a.pids("redis-pid");
    // After the last send: stop when nothing arrived for `quiet`, and in any case after `cap`.
    let quiet = Duration::from_millis(a.get("quiet-ms", 1000u64));
    let cap = Duration::from_secs(a.get("wait-secs", 10u64));

    let set_up: Vec<Pair> = futures::stream::iter(0..pairs)
        .map(|_| target.pair())
        .buffer_unordered(25)
        .collect()
        .await;

    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let go = Arc::new(Barrier::new(pairs + 1));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (i, pair) in set_up.into_iter().enumerate() {
        let template = target.template(&pair.joiner_id, 0);
        let (sink, host_rx) = pair.host.split();
        tokio::spawn(count_errors(host_rx, counters.clone(), stop_rx.clone()));
        receivers.push(tokio::spawn(receive(
            pair.joiner,
            counters.clone(),
            stop_rx.clone(),
            n,
        )));
        // Paced senders start spread over one interval, so the total rate is even.
        let phase = match pace {
            Pace::Burst => Duration::ZERO,
            Pace::Rate(r) => Duration::from_secs_f64(i as f64 / pairs as f64 / r),
        };
        senders.push(tokio::spawn(send(
            sink,
            template,
            n,
            pace,
            phase,
            go.clone(),
        )));
    }

    let tck = a.get("clk-tck", 100f64);
    let cpu0 = cpu_ns_sum(&pids, tck);
    let redis0 = cpu_ns_sum(&redis, tck);
    go.wait().await;
    let first_send = now_us();

    let mut sent = 0u64;
    for s in senders {
        sent += s.await.expect("sender");
    }
    let last_send = Instant::now();
    let send_span_us = now_us() - first_send;
    let mut seen = counters.received.load(Ordering::Relaxed);
    let mut progress = Instant::now();
    while seen < sent && progress.elapsed() < quiet && last_send.elapsed() < cap {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = counters.received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            progress = Instant::now();
        }
    }
    let cpu = cpu_ns_sum(&pids, tck).saturating_sub(cpu0);
    let redis_cpu = cpu_ns_sum(&redis, tck).saturating_sub(redis0);
    let _ = stop_tx.send(true);

    let mut latencies = Vec::with_capacity(sent as usize);
    for r in receivers {
        latencies.extend(r.await.expect("receiver"));
    }
    latencies.sort_unstable();
    let last_rx = counters.last_rx.load(Ordering::Relaxed);
    Outcome {
        sent,
        received: latencies.len() as u64,
        errors: counters.errors.load(Ordering::Relaxed),
        span_us: last_rx.saturating_sub(first_send),
        send_span_us,
        latencies,
        cpu,
        redis_cpu,
    }
}

/// Writes `n` stamped signals; returns how many the socket took.
async fn send(
    mut sink: SplitSink<Ws, Message>,
    template: Template,
    n: usize,
    pace: Pace,
    phase: Duration,
    go: Arc<Barrier>,
) -> u64 {
    go.wait().await;
    let start = tokio::time::Instant::now() + phase;
    let mut pending = 0;
    for i in 0..n {
        if let Pace::Rate(r) = pace {
            let due = start + Duration::from_secs_f64(i as f64 / r);
            if due > tokio::time::Instant::now() {
                if pending > 0 && sink.flush().await.is_err() {
                    return i as u64;
                }
                pending = 0;
                tokio::time::sleep_until(due).await;
            }
        }
        if sink.feed(template.frame(now_us())).await.is_err() {
            return i as u64;
        }
        pending += 1;
        if pending == FLUSH_EVERY {
            if sink.flush().await.is_err() {
                return i as u64 + 1;
            }
            pending = 0;
        }
    }
    let _ = sink.flush().await;
    // Dropping the sink half leaves the socket open: the host's stream half (count_errors)
    // holds it until the receivers are done.
    n as u64
}

/// The joiner: counts stamped signals and keeps their latencies until told to stop.
async fn receive(
    mut ws: Ws,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    expected: usize,
) -> Vec<u64> {
    let mut lat = Vec::with_capacity(expected);
    loop {
        tokio::select! {
            biased;
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Message::Text(t) = msg else { continue };
                if let Some(sent) = stamp(t.as_str()) {
                    let now = now_us();
                    lat.push(now.saturating_sub(sent));
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    counters.last_rx.fetch_max(now, Ordering::Relaxed);
                }
            }
            _ = stop.changed() => break,
        }
    }
    lat
}

/// The host's side of its socket: `error` frames (beach-road refusing a relay).
async fn count_errors(
    mut rx: SplitStream<Ws>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            msg = rx.next() => {
                let Some(Ok(msg)) = msg else { break };
                if let Message::Text(t) = msg {
                    if is_error(t.as_str())
                        && counters.errors.fetch_add(1, Ordering::Relaxed) == 0
                    {
                        eprintln!("    first error frame: {}", t.as_str());
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
}
