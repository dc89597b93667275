//! What an operator sees: `/metrics` scraped and parsed after real traffic, with the expected
//! series moving (both engines, two instances, a Redis outage), who may scrape it, and JSON log
//! lines with the events and the span fields an operator searches by.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::metrics::{base, Scrape};
use common::redis::RedisServer;
use common::{bounded, Ctx, Engine, ServerBuilder, Ws};

fn signal(to: &str, n: u64) -> Value {
    json!({
        "type": "signal",
        "to_peer": to,
        "signal": { "transport": "webrtc", "signal": { "signal_type": "ice_candidate", "n": n } },
    })
}

/// A room, four signals each way, one `negotiate_transport`, a wrong code and a departure.
async fn traffic(ctx: &Ctx) -> (Ws, Ws) {
    let mut room = ctx.room().await;
    let (host_id, joiner_id) = (room.host.id(), room.joiner.id());
    for n in 0..4 {
        room.host.send_json(signal(&joiner_id, n)).await;
        room.joiner.send_json(signal(&host_id, n)).await;
    }
    for _ in 0..4 {
        room.joiner.recv_type("signal").await;
        room.host.recv_type("signal").await;
    }
    room.host
        .send_json(json!({ "type": "negotiate_transport", "to_peer": joiner_id, "proposed_transport": "webrtc" }))
        .await;
    room.joiner.recv_type("transport_proposal").await;
    // A signal to nobody: refused and reported.
    room.host.send_json(signal("nobody-here", 9)).await;
    room.host.recv_type("error").await;
    // A wrong code.
    let refused = ctx.api().join_http(&room.session.id, Some("000000x")).await;
    assert_eq!(refused["success"], false);
    // A third member comes and goes.
    let (third, _) = ctx.joiner(&room.session).await;
    room.host.recv_type("peer_joined").await;
    room.joiner.recv_type("peer_joined").await;
    third.close().await;
    room.host.recv_type("peer_left").await;
    room.joiner.recv_type("peer_left").await;
    (room.host, room.joiner)
}

async fn series_move_after_traffic(engine: Engine) {
    let ctx = Ctx::start(engine).await;
    let before = Scrape::of(&ctx.server).await;
    assert_eq!(before.get("beach_road_sessions_registered_total", &[]), 0.0);
    let (_host, _joiner) = traffic(&ctx).await;
    // The third socket's task ends (and gives back its slot) just after its `peer_left` went out:
    // the open-sockets gauge may read 3 for a moment.
    let mut after = Scrape::of(&ctx.server).await;
    let settle = std::time::Instant::now();
    while after.get("beach_road_websockets_open", &[]) != 2.0
        && settle.elapsed() < std::time::Duration::from_secs(5)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        after = Scrape::of(&ctx.server).await;
    }
    let name = format!("{engine:?}");
    let v = |n: &str, l: &[(&str, &str)]| after.get(n, l);
    assert_eq!(
        v("beach_road_sessions_registered_total", &[]),
        1.0,
        "{name}"
    );
    assert_eq!(
        v("beach_road_peers_joined_total", &[("role", "server")]),
        1.0
    );
    assert_eq!(
        v("beach_road_peers_joined_total", &[("role", "client")]),
        2.0
    );
    assert_eq!(v("beach_road_peers_left_total", &[]), 1.0);
    let local = [("type", "signal"), ("path", "local")];
    assert_eq!(
        v("beach_road_messages_relayed_total", &local),
        8.0,
        "{name}"
    );
    let proposal = [("type", "transport_proposal"), ("path", "local")];
    assert_eq!(v("beach_road_messages_relayed_total", &proposal), 1.0);
    assert_eq!(
        v("beach_road_relay_errors_total", &[("reason", "not_member")]),
        1.0
    );
    assert_eq!(v("beach_road_code_failures_total", &[]), 1.0);
    assert_eq!(v("beach_road_websockets_open", &[]), 2.0);
    assert_eq!(v("beach_road_peers_joined", &[]), 2.0);
    assert_eq!(v("beach_road_rooms_local", &[]), 1.0);
    assert_eq!(v("beach_road_draining", &[]), 0.0);
    assert!(v("beach_road_runtime_scheduling_lag_seconds", &[]) < 1.0);
    let engine_label = if engine == Engine::Redis {
        "redis"
    } else {
        "memory"
    };
    assert_eq!(v("beach_road_build_info", &[("engine", engine_label)]), 1.0);
    if engine == Engine::Redis {
        let joins = [("command", "join")];
        assert!(v("beach_road_redis_command_duration_seconds_count", &joins) >= 3.0);
        assert!(after.get("beach_road_pubsub_self_ping_age_seconds", &[]) < 5.0);
        assert!(after.has("beach_road_pubsub_self_ping_age_seconds"));
        assert!(after.has("beach_road_heartbeat_age_seconds"));
        assert!(v("beach_road_pubsub_resubscriptions_total", &[]) >= 1.0);
    }
}

mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn series_move_after_traffic() {
        super::bounded(super::series_move_after_traffic(super::Engine::Memory)).await
    }
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn series_move_after_traffic() {
        super::bounded(super::series_move_after_traffic(super::Engine::Redis)).await
    }
}

/// Across two instances the sender's instance counts the relay as `redis`; a Redis outage shows
/// as errors by command and refusals; every series of the table is exported by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_and_an_outage() {
    bounded(async {
        let mut redis = RedisServer::start();
        let secret = "s".repeat(40);
        let start = || {
            ServerBuilder::new()
                .redis_url(&redis.url())
                .env("BEACH_ROAD_SECRET", &secret)
                .start()
        };
        let a = start().await;
        let b = start().await;
        let session = a.api().new_session(None).await;
        let mut host = Ws::connect(&a.ws_url(&session.host)).await;
        host.join(Some(&session.code)).await;
        let token = b.api().join_token(&session.id, &session.code).await;
        let mut joiner = Ws::connect(&b.ws_url(&token)).await;
        joiner.join(Some(&session.code)).await;
        host.recv_type("peer_joined").await;
        for n in 0..3 {
            host.send_json(signal(&joiner.id(), n)).await;
            joiner.recv_type("signal").await;
        }
        let sa = Scrape::of(&a).await;
        let sb = Scrape::of(&b).await;
        let via = [("type", "signal"), ("path", "redis")];
        assert_eq!(sa.get("beach_road_messages_relayed_total", &via), 3.0);
        assert_eq!(sb.get("beach_road_messages_relayed_total", &via), 0.0);
        let publish = [("command", "PUBLISH")];
        assert!(sa.get("beach_road_redis_command_duration_seconds_count", &publish) >= 3.0);
        assert_eq!(sa.get("beach_road_peers_joined", &[]), 1.0);
        assert_eq!(sb.get("beach_road_peers_joined", &[]), 1.0);

        redis.kill();
        let resp = a
            .api()
            .post("/sessions", &json!({ "session_id": "during-outage" }))
            .await;
        assert_eq!(resp.status, 503);
        let s = Scrape::of(&a).await;
        assert!(s.get("beach_road_redis_errors_total", &[]) >= 1.0);
        assert!(
            s.get(
                "beach_road_refusals_total",
                &[("reason", "store_unavailable")]
            ) >= 1.0
        );
        for &(name, kind, _) in beach_road::metrics::SERIES {
            let exported = match kind {
                beach_road::metrics::Kind::Histogram => format!("{name}_bucket"),
                _ => name.to_owned(),
            };
            assert!(s.has(&exported), "{name} is not exported");
        }
        // Nothing exported that the table does not describe.
        for series in s.0.keys() {
            let name = base(series);
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|sfx| name.strip_suffix(sfx))
                .unwrap_or(name);
            assert!(
                beach_road::metrics::SERIES
                    .iter()
                    .any(|(n, _, _)| *n == name),
                "{series} is not in metrics::SERIES"
            );
        }
    })
    .await
}

/// Server-side disconnects and refusals are counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_and_refusals_by_reason() {
    bounded(async {
        let server = ServerBuilder::new()
            .args(["--join-timeout", "300ms", "--max-sockets-per-address", "1"])
            .start()
            .await;
        let mut idle = Ws::connect(&server.ws_url("some-session")).await;
        let refused = Ws::try_connect(&server.ws_url("some-session")).await;
        assert!(refused.is_err(), "a second socket from one address");
        let (_, closed) = idle.expect_close().await;
        assert_eq!(closed.code(), Some(1008));
        let s = Scrape::of(&server).await;
        assert_eq!(
            s.get(
                "beach_road_disconnects_total",
                &[("reason", "join_timeout")]
            ),
            1.0
        );
        assert_eq!(
            s.get(
                "beach_road_refusals_total",
                &[("reason", "sockets_per_address")]
            ),
            1.0
        );
    })
    .await
}

