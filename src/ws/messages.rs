//! What a joined (or joining) socket's frames do: `join` (admission, role, PeerInfo bounds,
//! token binding), relays to another member, `debug`, `ping`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    Connection, Socket, HOST_SLOTS, MAX_METADATA_KEYS, MAX_METADATA_LEN, MAX_PEER_INFO_BYTES,
    MAX_TRANSPORTS,
};
use crate::access::{self, admit, checked, Refusal};
use crate::client::limit_key;
use crate::engine::{
    Delivery, Engine, EngineError, EngineResult, Entry, Grant, JoinResult, NewPeer,
};
use crate::metrics;
use crate::protocol::{
    common_transports, valid_id, ClientMessage, Frame, Relayed, Role, ServerMessage,
};

impl<E: Engine> Connection<E> {
    /// Handles one client frame. Returns false when the socket can no longer be written.
    pub(super) async fn handle(&mut self, sink: &mut Socket, text: &str) -> bool {
        let msg = match ClientMessage::parse(text) {
            Ok(msg) => msg,
            Err(e) => return self.error(sink, format!("invalid message: {e}")).await,
        };
        match msg {
            ClientMessage::Ping => self.reply(sink, &ServerMessage::Pong).await,
            ClientMessage::Join {
                passphrase,
                supported_transports,
                preferred_transport,
                label,
                mcp,
                metadata,
                ..
            } => {
                let peer = NewPeer {
                    id: self.peer_id.clone(),
                    role: Role::Client,
                    supported_transports: supported_transports
                        .into_iter()
                        .take(MAX_TRANSPORTS)
                        .collect(),
                    preferred_transport,
                    metadata: Some(self.metadata(metadata, label, mcp)),
                };
                // Boxed: a join's engine calls are the largest state a socket task ever holds,
                // and only while joining; inline, every idle socket would carry their size.
                Box::pin(self.join(sink, passphrase.as_deref(), peer)).await
            }
            ClientMessage::Relay {
                kind,
                to_peer,
                payload,
            } => {
                let frame = kind.frame(&self.peer_id, payload);
                self.relay(sink, kind, &to_peer, frame).await
            }
            ClientMessage::Debug { request } => Box::pin(self.debug(sink, request)).await,
        }
    }

