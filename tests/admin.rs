//! The Admin API (`src/admin.rs`): off without a token; bearer auth with wrong tokens limited per
//! address; a room's view, closing a session and the instance list, on both engines (one
//! server each), and across two real instances on one real redis-server.
//!
//! Client addresses are faked as the other tests do: the server trusts 127.0.0.1 as a proxy
//! (`--trusted-proxies`) and each request names its client in `X-Forwarded-For`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{bounded, Ctx, RedisCluster, RedisServer, Server, ServerBuilder, Session, Ws};

const TOKEN: &str = "admin-token-for-the-tests-0123456789abcdef";
/// Wrong tokens an address may present before it is refused (`admin::FAILURE_BURST`).
const FAILURE_BURST: usize = 10;

fn with_admin(builder: ServerBuilder) -> ServerBuilder {
    builder.args(["--admin-token", TOKEN, "--trusted-proxies", "127.0.0.1"])
}

/// One admin request: status, headers, JSON body (`Null` when not JSON).
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn admin(base: &str, method: &str, path: &str, token: Option<&str>, client: &str) -> Answer {
    let http = reqwest::Client::builder()
        .timeout(common::WAIT)
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("{base}{path}");
    let mut req = match method {
        "POST" => http.post(url),
        _ => http.get(url),
    };
    req = req.header("x-forwarded-for", client);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

async fn get(base: &str, path: &str) -> Answer {
    admin(base, "GET", path, Some(TOKEN), "10.9.9.9").await
}

async fn post(base: &str, path: &str) -> Answer {
    admin(base, "POST", path, Some(TOKEN), "10.9.9.9").await
}

/// This server's own instance id, from its `/admin/instances`.
async fn own_instance(base: &str) -> String {
    let a = get(base, "/admin/instances").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let me: Vec<&Value> = a.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["this"] == true)
        .collect();
    assert_eq!(me.len(), 1, "{}", a.body);
    me[0]["id"].as_str().unwrap().to_owned()
}

#[track_caller]
fn peer<'a>(view: &'a Value, id: &str) -> &'a Value {
    view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("peer {id} not in {view}"))
}

/// Nothing that grants anything shows in an admin view.
#[track_caller]
fn no_secrets(view: &Value, session: &Session, tokens: &[&str]) {
    let text = view.to_string();
    for secret in tokens
        .iter()
        .chain([&session.host.as_str(), &session.code.as_str()])
    {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    for key in ["code", "hash", "token", "passphrase", "offer", "answer"] {
        assert!(!text.contains(&format!("\"{key}\"")), "{key} in {text}");
    }
}

/// Both sockets are closed with 1000 and the operator's reason.
async fn closed_by_operator(ws: &mut Ws) {
    let (_, closed) = ws.expect_close().await;
    assert_eq!(closed.code(), Some(1000), "{closed:?}");
    let common::Closed::Frame(Some(frame)) = &closed else {
        unreachable!()
    };
    assert!(frame.reason.contains("closed"), "{frame:?}");
}

/// A join of a closed session is refused, over HTTP and over the host's token.
async fn cannot_join(server: &Server, session: &Session) {
    let r = server
        .api()
        .post(
            &format!("/sessions/{}/join", session.id),
            &json!({ "passphrase": session.code }),
        )
        .await;
    assert_ne!(
        r.body["success"], true,
        "joined a closed session: {}",
        r.body
    );
    let mut ws = Ws::connect(&server.ws_url(&session.host)).await;
    let reason = ws.join_refused(Some(&session.code)).await;
    assert_eq!(reason, "Session not found");
}

/// A registered session and its host, on `server` (as `Ctx::hosted`).
async fn hosted_on(server: &Server) -> (Session, Ws) {
    let session = server.api().new_session(None).await;
    let mut host = Ws::connect(&server.ws_url(&session.host)).await;
    host.join(Some(&session.code)).await;
    (session, host)
}

/// A joiner of `session` on `server` (as `Ctx::joiner`): its socket and its token.
async fn joiner_on(server: &Server, session: &Session) -> (Ws, String) {
    let token = server.api().join_token(&session.id, &session.code).await;
    let mut ws = Ws::connect(&server.ws_url(&token)).await;
    ws.join(Some(&session.code)).await;
    (ws, token)
}

/// Runs each body against both engines (Redis: one node and a cluster), each with its own server
/// with the Admin API on.
macro_rules! both_engines {
    ($(async fn $name:ident($ctx:ident: &Ctx) $body:block)*) => {
        $(async fn $name($ctx: &Ctx) $body)*
        mod memory {
            use crate::common::{bounded, Ctx, Engine, ServerBuilder};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx = Ctx::start_with(Engine::Memory, super::with_admin(ServerBuilder::new())).await;
                    bounded(super::$name(&ctx)).await;
                }
            )*
        }
        mod redis {
            use crate::common::{bounded, Ctx, Engine, ServerBuilder};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx = Ctx::start_with(Engine::Redis, super::with_admin(ServerBuilder::new())).await;
                    bounded(super::$name(&ctx)).await;
                }
            )*
        }
        mod cluster {
            use crate::common::{bounded, Ctx, Engine, ServerBuilder};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ctx = Ctx::start_with(Engine::RedisCluster, super::with_admin(ServerBuilder::new())).await;
                    bounded(super::$name(&ctx)).await;
                }
            )*
        }
    };
}

