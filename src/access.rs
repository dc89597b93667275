//! Who may enter a session: the check shared by HTTP join, attach and WebSocket join.
//!
//! A token (the host's, or one a joiner got from a successful join) admits by itself: it was
//! handed out only to someone who registered the session or gave its code, and it is a 122-bit
//! random id. The public session id admits only with the code, checked by the engine in one
//! atomic step that also counts wrong codes per session and per client address (see
//! `lua/code_check.lua`): a guesser from one address is stopped after a few tries without
//! locking out anyone else, and all guessers together get a bounded number of tries per window.
//! Token holders are never locked out, so no guesser can keep the host or admitted joiners away.

use std::net::IpAddr;
use std::time::Duration;

use crate::client::limit_key;
use crate::code::Secret;
use crate::engine::{Access, CodeCheck, Engine, EngineError, Grant};

/// Why a join was refused. Messages are the wire strings clients know; generation 1 treats a
/// message containing "invalid" or "code" as an authentication error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    PassphraseRequired,
    InvalidPassphrase,
    /// Too many wrong codes; try again after this long (HTTP 429 `Retry-After`).
    TooManyAttempts(Duration),
    Unavailable(EngineError),
}

impl Refusal {
    pub fn message(&self) -> String {
        match self {
            Refusal::NotFound => "Session not found".into(),
            Refusal::PassphraseRequired => "Passphrase required".into(),
            Refusal::InvalidPassphrase => "Invalid passphrase".into(),
            Refusal::TooManyAttempts(_) => "Too many invalid codes; try again later".into(),
            Refusal::Unavailable(e) => e.client_message().into(),
        }
    }

    /// A short machine-readable reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::PassphraseRequired => "passphrase_required",
            Refusal::InvalidPassphrase => "invalid_code",
            Refusal::TooManyAttempts(_) => "code_locked",
            Refusal::Unavailable(_) => "unavailable",
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        Refusal::Unavailable(e)
    }
}

/// Resolves `id` (session id or token) and, for the public session id, checks `passphrase`.
pub async fn admit<E: Engine>(
    engine: &E,
    secret: &Secret,
    id: &str,
    passphrase: Option<&str>,
    client: IpAddr,
) -> Result<Access, Refusal> {
    let passphrase = passphrase.map(str::trim).filter(|p| !p.is_empty());
    // With a code the id is most likely the public session id: its check answers with the
    // session too, in one step (one Redis round trip). A token's id finds no session there.
    if let Some(passphrase) = passphrase {
        if let Some(access) = check(engine, secret, id, passphrase, client).await? {
            return Ok(access);
        }
    }
    let access = engine.resolve(id).await?.ok_or(Refusal::NotFound)?;
    if access.grant != Grant::Public {
        return token(access);
    }
    let Some(passphrase) = passphrase else {
        return Err(Refusal::PassphraseRequired);
    };
    // Registered since the check found nothing: checked now.
    check(engine, secret, id, passphrase, client)
        .await?
        .ok_or(Refusal::NotFound)
}

/// Checks `passphrase` against session `id`'s code; `None` when there is no such session.
async fn check<E: Engine>(
    engine: &E,
    secret: &Secret,
    id: &str,
    passphrase: &str,
    client: IpAddr,
) -> Result<Option<Access>, Refusal> {
    let digest = secret.digest(id, passphrase);
    let check = engine
        .check_code(id, &limit_key(client).to_string(), &digest)
        .await?;
    checked(check, id, client)
}

/// What a token's id admits: its access, but for a relay joiner's token, which opens its one
/// relay socket (`crate::relay::socket`) and nothing here.
pub fn token(access: Access) -> Result<Access, Refusal> {
    match access.grant {
        Grant::Relay => Err(Refusal::NotFound),
        _ => Ok(access),
    }
}

/// What a code check of session `id` means: the session, a refusal (told to the log and the
/// metrics), or `None` when there is no such session.
pub fn checked(check: CodeCheck, id: &str, client: IpAddr) -> Result<Option<Access>, Refusal> {
    match check {
        CodeCheck::Correct(session) => Ok(Some(Access {
            session,
            grant: Grant::Public,
            peer: None,
        })),
        CodeCheck::Wrong => {
            tracing::info!(session = %id, %client, "wrong join code");
            crate::metrics::code_failure();
            Err(Refusal::InvalidPassphrase)
        }
        CodeCheck::Locked(wait) => {
            tracing::info!(session = %id, %client, "join code refused: too many wrong codes");
            crate::metrics::refused("code_locked");
            Err(Refusal::TooManyAttempts(wait))
        }
        CodeCheck::NotFound => Ok(None),
    }
}
