//! The full flows of both client generations and of the browser client, written once and run
//! where the host side and the joiner side connect: the same server (`conformance.rs`, on each
//! engine) or two instances on one Redis (`cluster.rs`, host on A, joiner on B).
//!
//! "Host side" is every request the host makes (register, attach, its socket, posting the offer,
//! polling the answer); "joiner side" every request the joiner makes.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    find_peer, hex_bytes, is_six_digits, sdp, sealed_sdp, url_id, uuid, Scope, Server, Ws,
};

/// Long enough for a stray message to show up on loopback.
const QUIET: Duration = Duration::from_millis(500);

/// The socket still answers: `ping` → `pong`.
async fn ping_pong(ws: &mut Ws) {
    ws.send_json(json!({"type": "ping"})).await;
    ws.recv_type("pong").await;
}

/// The joiner proposes `webrtc` to the host (`negotiate_transport` → `transport_proposal`), the
/// host accepts (`accept_transport` → `transport_accepted`).
async fn negotiate_webrtc(joiner: &mut Ws, host: &mut Ws) {
    let (host_id, joiner_id) = (host.id(), joiner.id());
    joiner
        .send_json(json!({"type": "negotiate_transport", "to_peer": host_id,
                          "proposed_transport": "webrtc"}))
        .await;
    let got = host.recv_type("transport_proposal").await;
    assert_eq!(got["from_peer"], joiner_id.as_str());
    assert_eq!(got["proposed_transport"], "webrtc");
    host.send_json(json!({"type": "accept_transport", "to_peer": joiner_id,
                          "transport": "webrtc"}))
        .await;
    let got = joiner.recv_type("transport_accepted").await;
    assert_eq!(got["from_peer"], host_id.as_str());
}

/// `gone` quits with a bare TCP close (no close frame, as the CLIs do): `stays` hears exactly one
/// `peer_left`, for it.
async fn leaves(gone: Ws, stays: &mut Ws) {
    let gone_id = gone.id();
    gone.close_abruptly().await;
    assert_eq!(
        stays.recv_type("peer_left").await,
        json!({"type": "peer_left", "peer_id": gone_id})
    );
    stays.expect_silence(QUIET).await;
}