both_engines! {
    async fn missing_or_wrong_tokens_get_401_and_a_guesser_is_limited_alone(ctx: &Ctx) {
        let base = ctx.base();
        let missing = admin(&base, "GET", "/admin/instances", None, "1.2.3.4").await;
        assert_eq!(missing.status, 401);
        assert!(missing.headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        assert!(missing.body["error"].is_string(), "{}", missing.body);
        let path = "/admin/sessions/some-session/close";
        for i in 0..FAILURE_BURST {
            let wrong = admin(&base, "POST", path, Some("not-the-token"), "1.2.3.4").await;
            assert_eq!(wrong.status, 401, "wrong token {i}");
            assert!(wrong.headers.contains_key("www-authenticate"));
            assert!(wrong.body["error"].is_string(), "{}", wrong.body);
        }
        let locked = admin(&base, "POST", path, Some("not-the-token"), "1.2.3.4").await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        assert!(locked.headers.contains_key("retry-after"));
        // Refused without a comparison: even the right token, from the guesser's address.
        let right = admin(&base, "GET", "/admin/instances", Some(TOKEN), "1.2.3.4").await;
        assert_eq!(right.status, 429);
        // The operator elsewhere is not locked out.
        let operator = admin(&base, "GET", "/admin/instances", Some(TOKEN), "5.6.7.8").await;
        assert_eq!(operator.status, 200, "{}", operator.body);
    }

    async fn a_room_is_shown_closed_for_good_and_closing_again_is_harmless(ctx: &Ctx) {
        let base = ctx.base();
        let mut room = ctx.room().await;
        let session = &room.session;
        let me = own_instance(&base).await;

        let view = get(&base, &format!("/admin/sessions/{}", session.id)).await;
        assert_eq!(view.status, 200, "{}", view.body);
        let v = &view.body;
        assert_eq!(v["id"], session.id.as_str());
        assert!(v["created_at"].as_u64().unwrap() > 0, "{v}");
        assert!(v["expires_at"].as_u64().unwrap() > v["created_at"].as_u64().unwrap(), "{v}");
        assert!(v["closed_at"].is_null(), "{v}");
        assert_eq!(v["peers"].as_array().unwrap().len(), 2, "{v}");
        let host = peer(v, &room.host.id());
        assert_eq!(host["role"], "server");
        assert_eq!(host["instance"], me.as_str());
        assert!(host["joined_at"].as_u64().unwrap() > 0);
        assert_eq!(host["supported_transports"], json!(["webrtc"]));
        let joiner = peer(v, &room.joiner.id());
        assert_eq!(joiner["role"], "client");
        assert_eq!(joiner["instance"], me.as_str());
        no_secrets(v, session, &[&room.joiner_token]);

        let closed = post(&base, &format!("/admin/sessions/{}/close", session.id)).await;
        assert_eq!(closed.status, 200, "{}", closed.body);
        assert_eq!(closed.body["closed"], true);
        assert_eq!(closed.body["already_closed"], false);
        assert_eq!(closed.body["peers"], 2);
        closed_by_operator(&mut room.host).await;
        closed_by_operator(&mut room.joiner).await;
        cannot_join(&ctx.server, session).await;
        let status = ctx.api().status(&session.id).await;
        assert_eq!(status.body["exists"], false, "{}", status.body);

        let again = post(&base, &format!("/admin/sessions/{}/close", session.id)).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.body["already_closed"], true);
        let view = get(&base, &format!("/admin/sessions/{}", session.id)).await;
        assert_eq!(view.status, 200, "{}", view.body);
        assert!(view.body["closed_at"].as_u64().is_some(), "{}", view.body);
        assert_eq!(view.body["peers"], json!([]));
        // The id stays taken.
        let register = ctx.api().register(&session.id, None).await;
        assert_eq!(register["success"], false, "{register}");
    }

    async fn unknown_sessions_are_404_and_the_instance_is_listed(ctx: &Ctx) {
        let base = ctx.base();
        let id = common::uuid();
        let view = get(&base, &format!("/admin/sessions/{id}")).await;
        assert_eq!(view.status, 404);
        assert!(view.body["error"].is_string(), "{}", view.body);
        let close = post(&base, &format!("/admin/sessions/{id}/close")).await;
        assert_eq!(close.status, 404);
        // A token is not a session id.
        let session = ctx.session().await;
        let by_token = get(&base, &format!("/admin/sessions/{}", session.host)).await;
        assert_eq!(by_token.status, 404);
        let bad = get(&base, "/admin/sessions/no:colons").await;
        assert_eq!(bad.status, 400);

        let list = get(&base, "/admin/instances").await;
        assert_eq!(list.status, 200, "{}", list.body);
        let instances = list.body["instances"].as_array().unwrap();
        assert_eq!(instances.len(), 1, "{}", list.body);
        assert_eq!(instances[0]["this"], true);
        assert!(instances[0]["heartbeat_age_ms"].as_u64().unwrap() < 5000, "{}", list.body);
    }
}

