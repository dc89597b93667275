//! How a socket's connection ends: the close frame it gets (RFC 6455 §7.4.1 codes).

use crate::peers::CloseReason;

/// How a connection ends: the close frame to send, if any.
pub(super) struct End {
    pub(super) close: Option<(u16, &'static str)>,
    /// Drain: leave at once, close after a random delay within the jitter window.
    pub(super) jitter: bool,
    /// The client sent a close frame: flush the reply tungstenite queued (its code echoed, or
    /// 1002 for an invalid one, RFC 6455 §5.5.1).
    pub(super) echo: bool,
    /// Why the server ended it (the `beach_road_disconnects_total` reason); `None` when the
    /// client did (closed, vanished).
    pub(super) metric: Option<&'static str>,
}

impl End {
    pub(super) fn silent() -> Self {
        End {
            close: None,
            jitter: false,
            echo: false,
            metric: None,
        }
    }

    pub(super) fn close(code: u16, reason: &'static str, metric: &'static str) -> Self {
        End {
            close: Some((code, reason)),
            metric: Some(metric),
            ..End::silent()
        }
    }

    pub(super) fn echo() -> Self {
        End {
            echo: true,
            ..End::silent()
        }
    }

    /// A read error: RFC 6455 §7.4.1 close codes for what the client did wrong (1002 protocol
    /// error, 1007 invalid UTF-8, 1009 too big); a vanished peer just ends.
    pub(super) fn on_error(e: tungstenite::Error) -> Self {
        use tungstenite::Error as WsError;
        match e {
            WsError::Protocol(_) => End::close(1002, "protocol error", "protocol_error"),
            WsError::Utf8(_) => End::close(1007, "invalid UTF-8", "protocol_error"),
            WsError::Capacity(_) => End::close(1009, "message too big", "too_big"),
            _ => End::silent(),
        }
    }

    /// The server closed the socket's queue (slow consumer, fenced, replaced).
    pub(super) fn closed_by(reason: CloseReason) -> Self {
        let (code, why) = reason.close_frame();
        End::close(code, why, reason.metric())
    }
}
