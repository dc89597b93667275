//! The probe's HTTP and WebSocket plumbing: requests with their answers quoted in failures, a
//! peer's socket and its frames, one relay checked end to end.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::protocol::new_id;

use super::{Urls, Ws, LABEL, POLL, QUOTE, STEP_TIMEOUT};

pub(super) fn http_client(tls: &rustls::ClientConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .timeout(STEP_TIMEOUT)
        .connect_timeout(STEP_TIMEOUT)
        // The sockets take no proxy either: both go where the URL says.
        .no_proxy()
        // A redirect (say to https) is a wrong --url, not a pass.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("beach-road-check/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| chain(&e))
}

/// An error and its causes: `error sending request: ...: Connection refused (os error 111)`.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out = format!("{out}: {s_text}");
        }
        source = s.source();
    }
    out
}

pub(super) fn quote(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(QUOTE) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Sends a request: its status, body as JSON (`Null` if it is not) and body text.
pub(super) async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Value, String), String> {
    let resp = req.send().await.map_err(|e| chain(&e))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| chain(&e))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((status, body, text))
}

pub(super) fn http_error(status: u16, text: &str) -> String {
    format!("HTTP {status} {}", quote(text))
}

/// A register or join answer: 200 with `success: true`, and the peer's URLs.
pub(super) async fn answer_of(req: reqwest::RequestBuilder) -> Result<(Value, Urls), String> {
    let (status, body, text) = send(req).await?;
    if status != 200 {
        return Err(http_error(status, &text));
    }
    if body["success"] != true {
        return Err(format!("refused: {}", quote(&text)));
    }
    let signaling = body["transports"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["kind"] == "web_rtc"))
        .and_then(|t| t["metadata"]["signaling_url"].as_str());
    match (signaling, body["websocket_url"].as_str()) {
        (Some(signaling), Some(ws)) => {
            let urls = Urls {
                signaling: signaling.to_owned(),
                ws: ws.to_owned(),
            };
            Ok((body, urls))
        }
        _ => Err(format!(
            "no signaling_url or websocket_url in {}",
            quote(&text)
        )),
    }
}

/// `POST /sessions`: the join code and the host's URLs.
pub(super) async fn register(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> Result<(String, Urls), String> {
    let req = http
        .post(format!("{base}/sessions"))
        .json(&json!({"session_id": id, "passphrase": null}));
    let (body, urls) = answer_of(req).await?;
    match body["join_code"].as_str() {
        Some(code) => Ok((code.to_owned(), urls)),
        None => Err(format!("no join_code in {}", quote(&body.to_string()))),
    }
}

/// `POST /sessions/{id}/join` with the code: the joiner's URLs.
pub(super) async fn join(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    code: &str,
) -> Result<Urls, String> {
    let req = http
        .post(format!("{base}/sessions/{id}/join"))
        .json(&json!({"passphrase": code, "label": LABEL}));
    Ok(answer_of(req).await?.1)
}

/// Posts an offer or an answer: 204.
pub(super) async fn post(http: &reqwest::Client, url: &str, payload: &Value) -> Result<(), String> {
    match send(http.post(url).json(payload)).await? {
        (204, _, _) => Ok(()),
        (status, _, text) => Err(http_error(status, &text)),
    }
}

/// Polls the mailbox every [`POLL`] until it hands out `want` (404 or 409: nothing yet).
pub(super) async fn poll(http: &reqwest::Client, url: &str, want: &Value) -> Result<(), String> {
    loop {
        match send(http.get(url)).await? {
            (200, body, _) if body == *want => return Ok(()),
            (200, _, text) => return Err(format!("not what was posted: {}", quote(&text))),
            (404 | 409, _, _) => tokio::time::sleep(POLL).await,
            (status, _, text) => return Err(http_error(status, &text)),
        }
    }
}

/// Opens a socket, joins as generation 1 does and pings; checks the role. Returns the
/// socket and its peer id.
pub(super) async fn open(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    session: &str,
    code: &str,
    role: &str,
) -> Result<(Ws, String), String> {
    let tls = Some(tokio_tungstenite::Connector::Rustls(tls.clone()));
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, true, tls)
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) => {
                let body = resp.body().as_deref().unwrap_or_default();
                let body = String::from_utf8_lossy(body);
                http_error(resp.status().as_u16(), &body)
            }
            e => format!("{url}: {}", chain(&e)),
        })?;
    let msg = json!({"type": "join", "peer_id": new_id(), "passphrase": code,
        "supported_transports": ["webrtc"], "preferred_transport": "webrtc",
        "label": LABEL, "mcp": false});
    send_json(&mut ws, msg).await?;
    let ok = recv(&mut ws, "join_success").await?;
    let me = ok["peer_id"].as_str().unwrap_or_default().to_owned();
    let mine = ok["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == me.as_str()));
    if ok["session_id"] != session || mine.map(|p| &p["role"]) != Some(&json!(role)) {
        return Err(format!("not joined as {role}: {}", quote(&ok.to_string())));
    }
    send_json(&mut ws, json!({"type": "ping"})).await?;
    recv(&mut ws, "pong").await?;
    Ok((ws, me))
}

pub(super) async fn send_json(ws: &mut Ws, v: Value) -> Result<(), String> {
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| format!("send: {}", chain(&e)))
}

/// The next message of type `want`, skipping others (`pong`, other peers' news); `error`,
/// `join_error` and a close end the wait with the server's words.
pub(super) async fn recv(ws: &mut Ws, want: &str) -> Result<Value, String> {
    loop {
        let text = match ws.next().await {
            None => return Err(format!("socket closed while waiting for {want}")),
            Some(Err(e)) => return Err(format!("waiting for {want}: {}", chain(&e))),
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(Message::Close(frame))) => {
                let why = frame
                    .map(|f| format!(" ({} {})", u16::from(f.code), f.reason))
                    .unwrap_or_default();
                return Err(format!(
                    "server closed the socket{why} while waiting for {want}"
                ));
            }
            Some(Ok(_)) => continue,
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| format!("not JSON while waiting for {want}: {}", quote(&text)))?;
        match v["type"].as_str() {
            Some(t) if t == want => return Ok(v),
            Some("error") => return Err(format!("server error: {}", v["message"])),
            Some("join_error") => return Err(format!("join_error: {}", v["reason"])),
            _ => {}
        }
    }
}

/// `from` signals `to`, which must get the payload verbatim with `from_peer`; an `error` or a
/// close on the sender's socket meanwhile fails the relay at once.
pub(super) async fn relay(
    from: &mut Ws,
    to: &mut Ws,
    from_id: &str,
    to_id: &str,
    signal: Value,
) -> Result<(), String> {
    send_json(
        from,
        json!({"type": "signal", "to_peer": to_id, "signal": signal}),
    )
    .await?;
    let got = tokio::select! {
        got = recv(to, "signal") => got?,
        // No message has an empty type: this returns only on an error or a close.
        sender = recv(from, "") => {
            let why = sender.err().unwrap_or_else(|| "unexpected message".into());
            return Err(format!("sender: {why}"));
        }
    };
    if got["from_peer"] != from_id {
        return Err(format!(
            "from_peer {} instead of {from_id}",
            got["from_peer"]
        ));
    }
    if got["signal"] != signal {
        return Err(format!("payload changed: {}", quote(&got.to_string())));
    }
    Ok(())
}