/// Off: every admin path is the 404 of an unknown path, with or without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_does_not_exist() {
    bounded(async {
        let server = Server::start().await;
        let base = server.base();
        let unknown = admin(&base, "GET", "/no-such-path", None, "1.2.3.4").await;
        assert_eq!(unknown.status, 404);
        let (session, _host) = hosted_on(&server).await;
        let paths = [
            ("GET", "/admin/instances".to_owned()),
            ("GET", format!("/admin/sessions/{}", session.id)),
            ("POST", format!("/admin/sessions/{}/close", session.id)),
            ("GET", "/admin".to_owned()),
            ("GET", "/admin/".to_owned()),
        ];
        for (method, path) in paths {
            for token in [None, Some(TOKEN)] {
                let a = admin(&base, method, &path, token, "1.2.3.4").await;
                assert_eq!(a.status, unknown.status, "{method} {path}");
                assert_eq!(a.body, unknown.body, "{method} {path}");
                assert!(
                    !a.headers.contains_key("www-authenticate"),
                    "{method} {path}"
                );
            }
        }
        // And nothing was closed.
        let (_ws, _) = joiner_on(&server, &session).await;
    })
    .await;
}

/// A token shorter than 32 bytes, or two of them, stops the server at start with a clear error.
#[tokio::test]
async fn a_short_token_refuses_to_start() {
    let dir = common::TempDir::new("admin-token");
    let file = dir.join("token");
    std::fs::write(&file, "too-short\n").unwrap();
    let cases: [Vec<String>; 3] = [
        vec!["--admin-token".into(), "short".into()],
        vec!["--admin-token-file".into(), file.display().to_string()],
        vec![
            "--admin-token".into(),
            TOKEN.into(),
            "--admin-token-file".into(),
            file.display().to_string(),
        ],
    ];
    for args in cases {
        let out = bounded_output(
            Command::new(env!("CARGO_BIN_EXE_beach-road"))
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &common::free_port().to_string(),
                ])
                .args(&args)
                .env_remove("REDIS_URL")
                .env_remove("BEACH_ROAD_ADMIN_TOKEN")
                .env_remove("BEACH_ROAD_ADMIN_TOKEN_FILE"),
        )
        .await;
        assert!(!out.0, "started with {args:?}");
        assert!(
            out.1.contains("admin token") || out.1.contains("--admin-token"),
            "{args:?}: {}",
            out.1
        );
        assert!(
            !out.1.contains("short"),
            "the token is never printed: {}",
            out.1
        );
    }
}

/// Runs the command to its end (killed after 10 s): (success, stdout + stderr).
async fn bounded_output(cmd: &mut Command) -> (bool, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn beach-road");
    let pid = child.id() as i32;
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(out) => {
            let out = out.unwrap().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("beach-road did not exit");
        }
    }
}

/// Two instances on one Redis: the host on A, the joiner on B. A's view shows both with their
/// roles and instances; a close on A closes both sockets and the session cannot be joined on B;
/// both instances are listed with fresh heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_instances_the_view_and_the_close_reach_every_member() {
    let redis = RedisServer::start();
    across_instances(&redis.url()).await;
}

/// The same on a Redis Cluster: the close's messages to the other instance go as a pack of one
/// on its shard channel, and the tokens are deleted one by one (each in its own slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_instances_on_a_cluster_the_view_and_the_close_reach_every_member() {
    let redis = tokio::task::block_in_place(RedisCluster::start);
    across_instances(&redis.url()).await;
}