/// Only `--metrics-allow` addresses scrape, and never through a trusted proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_only_for_allowed_direct_scrapers() {
    bounded(async {
        let elsewhere = ServerBuilder::new()
            .args(["--metrics-allow", "10.9.9.9/32"])
            .start()
            .await;
        let resp = elsewhere.api().get("/metrics").await.expect("an answer");
        assert_eq!(resp.status, 404);
        let proxied = ServerBuilder::new()
            .args(["--trusted-proxies", "127.0.0.1"])
            .start()
            .await;
        let resp = proxied.api().get("/metrics").await.expect("an answer");
        assert_eq!(resp.status, 404, "a scrape relayed by the load balancer");
        let open = ServerBuilder::new().start().await;
        let resp = open.api().get_ok("/metrics").await;
        assert!(resp
            .body
            .as_str()
            .unwrap()
            .contains("# TYPE beach_road_sessions_registered_total counter"));
    })
    .await
}

/// `--log-format json`: one object per line; the events an operator searches for carry their
/// fields, and a connection's events carry its span's peer and session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_events_and_span_fields() {
    bounded(async {
        let builder = ServerBuilder::new().args(["--log-format", "json"]);
        let ctx = Ctx::start_with(Engine::Redis, builder).await;
        let (host, joiner) = traffic(&ctx).await;
        let (host_id, joiner_id) = (host.id(), joiner.id());
        joiner.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = ctx.server.log();
        let lines: Vec<Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let find = |message: &str, peer: Option<&str>| {
            lines
                .iter()
                .find(|l| l["message"] == message && peer.is_none_or(|p| l["peer"] == p))
                .unwrap_or_else(|| panic!("no {message:?} event for {peer:?} in\n{log}"))
                .clone()
        };
        let registered = find("session registered", None);
        assert!(registered["session"].is_string());
        assert_eq!(registered["span"]["name"], "request");
        assert_eq!(registered["span"]["route"], "/sessions");
        let session = registered["session"].as_str().unwrap().to_owned();
        let joined = find("peer joined", Some(&host_id));
        assert_eq!(joined["session"], session.as_str());
        assert_eq!(joined["role"], "server");
        assert!(joined["instance"].as_str().is_some_and(|i| !i.is_empty()));
        assert_eq!(joined["span"]["peer"], host_id.as_str());
        assert_eq!(joined["span"]["session"], session.as_str());
        let left = find("peer left", Some(&joiner_id));
        assert_eq!(left["session"], session.as_str());
        assert_eq!(left["level"], "INFO");
        let wrong = find("wrong join code", None);
        assert_eq!(wrong["session"], session.as_str());
        assert_eq!(wrong["span"]["route"], "/sessions/{id}/join");
    })
    .await
}

/// Every `beach_road_*` name in `text`, histogram suffixes removed.
fn series_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("beach_road_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|sfx| name.strip_suffix(sfx))
            .unwrap_or(name);
        names.push(name.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard is a dashboard (panels with queries and places) and, like the alert
/// rules, asks only for series the server exports.
#[test]
fn dashboard_and_alerts_use_only_exported_series() {
    let exported: Vec<&str> = beach_road::metrics::SERIES.iter().map(|s| s.0).collect();
    let text = include_str!("../deploy/grafana/beach-road.json");
    let dash: Value = serde_json::from_str(text).expect("the dashboard is JSON");
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut queried = Vec::new();
    for p in panels {
        assert!(
            p["id"].is_u64() && p["title"].is_string() && p["type"].is_string(),
            "{p}"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "gridPos.{k} of {}", p["title"]);
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            let names = series_names(expr);
            assert!(!names.is_empty(), "{expr} asks for no beach-road series");
            queried.extend(names);
        }
    }
    let alerts = include_str!("../deploy/prometheus/alerts.yml");
    let alert_names = series_names(alerts);
    assert!(alert_names.len() >= 8);
    for name in queried.iter().chain(&alert_names) {
        assert!(exported.contains(&name.as_str()), "{name} is not exported");
    }
    // And the dashboard shows every exported series.
    for name in &exported {
        assert!(queried.iter().any(|q| q == name), "{name} is on no panel");
    }
}