/// Generation 1: a generated code, the joiner joins over HTTP and then the socket of the
/// session id, offer and answer through the mailbox at the signaling URL, ICE over the sockets.
pub async fn generation1_flow(host_side: &Server, joiner_side: &Server) {
    let (api_h, api_j) = (host_side.api(), joiner_side.api());
    let id = uuid();
    // Host registers without a passphrase: a 6-digit code; the URLs point at its instance.
    let reg = api_h.register(&id, None).await;
    assert_eq!(reg["success"], true, "{reg}");
    let code = reg["join_code"].as_str().unwrap().to_owned();
    assert!(is_six_digits(&code), "join_code {code:?}");
    assert_eq!(reg["transports"][0]["kind"], "web_rtc");
    assert_eq!(reg["transports"][1]["kind"], "web_socket");
    // The host's URLs carry its token, not the session id everybody is told.
    let host_signaling = reg["transports"][0]["metadata"]["signaling_url"]
        .as_str()
        .unwrap();
    let host_token = url_id(host_signaling);
    assert_ne!(host_token, id);
    assert_eq!(
        host_signaling,
        format!("{}/sessions/{host_token}/webrtc", host_side.base())
    );
    assert_eq!(reg["websocket_url"], host_side.ws_url(&host_token));
    assert_eq!(reg["transports"][1]["url"], host_side.ws_url(&host_token));
    assert_eq!(reg["session_id"], id.as_str());

    let mut host = Ws::connect(reg["websocket_url"].as_str().unwrap()).await;
    let ok = host.join(Some(&code)).await;
    assert_eq!(ok["peers"][0]["role"], "server");
    ping_pong(&mut host).await;

    // The joiner: HTTP join with the code (the session is found on its side), then the socket.
    assert_eq!(api_j.status(&id).await.body["exists"], true);
    let join = api_j
        .post(
            &format!("/sessions/{id}/join"),
            &json!({"passphrase": code, "label": "probe-joiner"}),
        )
        .await;
    join.assert_status(200);
    assert_eq!(join.body["success"], true, "{}", join.body);
    let signaling = join.body["webrtc_offer"]["signaling_url"]
        .as_str()
        .unwrap()
        .to_owned();
    // The joiner's URLs carry its own token.
    let token = url_id(&signaling);
    assert_ne!(token, id);
    assert_ne!(token, host_token);
    assert_eq!(
        signaling,
        format!("{}/sessions/{token}/webrtc", joiner_side.base())
    );
    assert_eq!(join.body["websocket_url"], joiner_side.ws_url(&token));
    let mut joiner = Ws::connect(join.body["websocket_url"].as_str().unwrap()).await;
    let mut msg = Ws::join_msg(Some(&code));
    msg["label"] = json!("probe-joiner");
    let ok = joiner.join_with(msg).await;
    let (host_id, joiner_id) = (host.id(), joiner.id());
    assert_eq!(ok["peers"].as_array().unwrap().len(), 2, "{ok}");
    assert_eq!(find_peer(&ok, &joiner_id)["role"], "client");
    assert_eq!(find_peer(&ok, &host_id)["role"], "server");
    let joined = host.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["id"], joiner_id.as_str());
    assert_eq!(joined["peer"]["role"], "client");
    assert_eq!(joined["peer"]["metadata"]["label"], "probe-joiner");
    ping_pong(&mut joiner).await;

    // Offer posted by the host, polled by the joiner at the paths of its signaling URL; answer
    // posted there by the joiner, polled by the host. ICE over the sockets.
    let scope = Scope::Sessions;
    let path = signaling
        .strip_prefix(&joiner_side.base())
        .unwrap()
        .to_owned();
    let poll_offer = format!("{path}/offer?peer_id={joiner_id}");
    assert_eq!(api_j.get_ok(&poll_offer).await.status, 404);
    let h = uuid();
    let offer = sdp("offer", &h, &host_id, &joiner_id);
    api_h
        .post_sdp(scope, &host_token, "offer", &offer)
        .await
        .assert_status(204);
    // ICE trickled by the host before the joiner fetched the offer: relayed at once.
    let ice = |n: u32| {
        json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
            "candidate": format!("candidate:{n}"), "sdp_mid": "", "sdp_mline_index": 0,
            "handshake_id": h}})
    };
    host.send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": ice(1)}))
        .await;
    assert_eq!(api_h.get_answer(scope, &host_token, &h).await.status, 404);
    let got = joiner.recv_type("signal").await;
    assert_eq!(got["from_peer"], host_id.as_str());
    assert_eq!(got["signal"], ice(1));
    let got = api_j.get_ok(&poll_offer).await;
    got.assert_status(200);
    assert_eq!(got.body, offer);
    // Nobody else takes the joiner's offers: not the host's URL, not the public id.
    assert_eq!(
        api_h.get_offer(scope, &host_token, &joiner_id).await.status,
        403
    );
    assert_eq!(api_j.get_offer(scope, &id, &joiner_id).await.status, 403);
    let answer = sdp("answer", &h, &joiner_id, &host_id);
    api_j
        .post(&format!("{path}/answer"), &answer)
        .await
        .assert_status(204);
    joiner
        .send_json(json!({"type": "signal", "to_peer": host_id, "signal": ice(2)}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(got["from_peer"], joiner_id.as_str());
    assert_eq!(got["signal"], ice(2));
    let got = api_h.get_answer(scope, &host_token, &h).await;
    got.assert_status(200);
    assert_eq!(got.body, answer);
    assert_eq!(api_h.get_answer(scope, &host_token, &h).await.status, 404);
    let poll_answer = format!("{path}/answer?handshake_id={h}");
    assert_eq!(api_j.get_ok(&poll_answer).await.status, 403);
    assert_eq!(api_j.get_ok(&poll_offer).await.status, 404);

    negotiate_webrtc(&mut joiner, &mut host).await;
    // debug from the joiner reaches the server peer.
    joiner
        .send_json(json!({"type": "debug", "request": {"type": "get_stats"}}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(got["signal"]["signal_type"], "debug_request");
    assert_eq!(got["signal"]["payload"]["from_peer"], joiner_id.as_str());

    // The joiner quits with a bare TCP close: the host hears of it, once.
    leaves(joiner, &mut host).await;
    ping_pong(&mut host).await;
    host.close_abruptly().await;
}

/// A generation-2 `join` on `/ws/{peer session}`: the attach details in `metadata`.
fn gen2_join_msg(id: &str, pid: &str, role: &str) -> Value {
    let mut msg = Ws::join_msg(Some("SMOKEP"));
    msg["metadata"] = json!({"peer_session_id": pid, "role": role,
                             "peer_id": msg["peer_id"], "host_session_id": id});
    msg
}

/// Generation 2: a client-chosen passphrase, both sides attach to one peer session and join on
/// its socket, sealed payloads through the `/peer-sessions` mailbox, and the joiner's fallback
/// socket on the host session id.
pub async fn generation2_flow(host_side: &Server, joiner_side: &Server) {
    let (api_h, api_j) = (host_side.api(), joiner_side.api());
    let id = uuid();
    let reg = api_h.register(&id, Some("SMOKEP")).await;
    assert_eq!(reg["join_code"], "SMOKEP");
    // Generation 2 attaches with the id of its signaling URL: for the host, its token, which
    // comes back as its peer session (and the real session id as host_session_id, which keys
    // its sealing).
    let host_token = url_id(
        reg["transports"][0]["metadata"]["signaling_url"]
            .as_str()
            .unwrap(),
    );
    let a = api_h.attach(&host_token, Some("SMOKEP"), "offerer").await;
    a.assert_status(200);
    let pid = a.body["peer_session_id"].as_str().unwrap().to_owned();
    assert_eq!(pid, host_token);
    assert_eq!(a.body["host_session_id"], id.as_str());
    let mut host = Ws::connect(&host_side.ws_url(&pid)).await;
    let ok = host.join_with(gen2_join_msg(&id, &pid, "offerer")).await;
    assert_eq!(ok["session_id"], id.as_str());
    assert_eq!(ok["peers"][0]["role"], "server");
    assert_eq!(ok["peers"][0]["metadata"]["role"], "offerer");
    ping_pong(&mut host).await;

    // Joiner: HTTP join, attach (same peer session), socket on the peer session.
    let join = api_j
        .post(
            &format!("/sessions/{id}/join"),
            &json!({"passphrase": "SMOKEP", "label": "probe-joiner"}),
        )
        .await;
    assert_eq!(join.body["success"], true, "{}", join.body);
    assert_eq!(join.body["webrtc_offer"]["label"], "probe-joiner");
    let token = url_id(join.body["webrtc_offer"]["signaling_url"].as_str().unwrap());
    assert_eq!(api_j.attach(&id, None, "answerer").await.status, 401);
    assert_eq!(
        api_j.attach(&id, Some("WRONG1"), "answerer").await.status,
        401
    );
    // The joiner attaches with its own token: that is its peer session.
    let b = api_j.attach(&token, Some("SMOKEP"), "answerer").await;
    b.assert_status(200);
    assert_eq!(b.body["peer_session_id"], token.as_str());
    assert_eq!(b.body["host_session_id"], id.as_str());
    let jpid = token;
    let mut joiner = Ws::connect(&joiner_side.ws_url(&jpid)).await;
    let mut msg = gen2_join_msg(&id, &jpid, "answerer");
    msg["label"] = json!("probe-joiner");
    let ok = joiner.join_with(msg).await;
    assert_eq!(ok["session_id"], id.as_str());
    let (host_id, joiner_id) = (host.id(), joiner.id());
    assert_eq!(find_peer(&ok, &joiner_id)["role"], "client");
    // join.metadata in PeerInfo, both ways.
    let host_info = find_peer(&ok, &host_id);
    assert_eq!(host_info["role"], "server");
    assert_eq!(host_info["metadata"]["role"], "offerer");
    // Tokens are capabilities: the one generation 2 copies into its metadata is not shown.
    assert!(host_info["metadata"].get("peer_session_id").is_none());
    let joined = host.recv_type("peer_joined").await;
    let meta = &joined["peer"]["metadata"];
    assert_eq!(joined["peer"]["id"], joiner_id.as_str());
    assert_eq!(meta["role"], "answerer");
    assert!(meta.get("peer_session_id").is_none(), "{meta}");
    assert_eq!(meta["host_session_id"], id.as_str());
    assert_eq!(meta["label"], "probe-joiner");
    ping_pong(&mut joiner).await;

    // Mailbox under /peer-sessions: 409 while empty, sealed payloads verbatim.
    let scope = Scope::PeerSessions;
    assert_eq!(api_j.get_offer(scope, &jpid, &joiner_id).await.status, 409);
    let h = uuid();
    assert_eq!(api_h.get_answer(scope, &pid, &h).await.status, 409);
    let offer = sealed_sdp("offer", &h, &host_id, &joiner_id);
    api_h
        .post_sdp(scope, &pid, "offer", &offer)
        .await
        .assert_status(204);
    let sealed_ice = json!({"transport": "webrtc", "signal": {"signal_type": "ice_candidate",
        "candidate": "", "sdp_mid": null, "sdp_mline_index": null, "handshake_id": h,
        "sealed": {"ciphertext": "z1bcb1TEX3/u", "nonce": "Dm1o1pW3SIsw0poe", "version": 1}}});
    host.send_json(json!({"type": "signal", "to_peer": joiner_id, "signal": sealed_ice}))
        .await;
    assert_eq!(api_h.get_answer(scope, &pid, &h).await.status, 409);
    let got = joiner.recv_type("signal").await;
    assert_eq!(got["from_peer"], host_id.as_str());
    assert_eq!(got["signal"], sealed_ice);
    let got = api_j.get_offer(scope, &jpid, &joiner_id).await;
    got.assert_status(200);
    assert_eq!(got.body, offer);
    assert_eq!(api_j.get_offer(scope, &jpid, &joiner_id).await.status, 409);
    joiner
        .send_json(json!({"type": "signal", "to_peer": host_id, "signal": sealed_ice}))
        .await;
    let got = host.recv_type("signal").await;
    assert_eq!(got["from_peer"], joiner_id.as_str());
    assert_eq!(got["signal"], sealed_ice);
    let answer = sealed_sdp("answer", &h, &joiner_id, &host_id);
    api_j
        .post_sdp(scope, &jpid, "answer", &answer)
        .await
        .assert_status(204);
    let got = api_h.get_answer(scope, &pid, &h).await;
    got.assert_status(200);
    assert_eq!(got.body, answer);
    assert_eq!(api_h.get_answer(scope, &pid, &h).await.status, 409);

    // The joiner's fallback socket on the host session id: binary frames, never joins.
    let mut fallback = Ws::connect(&joiner_side.ws_url(&id)).await;
    fallback
        .send_binary(hex_bytes("01000000000000000000000003417828"))
        .await;
    fallback
        .send_binary(hex_bytes("01000000000000000100000003417828"))
        .await;
    let mut errors = 0;
    while let Ok(Some(v)) = fallback.next(QUIET).await {
        assert_eq!(v["type"], "error");
        errors += 1;
    }
    assert!(errors <= 2, "{errors}");
    host.expect_silence(Duration::from_millis(50)).await;

    // Joiner quits: the fallback first, then its signaling socket. The host hears exactly one
    // peer_left, for the joiner (the original sent one for the fallback and none for the joiner).
    fallback.close_abruptly().await;
    leaves(joiner, &mut host).await;

    // The joiner comes back on its peer session; then the host quits: the joiner hears of it,
    // once.
    let mut joiner = Ws::connect(&joiner_side.ws_url(&jpid)).await;
    joiner
        .join_with(gen2_join_msg(&id, &jpid, "answerer"))
        .await;
    let joiner_id = joiner.id();
    assert_eq!(
        host.recv_type("peer_joined").await["peer"]["id"],
        joiner_id.as_str()
    );
    leaves(host, &mut joiner).await;
}

/// beach-surfer: HTTP join (needs `webrtc_offer`), never pings, negotiates the transport.
pub async fn browser_flow(host_side: &Server, joiner_side: &Server) {
    let (api_h, api_j) = (host_side.api(), joiner_side.api());
    let s = api_h.new_session(None).await;
    let mut host = Ws::connect(&host_side.ws_url(&s.host)).await;
    host.join(Some(&s.code)).await;

    let join = api_j.join_http(&s.id, Some(&s.code)).await;
    let token = url_id(join["webrtc_offer"]["signaling_url"].as_str().unwrap());
    let offer_meta = &join["webrtc_offer"];
    assert_eq!(offer_meta["role"], "answerer");
    assert_eq!(offer_meta["poll_interval_ms"], 250);
    let mut browser = Ws::connect(join["websocket_url"].as_str().unwrap()).await;
    let mut msg = json!({"type": "join", "peer_id": uuid(), "passphrase": s.code,
                         "supported_transports": ["webrtc"],
                         "preferred_transport": "webrtc", "label": "beach-surfer"});
    msg["mcp"] = Value::Null;
    let ok = browser.join_with(msg).await;
    let (host_id, browser_id) = (host.id(), browser.id());
    assert_eq!(find_peer(&ok, &host_id)["role"], "server");
    assert_eq!(
        host.recv_type("peer_joined").await["peer"]["id"],
        browser_id.as_str()
    );

    negotiate_webrtc(&mut browser, &mut host).await;

    let scope = Scope::Sessions;
    let h = uuid();
    let offer = sdp("offer", &h, &host_id, &browser_id);
    api_h
        .post_sdp(scope, &s.host, "offer", &offer)
        .await
        .assert_status(204);
    let got = api_j.get_offer(scope, &token, &browser_id).await;
    assert_eq!(got.body, offer);
    let answer = sdp("answer", &h, &browser_id, &host_id);
    api_j
        .post_sdp(scope, &token, "answer", &answer)
        .await
        .assert_status(204);
    assert_eq!(api_h.get_answer(scope, &s.host, &h).await.body, answer);
    browser
        .send_json(json!({"type": "signal", "to_peer": host_id, "signal": {"candidate": "c"}}))
        .await;
    host.recv_type("signal").await;
    // Without any ping from the browser the socket stays up (server pings are answered by the
    // WebSocket layer) and still relays.
    browser.expect_silence(Duration::from_millis(1500)).await;
    host.send_json(json!({"type": "signal", "to_peer": browser_id, "signal": {"late": 1}}))
        .await;
    assert_eq!(browser.recv_type("signal").await["signal"]["late"], 1);
}