async fn across_instances(url: &str) {
    bounded(async {
        let secret = format!("admin-cluster-{}-{}", common::uuid(), common::uuid());
        let start = |_| {
            with_admin(ServerBuilder::new())
                .redis_url(url)
                .args(["--secret", &secret, "--heartbeat-interval", "250ms"])
                .start()
        };
        let a = start(0).await;
        let b = start(1).await;
        let (ia, ib) = (own_instance(&a.base()).await, own_instance(&b.base()).await);
        assert_ne!(ia, ib);

        let (session, mut host) = hosted_on(&a).await;
        let (mut joiner, token) = joiner_on(&b, &session).await;
        host.recv_type("peer_joined").await;

        for server in [&a, &b] {
            let view = get(&server.base(), &format!("/admin/sessions/{}", session.id)).await;
            assert_eq!(view.status, 200, "{}", view.body);
            let v = &view.body;
            assert_eq!(v["peers"].as_array().unwrap().len(), 2, "{v}");
            let h = peer(v, &host.id());
            assert_eq!(h["role"], "server");
            assert_eq!(h["instance"], ia.as_str());
            let j = peer(v, &joiner.id());
            assert_eq!(j["role"], "client");
            assert_eq!(j["instance"], ib.as_str());
            no_secrets(v, &session, &[&token]);
        }

        let list = get(&a.base(), "/admin/instances").await;
        let instances = list.body["instances"].as_array().unwrap().clone();
        assert_eq!(instances.len(), 2, "{}", list.body);
        for id in [&ia, &ib] {
            let i = instances
                .iter()
                .find(|i| i["id"] == id.as_str())
                .unwrap_or_else(|| panic!("{id} not in {}", list.body));
            assert_eq!(i["this"], *id == ia);
            let age = i["heartbeat_age_ms"].as_u64().unwrap();
            assert!(age < 2000, "heartbeat {age} ms old: {}", list.body);
        }

        let began = Instant::now();
        let closed = post(&a.base(), &format!("/admin/sessions/{}/close", session.id)).await;
        assert_eq!(closed.status, 200, "{}", closed.body);
        assert_eq!(closed.body["peers"], 2);
        closed_by_operator(&mut host).await;
        closed_by_operator(&mut joiner).await;
        eprintln!("both sockets closed {:?} after the close", began.elapsed());
        cannot_join(&b, &session).await;
        cannot_join(&a, &session).await;
        let view = get(&b.base(), &format!("/admin/sessions/{}", session.id)).await;
        assert!(view.body["closed_at"].is_u64(), "{}", view.body);
        let again = post(&b.base(), &format!("/admin/sessions/{}/close", session.id)).await;
        assert_eq!(again.body["already_closed"], true, "{}", again.body);
        drop((a, b));
    })
    .await;
}

/// A join that resolved the session just before the close is refused by the engine itself
/// (`lua/join.lua`'s tombstone check; the in-process state's), and leaves no member behind.
async fn join_after_close_is_refused<E: beach_road::engine::Engine>(e: E) {
    use beach_road::engine::admin::CloseOutcome;
    use beach_road::engine::{Entry, JoinResult, NewPeer, SessionRecord};
    use beach_road::protocol::{new_id, Role};
    let (id, host) = (new_id(), new_id());
    let record = SessionRecord {
        id: id.clone(),
        created_at: 1,
        code: "digest".into(),
        relay: false,
    };
    assert!(e.register(record, &host).await.unwrap());
    let access = e
        .resolve(&host)
        .await
        .unwrap()
        .expect("resolves before the close");
    assert_eq!(
        e.admin_close(&id).await.unwrap(),
        CloseOutcome::Closed { peers: 0 }
    );
    let _queue = e.connect("late");
    let peer = NewPeer {
        id: "late".into(),
        role: Role::Server,
        supported_transports: Vec::new(),
        preferred_transport: None,
        metadata: None,
    };
    let r = e
        .join(&access.session.id, peer, 32, Entry::Admitted)
        .await
        .unwrap();
    assert!(matches!(r, JoinResult::Closed), "{r:?}");
    assert!(!e.is_member(&id, "late").await.unwrap());
    assert!(
        e.resolve(&host).await.unwrap().is_none(),
        "the host token is gone"
    );
    assert!(
        e.resolve(&id).await.unwrap().is_none(),
        "the session id is gone"
    );
    let view = e.admin_session(&id).await.unwrap().expect("the tombstone");
    assert!(
        view.closed_at.is_some() && view.peers.is_empty(),
        "{view:?}"
    );
    assert!(view.created_at > 0, "{view:?}");
    e.disconnect("late").await;
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_refuses_a_join_after_the_close() {
    let config = beach_road::engine::EngineConfig::default();
    let e = beach_road::engine::memory::MemoryEngine::start(config);
    bounded(join_after_close_is_refused(e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_engine_refuses_a_join_after_the_close() {
    let redis = RedisServer::start();
    let settings = common::redis::engine_settings(&redis.url());
    let config = beach_road::engine::EngineConfig::default();
    bounded(async {
        let e = common::redis::ready_engine(config, settings).await;
        join_after_close_is_refused(e).await;
    })
    .await;
}
