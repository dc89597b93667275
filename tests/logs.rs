//! Logs never show secrets: with `RUST_LOG=trace` a whole flow (register with a chosen code, HTTP
//! join, two WebSocket joins with the code, ICE `signal`s both ways, offer and answer with an SDP
//! and a sealed payload through the mailbox, a `debug` request) leaves none of the code, the SDP,
//! the candidates, the ciphertext or the debug request in the server's log, neither as text nor
//! hex-encoded (the WebSocket library dumps frame payloads as hex at trace level). The log must
//! contain trace lines, so the test proves that the level really was trace.
//!
//! Each marker is random per run, so it cannot occur in the log by chance.

mod common;

use std::time::{Duration, Instant};

use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;

use common::{sealed_sdp, uuid, Ctx, Engine, Scope, ServerBuilder};

mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trace_logs_show_no_secrets() {
        super::trace_logs_show_no_secrets(super::Engine::Memory).await
    }
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trace_logs_show_no_secrets() {
        super::trace_logs_show_no_secrets(super::Engine::Redis).await
    }
}

/// `prefix` and 16 random letters and digits.
fn marker(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 16)
    )
}

async fn trace_logs_show_no_secrets(engine: Engine) {
    let builder = ServerBuilder::new().env("RUST_LOG", "trace");
    let ctx = Ctx::start_with(engine, builder).await;
    // Generation 2 style: a client-chosen code of six letters and digits (a generated 6-digit code
    // could occur in a log by chance, e.g. as the microseconds of a timestamp).
    let code = format!("Q{}", Alphanumeric.sample_string(&mut rand::rng(), 5)).to_uppercase();
    let secrets = Secrets {
        code: code.clone(),
        sdp: marker("sdpmarker"),
        candidate: marker("icemarker"),
        ciphertext: marker("sealedmarker"),
        debug: marker("debugmarker"),
    };
    let tokens = common::bounded(flow(&ctx, &secrets)).await;
    let log = settled_log(&ctx).await;
    // Tokens are capabilities (the host's makes its holder the host): never in the log either.
    for token in &tokens {
        assert!(
            !log.contains(token.as_str()),
            "[{engine:?}] a token is in the log"
        );
    }

    let leaks = secrets.leaks(&log);
    assert!(
        leaks.is_empty(),
        "[{engine:?}] the server log shows {leaks:?}; log at {}",
        ctx.server.log_path().display()
    );
    let trace_lines = log.lines().filter(|l| l.contains(" TRACE ")).count();
    assert!(
        trace_lines > 0,
        "[{engine:?}] no TRACE line at all: RUST_LOG=trace did not take effect\n{log}"
    );
}

struct Secrets {
    code: String,
    sdp: String,
    candidate: String,
    ciphertext: String,
    debug: String,
}

impl Secrets {
    /// The secrets found in `log`, as text or as hex.
    fn leaks(&self, log: &str) -> Vec<String> {
        let log_lower = log.to_lowercase();
        let mut found = Vec::new();
        for (what, s) in [
            ("join code", &self.code),
            ("SDP", &self.sdp),
            ("ICE candidate", &self.candidate),
            ("sealed ciphertext", &self.ciphertext),
            ("debug request", &self.debug),
        ] {
            if log.contains(s.as_str()) {
                found.push(format!("the {what} {s:?}"));
            }
            if log_lower.contains(&hex::encode(s)) {
                found.push(format!("the {what} {s:?} hex-encoded"));
            }
        }
        found
    }
}

/// Returns the tokens the flow used (the host's and the joiner's).
async fn flow(ctx: &Ctx, s: &Secrets) -> [String; 2] {
    let api = ctx.api();
    let session = ctx.session_with(Some(&s.code)).await;
    assert_eq!(session.code, s.code);
    let token = api.join_token(&session.id, &s.code).await;

    let mut host = ctx.ws(&session.host).await;
    host.join(Some(&s.code)).await;
    let mut joiner = ctx.ws(&token).await;
    joiner.join(Some(&s.code)).await;
    host.recv_type("peer_joined").await;
    let (host_id, joiner_id) = (host.id(), joiner.id());

    // ICE both ways.
    let h = uuid();
    let ice = |side: &str| {
        json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
            "candidate": format!("candidate:1 1 udp 2122260223 127.0.0.1 4444{side} typ host {}",
                                 s.candidate),
            "sdp_mid": "0", "sdp_mline_index": 0, "handshake_id": h}})
    };
    host.send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": ice("1")}))
        .await;
    assert_eq!(joiner.recv_type("signal").await["signal"], ice("1"));
    joiner
        .send_json(json!({"type": "signal", "to_peer": host_id, "signal": ice("2")}))
        .await;
    assert_eq!(host.recv_type("signal").await["signal"], ice("2"));

    // Offer and answer through the mailbox, each with an SDP and a sealed payload.
    let payload = |kind: &str, from: &str, to: &str| {
        let mut p = sealed_sdp(kind, &h, from, to);
        p["sdp"] = json!(format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns={}-{kind}\r\n",
            s.sdp
        ));
        p["sealed"]["ciphertext"] = json!(format!("{}/{kind}", s.ciphertext));
        p
    };
    let offer = payload("offer", &host_id, &joiner_id);
    api.post_sdp(Scope::Sessions, &session.host, "offer", &offer)
        .await
        .assert_status(204);
    let got = api.get_offer(Scope::Sessions, &token, &joiner_id).await;
    got.assert_status(200);
    assert_eq!(got.body, offer);
    let answer = payload("answer", &joiner_id, &host_id);
    api.post_sdp(Scope::Sessions, &token, "answer", &answer)
        .await
        .assert_status(204);
    let got = api.get_answer(Scope::Sessions, &session.host, &h).await;
    got.assert_status(200);
    assert_eq!(got.body, answer);

    // A debug request reaches the server peer.
    joiner
        .send_json(json!({"type": "debug", "request": {"type": "get_stats", "note": s.debug}}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(
        got["signal"]["payload"]["request"]["note"],
        s.debug.as_str()
    );

    joiner.close_abruptly().await;
    host.recv_type("peer_left").await;
    host.close_abruptly().await;
    [session.host, token]
}

/// The log once the non-blocking writer has caught up: unchanged for 300 ms (bounded).
async fn settled_log(ctx: &Ctx) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = ctx.server.log();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = ctx.server.log();
        if now.len() == last.len() || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}
