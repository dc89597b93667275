//! A joiner that never reads while its host sends `--signals` 1 KiB signals: the server's peak
//! RSS growth, and what became of the flood (beach-road refuses relays beyond the reader's queue
//! share to their sender and keeps the reader; matchbox queues without bound).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{is_error, Target, SIGNAL_BYTES};
use crate::sys::{now_us, rss_kib_sum};
use crate::{emit, Args};

pub async fn flood(a: &Args) {
    let label = a.str("label");
    let target = Target::from_args(a);
    let n = a.get("signals", 20_000usize);
    let pids = a.pids("pids");
    let pair = target.pair().await;
    let template = target.template(&pair.joiner_id, 1024 - SIGNAL_BYTES);
    let _reader_that_never_reads = pair.joiner;
    let (mut sink, mut rx) = pair.host.split();
    let errors = Arc::new(AtomicU64::new(0));
    let kicked = Arc::new(AtomicBool::new(false));
    let (e, k) = (errors.clone(), kicked.clone());
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if let Message::Text(t) = msg {
                let t = t.as_str();
                if is_error(t) {
                    e.fetch_add(1, Ordering::Relaxed);
                }
                if t.contains("\"type\":\"peer_left\"") || t.contains("\"PeerLeft\"") {
                    k.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    let before = rss_kib_sum(&pids);
    let mut peak = before;
    let sending = async {
        for i in 0..n {
            if sink.feed(template.frame(now_us())).await.is_err() {
                return i;
            }
            if i % 32 == 31 && sink.flush().await.is_err() {
                return i;
            }
            if i % 500 == 0 {
                peak = peak.max(rss_kib_sum(&pids));
            }
        }
        let _ = sink.flush().await;
        n
    };
    let sent = tokio::time::timeout(Duration::from_secs(30), sending)
        .await
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss_kib_sum(&pids));
    let kept = !kicked.load(Ordering::Relaxed);
    emit(&label, "flood_kib", peak.saturating_sub(before) as f64);
    emit(
        &label,
        "flood_errors",
        errors.load(Ordering::Relaxed) as f64,
    );
    emit(&label, "flood_reader_kept", if kept { 1.0 } else { 0.0 });
    eprintln!(
        "  {label} flood: {sent} of {n} x 1 KiB to a peer that never reads: RSS peak +{} KiB, \
         {} errors to the sender, reader {}",
        peak.saturating_sub(before),
        errors.load(Ordering::Relaxed),
        if kept { "kept" } else { "disconnected" }
    );
}