    /// PeerInfo metadata: the client's keys (bounded), then the server's, which win.
    fn metadata(
        &self,
        client: Option<BTreeMap<String, String>>,
        label: Option<String>,
        mcp: Option<bool>,
    ) -> BTreeMap<String, String> {
        let mut meta: BTreeMap<String, String> = client
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, v)| k.len() <= 64 && v.len() <= MAX_METADATA_LEN)
            .take(MAX_METADATA_KEYS)
            .collect();
        if let Some(label) = label.filter(|l| !l.is_empty() && l.len() <= MAX_METADATA_LEN) {
            meta.insert("label".into(), label);
        }
        if mcp == Some(true) {
            meta.insert("mcp".into(), "true".into());
        }
        // An address we vouch for (the TCP peer, or a trusted proxy's), never a client's claim.
        meta.insert("remote_addr".into(), self.client.to_string());
        meta
    }

    async fn join(&mut self, sink: &mut Socket, passphrase: Option<&str>, peer: NewPeer) -> bool {
        let size = serde_json::to_string(&(
            &peer.supported_transports,
            &peer.preferred_transport,
            &peer.metadata,
        ))
        .map_or(usize::MAX, |s| s.len());
        if size > MAX_PEER_INFO_BYTES {
            let reason = format!("join carries too much: at most {MAX_PEER_INFO_BYTES} bytes of transports and metadata");
            return self.reply(sink, &ServerMessage::JoinError { reason }).await;
        }
        let transport = peer.preferred_transport.clone();
        let (room, grant, result) = match self.room.clone() {
            // A repeated join changes nothing (never demotes): the same answer again.
            Some(room) => {
                let max_peers = self.app.config.max_room_peers;
                let engine = &self.app.engine;
                let result = engine.join(&room, peer, max_peers, Entry::Admitted).await;
                (room, None, result)
            }
            None => match self.enter(passphrase, peer).await {
                Ok((room, grant, result)) => (room, Some(grant), result),
                Err(refusal) => {
                    let cause = match &refusal {
                        Refusal::Unavailable(e) => e.cause(),
                        _ => "",
                    };
                    tracing::info!(
                        peer = %self.peer_id, client = %self.client,
                        reason = refusal.reason(), cause, "join refused"
                    );
                    let reason = refusal.message();
                    return self.reply(sink, &ServerMessage::JoinError { reason }).await;
                }
            },
        };
        let joined = match result {
            Ok(JoinResult::Joined(joined)) => joined,
            Ok(JoinResult::Full) => {
                tracing::info!(session = %room, peer = %self.peer_id, "join refused: room full");
                metrics::refused("room_full");
                let reason = "Session is full".to_owned();
                return self.reply(sink, &ServerMessage::JoinError { reason }).await;
            }
            Ok(JoinResult::RelayOnly) => {
                metrics::refused("relay_only");
                let reason = crate::sessions::RELAY_ONLY.to_owned();
                return self.reply(sink, &ServerMessage::JoinError { reason }).await;
            }
            // `Refused` and `Token` never come here: `enter` answers them.
            Ok(JoinResult::Closed | JoinResult::Refused(_) | JoinResult::Token(_)) => {
                tracing::info!(session = %room, peer = %self.peer_id, "join refused: session closed");
                let reason = Refusal::NotFound.message();
                return self.reply(sink, &ServerMessage::JoinError { reason }).await;
            }
            Err(e) => return self.engine_refused(sink, "join", e).await,
        };
        self.room = Some(room.clone());
        tracing::Span::current().record("session", room.as_str());
        // Bound before join_success, so the mailbox acts for this peer as soon as it knows it.
        if joined.fresh && matches!(grant, Some(Grant::Host | Grant::Joiner)) {
            if let Err(e) = self
                .app
                .engine
                .bind_token(&self.path_id, &self.peer_id)
                .await
            {
                return self.engine_refused(sink, "token bind", e).await;
            }
        }
        if joined.fresh {
            metrics::joined(joined.me.role.as_str());
            // The client names its transport: logged only when it is a short plain name.
            let transport = transport
                .as_ref()
                .and_then(|t| t.as_str())
                .filter(|t| {
                    t.len() <= 32 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
                .unwrap_or("");
            tracing::info!(
                session = %room, peer = %self.peer_id, role = joined.me.role.as_str(),
                instance = %self.app.engine.router().id(), transport,
                client = %self.client, "peer joined"
            );
        }
        let msg = ServerMessage::JoinSuccess {
            session_id: room,
            peer_id: self.peer_id.clone(),
            available_transports: common_transports(&joined.peers),
            peers: joined.peers,
        };
        self.reply(sink, &msg).await
    }

    /// A socket's first join: admission, role and the join. With a code the engine checks it
    /// in the join itself and, should the id be a token's, looks that up in the same step (one
    /// Redis round trip either way); without one the id must be a token's.
    async fn enter(
        &self,
        passphrase: Option<&str>,
        mut peer: NewPeer,
    ) -> Result<(String, Grant, EngineResult<JoinResult>), Refusal> {
        let (engine, secret) = (&self.app.engine, &self.app.secret);
        let (id, client) = (self.path_id.as_str(), self.client);
        let max_peers = self.app.config.max_room_peers;
        let access = match passphrase.map(str::trim).filter(|p| !p.is_empty()) {
            Some(code) => {
                let (digest, limit) = (secret.digest(id, code), limit_key(client).to_string());
                let entry = Entry::Code {
                    client: &limit,
                    digest: &digest,
                };
                match engine.join(id, peer.clone(), max_peers, entry).await {
                    Ok(JoinResult::Token(access)) => access::token(access)?,
                    Ok(JoinResult::Refused(check)) => {
                        checked(check, id, client)?;
                        return Err(Refusal::NotFound);
                    }
                    result => return Ok((id.to_owned(), Grant::Public, result)),
                }
            }
            None => admit(engine, secret, id, None, client).await?,
        };
        let room = access.session.id;
        if access.session.relay {
            return Ok((room, access.grant, Ok(JoinResult::RelayOnly)));
        }
        // The `server` role is the host's: only its token grants it, with slots of its own so
        // that code holders cannot fill the room against it.
        let max_peers = if access.grant == Grant::Host {
            peer.role = Role::Server;
            max_peers + HOST_SLOTS
        } else {
            max_peers
        };
        // A token is a capability, and every member reads PeerInfo: generation 2 copies its
        // "peer session id" (our token) into its metadata, so a value equal to it is dropped.
        if matches!(access.grant, Grant::Host | Grant::Joiner) {
            if let Some(meta) = peer.metadata.as_mut() {
                meta.retain(|_, v| v != id);
            }
        }
        let result = engine.join(&room, peer, max_peers, Entry::Admitted).await;
        Ok((room, access.grant, result))
    }

    /// A join the engine could not complete: the cause to the log, the fixed message to the client.
    async fn engine_refused(&self, sink: &mut Socket, what: &str, e: EngineError) -> bool {
        tracing::warn!(
            peer = %self.peer_id, kind = e.kind(), cause = e.cause(), "{what} failed: engine error"
        );
        let reason = e.client_message().to_owned();
        self.reply(sink, &ServerMessage::JoinError { reason }).await
    }

    /// Forwards a message to another member of this socket's room.
    async fn relay(&mut self, sink: &mut Socket, kind: Relayed, to: &str, frame: Frame) -> bool {
        // Borrowed, not cloned: an allocation and a copy per relay otherwise.
        let Some(room) = self.room.as_deref() else {
            return self.error(sink, "join the session first".into()).await;
        };
        if !valid_id(to) {
            return self.error(sink, "invalid to_peer".into()).await;
        }
        let outcome = self.app.engine.send(room, &self.peer_id, to, frame).await;
        match outcome {
            Ok(Delivery::Sent) => metrics::relayed(kind, metrics::Path::Local),
            Ok(Delivery::Published) => metrics::relayed(kind, metrics::Path::Redis),
            _ => {}
        }
        self.report(sink, to, outcome).await
    }

    /// Tells the sender what became of its relay to `to`, unless it was delivered (or is on
    /// its way to another instance: a failure there is told later, through its queue).
    async fn report(
        &mut self,
        sink: &mut Socket,
        to: &str,
        outcome: EngineResult<Delivery>,
    ) -> bool {
        let (reason, message) = match outcome {
            Ok(delivery) => match delivery.refusal(to) {
                Some(refusal) => refusal,
                None => return true,
            },
            Err(e) => {
                tracing::info!(peer = %self.peer_id, kind = e.kind(), cause = e.cause(), "relay failed");
                ("publish_failed", e.client_message().into())
            }
        };
        metrics::relay_error(reason);
        // Every undelivered relay is told, outside the bad-frame budget: a sender must learn
        // of each loss. It costs the server nothing it would not spend anyway: the sender's
        // pace bounds the rate, and a sender that stops reading blocks on its own replies.
        self.reply(sink, &ServerMessage::error(message)).await
    }

    /// `debug` goes to the room's server peer, wrapped as a custom-transport signal.
    async fn debug(&mut self, sink: &mut Socket, request: Value) -> bool {
        let Some(room) = self.room.clone() else {
            return self.error(sink, "join the session first".into()).await;
        };
        if !request.get("type").is_some_and(Value::is_string) {
            return self.error(sink, "debug request needs a type".into()).await;
        }
        let server = match self.app.engine.server_peer(&room).await {
            Ok(Some(server)) => server,
            Ok(None) => {
                return self
                    .error(sink, "no server peer in this session".into())
                    .await
            }
            Err(e) => {
                tracing::info!(peer = %self.peer_id, kind = e.kind(), cause = e.cause(), "debug failed");
                return self.error(sink, e.client_message().into()).await;
            }
        };
        let signal = json!({
            "transport": "custom",
            "transport_name": "debug",
            "signal_type": "debug_request",
            "payload": { "from_peer": self.peer_id, "request": request },
        });
        let raw = serde_json::value::to_raw_value(&signal).expect("a JSON value serializes");
        let frame = Relayed::Signal.frame(&self.peer_id, &raw);
        self.relay(sink, Relayed::Signal, &server, frame).await
    }
}
