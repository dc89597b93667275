//! Who may enter a session: the join-code check shared by HTTP join, attach and WebSocket join.
//!
//! Every wrong code is counted per session in the engine (so across all instances); past
//! `max_code_failures` within the window even the right code is refused until the window ends,
//! which caps guessing a 6-digit code at a handful of tries per ten minutes.

use crate::engine::{Engine, EngineError, SessionRecord};

/// Why a join was refused. Messages are the wire strings clients know; generation 1 treats a
/// message containing "invalid" or "code" as an authentication error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    PassphraseRequired,
    InvalidPassphrase,
    TooManyAttempts,
    Unavailable(EngineError),
}

impl Refusal {
    pub fn message(&self) -> String {
        match self {
            Refusal::NotFound => "Session not found".into(),
            Refusal::PassphraseRequired => "Passphrase required".into(),
            Refusal::InvalidPassphrase => "Invalid passphrase".into(),
            Refusal::TooManyAttempts => "Too many invalid codes; try again later".into(),
            Refusal::Unavailable(e) => e.to_string(),
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        Refusal::Unavailable(e)
    }
}

/// Resolves `id` (session or peer-session id) and checks `passphrase` against its code.
pub async fn admit<E: Engine>(
    engine: &E,
    id: &str,
    passphrase: Option<&str>,
) -> Result<SessionRecord, Refusal> {
    let session = engine.resolve(id).await?.ok_or(Refusal::NotFound)?;
    if engine.code_failures(&session.id).await? >= engine.config().max_code_failures {
        return Err(Refusal::TooManyAttempts);
    }
    let passphrase = passphrase.map(str::trim).filter(|p| !p.is_empty());
    let Some(passphrase) = passphrase else {
        return Err(Refusal::PassphraseRequired);
    };
    if session.code.matches(passphrase) {
        Ok(session)
    } else {
        engine.code_failure(&session.id).await?;
        Err(Refusal::InvalidPassphrase)
    }
}
