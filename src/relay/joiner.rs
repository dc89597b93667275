//! A joiner's relay socket: answered at once, in the room, paired with a waiting (or the next)
//! fresh host socket, or closed 1013.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::locals::Inbox;
use super::pipe::{self, Close};
use super::socket::{drained, enter, finish};
use super::{post, Arrival, Endpoint, Limits, Piece, Side, WINDOW};
use crate::engine::{Engine, SessionRecord};
use crate::http::App;
use crate::protocol::Role;
use crate::ws::Socket;

/// A joiner waits this long for the host socket it took to accept it before it pairs again.
const OFFER_WAIT: Duration = Duration::from_secs(5);

/// A joiner socket: in the room, paired with a host socket (or closed 1013), then the pipe.
pub(super) async fn run<E: Engine>(
    app: &App<E>,
    session: &SessionRecord,
    socket: Socket,
    me: &Endpoint,
    left: Duration,
) {
    let relays = app.engine.router().relays().clone();
    let mut inbox = relays.open(&me.socket);
    let Some(mut queue) = enter(app, session, me, Role::Client).await else {
        return finish(app, session, me, socket, Some((1013, "relay session full"))).await;
    };
    let partner = match drained(&mut queue, pair(app, session, me, &mut inbox)).await {
        Some(partner) => partner,
        None => Err(Close::send(1001, "server closing")),
    };
    let close = match partner {
        Err(close) => close,
        Ok(host) => {
            let (mut sink, mut stream) = socket.split();
            let mut pipe = pipe::Pipe::new(app, session, &host, left, WINDOW);
            let close = pipe
                .run(&mut sink, &mut stream, &mut queue, &mut inbox)
                .await;
            let socket = sink.reunite(stream).expect("halves of one socket");
            return finish(app, session, me, socket, close.frame).await;
        }
    };
    finish(app, session, me, socket, close.frame).await
}

/// Finds the joiner's host socket: the partner, or how the joiner's socket is to be closed.
async fn pair<E: Engine>(
    app: &App<E>,
    session: &SessionRecord,
    me: &Endpoint,
    inbox: &mut Inbox,
) -> Result<Endpoint, Close> {
    let relay = &app.config.relay;
    let deadline = Instant::now() + relay.joiner_wait;
    while Instant::now() < deadline {
        let arrival = app
            .engine
            .relay_arrive(&session.id, Side::Joiner, me, Limits::of(relay))
            .await;
        let (expected, wait_until) = match arrival {
            Err(e) => {
                tracing::warn!(error = %e, "relay pairing failed");
                return Err(Close::send(1011, "session store unavailable"));
            }
            Ok(Arrival::Paired(host)) => {
                if !post(&app.engine, &host, Piece::Offer { from: me.clone() })
                    .await
                    .unwrap_or(false)
                {
                    continue; // gone with its instance: the next one
                }
                (Some(host), (Instant::now() + OFFER_WAIT).min(deadline))
            }
            Ok(Arrival::Queued) => (None, deadline),
            Ok(Arrival::Late | Arrival::Crowded) => {
                return Err(Close::send(1013, "too many relay sockets waiting"));
            }
        };
        let answer = accepted(app, inbox, expected.as_ref());
        if let Ok(Some(host)) = tokio::time::timeout_at(wait_until, answer).await {
            return Ok(host);
        }
        // Declined, or no answer in time: off the list (if still on it, so it is never listed
        // twice) before pairing again or giving up.
        if let Err(e) = app.engine.relay_forget(&session.id, me).await {
            tracing::warn!(error = %e, "relay wait not cleared");
        }
    }
    crate::metrics::relay_event("joiner_timeout");
    tracing::info!("no host socket for the joiner in time: closing it 1013");
    Err(Close::send(1013, "no host socket to relay to; try again"))
}

/// The answer of the host socket this joiner offered itself to (`expected`), or of any that
/// took it off the list: its endpoint, or `None` when declined. A late acceptance by a host
/// socket this joiner gave up on is ended, so that socket is not left paired with nobody.
async fn accepted<E: Engine>(
    app: &App<E>,
    inbox: &mut Inbox,
    expected: Option<&Endpoint>,
) -> Option<Endpoint> {
    loop {
        match inbox.rx.recv().await? {
            Piece::Accepted { from } if expected.is_none_or(|e| *e == from) => return Some(from),
            Piece::Accepted { from } => {
                let _ = post(&app.engine, &from, Piece::End).await;
            }
            Piece::Declined => return None,
            _ => {}
        }
    }
}
