//! A host's relay upgrade: held until a joiner takes it (or it takes a waiting joiner), then
//! answered, checked (the CLI's acceptor socket speaks first) and piped.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use futures::StreamExt;
use tracing::Instrument;
use tungstenite::Message;

use super::locals::{Inbox, Locals};
use super::pipe::{self, Close};
use super::socket::{drained, enter, finish, refuse, socket_config, unavailable};
use super::{post, Arrival, Endpoint, Limits, Piece, Side, APPROVAL_PREFIX, WINDOW};
use crate::engine::{Engine, SessionRecord};
use crate::http::App;
use crate::protocol::Role;
use crate::shutdown::Phase;
use crate::ws::{Admitted, Handshake};

/// A paired host socket must send its approval line within this: the CLI's acceptor sends it
/// the moment its upgrade completes (a round trip), a reconnect socket only a heartbeat, up to
/// 10 s later. Each socket that fails the check costs the waiting joiner this long.
const FIRST_FRAME: Duration = Duration::from_millis(1500);

/// A host upgrade: held until a joiner takes it (or it takes a waiting one), then answered.
pub(super) async fn hold<E: Engine>(
    app: App<E>,
    session: SessionRecord,
    ws: Handshake,
    admitted: Admitted,
    me: Endpoint,
    left: Duration,
) -> Response {
    let relay = app.config.relay.clone();
    let relays = app.engine.router().relays().clone();
    let mut inbox = relays.open(&me.socket);
    let arrival = app
        .engine
        .relay_arrive(&session.id, Side::Host, &me, Limits::of(&relay))
        .await;
    let fresh = match arrival {
        Err(e) => return unavailable(e),
        Ok(Arrival::Paired(joiner)) => {
            return answer(app, session, ws, admitted, me, inbox, joiner, left).await
        }
        Ok(Arrival::Queued) => true,
        Ok(Arrival::Late) => false,
        // Late sockets (the CLI's reconnects for departed joiners, one loop each) are capped
        // apart from the fresh one, which is never refused.
        Ok(Arrival::Crowded) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "crowded",
                "too many relay sockets waiting",
            )
        }
    };
    // Listed now: if the client goes mid-hold, hyper drops this future and the guard has the
    // janitor take the entry off.
    let mut listed = Listed {
        room: &session.id,
        me: &me,
        locals: &relays,
        armed: true,
    };
    crate::metrics::relay_event(if fresh { "host_held" } else { "host_late" });
    let shutdown = app.shutdown.clone();
    let closing = shutdown.reached(Phase::Closing);
    tokio::pin!(closing);
    let deadline = tokio::time::sleep(relay.hold);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            piece = inbox.rx.recv() => match piece {
                Some(Piece::Offer { from }) => {
                    // The joiner took this socket off its list.
                    listed.armed = false;
                    drop(listed);
                    return answer(app, session, ws, admitted, me, inbox, from, left).await;
                }
                Some(_) => {}
                None => break,
            },
            _ = &mut deadline => break,
            _ = &mut closing => break,
        }
    }
    // Nobody came: off its list. A fresh socket was the acceptor's, which opens another a
    // second after this answer: the mark moves so that one is fresh too.
    listed.armed = false;
    drop(listed);
    let forgot = app.engine.relay_forget(&session.id, &me).await;
    let marked = match fresh {
        true => app.engine.relay_mark(&session.id).await.map(drop),
        false => Ok(()),
    };
    if let Err(e) = forgot.and(marked) {
        tracing::warn!(error = %e, "relay hold not cleared");
    }
    // A joiner that took this socket meanwhile pairs again.
    inbox.rx.close();
    while let Ok(piece) = inbox.rx.try_recv() {
        if let Piece::Offer { from } = piece {
            let _ = post(&app.engine, &from, Piece::Declined).await;
        }
    }
    refuse(
        StatusCode::REQUEST_TIMEOUT,
        "host_timeout",
        "no joiner arrived; open the relay socket again",
    )
}

/// A held upgrade's entry in its session's waiting lists, while the upgrade is held.
struct Listed<'a> {
    room: &'a str,
    me: &'a Endpoint,
    locals: &'a Locals,
    armed: bool,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.locals.forget_later(self.room, self.me);
        }
    }
}

/// Answers a host upgrade for `joiner`: 101, the room, the approval check, the pipe.
#[allow(clippy::too_many_arguments)]
async fn answer<E: Engine>(
    app: App<E>,
    session: SessionRecord,
    ws: Handshake,
    admitted: Admitted,
    me: Endpoint,
    mut inbox: Inbox,
    joiner: Endpoint,
    left: Duration,
) -> Response {
    // The host's acceptor opens its next socket the moment this one is answered: mark first
    // (taken back if this turns out not to be the acceptor's socket).
    let mark = match app.engine.relay_mark(&session.id).await {
        Ok(mark) => Some(mark),
        Err(e) => {
            tracing::warn!(error = %e, "relay mark not set");
            None
        }
    };
    let span = tracing::Span::current();
    ws.accept(socket_config(), move |socket, _| {
        async move {
            let Some(mut queue) = enter(&app, &session, &me, Role::Server).await else {
                let _ = post(&app.engine, &joiner, Piece::Declined).await;
                finish(
                    &app,
                    &session,
                    &me,
                    socket,
                    Some((1013, "relay session full")),
                )
                .await;
                drop(admitted);
                return;
            };
            let (mut sink, mut stream) = socket.split();
            let first = drained(&mut queue, tokio::time::timeout(FIRST_FRAME, stream.next())).await;
            let approval = match first {
                Some(Ok(Some(Ok(Message::Text(t))))) if t.as_str().starts_with(APPROVAL_PREFIX) => {
                    Some(Piece::Text(t))
                }
                _ => None,
            };
            let close = match approval {
                None => {
                    crate::metrics::relay_event("declined");
                    tracing::info!(%joiner, "host socket did not speak first: not paired");
                    if let Some(mark) = mark {
                        let _ = app.engine.relay_unmark(&session.id, mark).await;
                    }
                    let _ = post(&app.engine, &joiner, Piece::Declined).await;
                    Close::send(1008, "not the host's acceptor socket")
                }
                Some(first) => {
                    let accepted = post(&app.engine, &joiner, Piece::Accepted { from: me.clone() })
                        .await
                        .unwrap_or(false)
                        && post(&app.engine, &joiner, first).await.unwrap_or(false);
                    if accepted {
                        crate::metrics::relay_event("paired");
                        tracing::info!(%joiner, "relay pair formed");
                        let mut pipe = pipe::Pipe::new(&app, &session, &joiner, left, WINDOW - 1);
                        pipe.run(&mut sink, &mut stream, &mut queue, &mut inbox)
                            .await
                    } else {
                        crate::metrics::relay_event("joiner_gone");
                        Close::send(1000, "the joiner left")
                    }
                }
            };
            let socket = sink.reunite(stream).expect("halves of one socket");
            finish(&app, &session, &me, socket, close.frame).await;
            drop(admitted);
        }
        .instrument(span)
    })
}
