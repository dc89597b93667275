//! Sessions, capability tokens, join-code checks, rate counters and the mailbox in Redis: each
//! a single command or one script of `lua/` in one slot (tokens have slots of their own).

use std::time::Duration;

use super::Inner;
use crate::engine::{Access, CodeCheck, EngineResult, Grant, SessionRecord};

/// The session fields a [`SessionRecord`] is read from (`HMGET`, in this order).
pub(super) const SESSION_FIELDS: [&str; 3] = ["created_at", "hash", "relay"];
/// A token's fields (`HMGET`, in this order): its session, grant and peer.
pub(super) const TOKEN_FIELDS: [&str; 3] = ["s", "g", "p"];

/// A token's session id, grant and peer from its [`TOKEN_FIELDS`]; `None` when it is no token.
pub(super) fn token_fields(v: &[Option<String>]) -> Option<(&str, Grant, Option<String>)> {
    let [Some(session), Some(grant), peer] = v else {
        return None;
    };
    Some((session, Grant::parse(grant)?, peer.clone()))
}

/// `lua/code_check.lua`'s reply (the head of `lua/code_join.lua`'s) for `session`.
pub(super) fn code_check_reply(session: &str, digest: &str, v: &[String]) -> CodeCheck {
    match v.first().map(String::as_str) {
        // The script compared the stored hash with `digest`: equal, so it is the code.
        Some("correct") => {
            let fields = [
                v.get(1).cloned(),
                Some(digest.to_owned()),
                v.get(2).cloned(),
            ];
            session_record(session, &fields).map_or(CodeCheck::NotFound, CodeCheck::Correct)
        }
        Some("wrong") => CodeCheck::Wrong,
        Some("locked") => {
            let ms = v.get(1).and_then(|m| m.parse().ok()).unwrap_or(1000);
            CodeCheck::Locked(Duration::from_millis(ms))
        }
        _ => CodeCheck::NotFound,
    }
}

pub(super) fn session_record(id: &str, fields: &[Option<String>]) -> Option<SessionRecord> {
    match fields {
        [Some(created), Some(hash), relay] => Some(SessionRecord {
            id: id.to_owned(),
            created_at: created.parse().unwrap_or(0),
            code: hash.clone(),
            relay: relay.as_deref() == Some("1"),
        }),
        _ => None,
    }
}

impl Inner {
    pub(super) async fn load_session(&self, id: &str) -> EngineResult<Option<SessionRecord>> {
        let cmd = redis::cmd("HMGET")
            .arg(self.keys.session(id))
            .arg(&SESSION_FIELDS[..])
            .clone();
        let v: Vec<Option<String>> = self.query(&cmd).await?;
        Ok(session_record(id, &v))
    }

    pub(super) async fn register(
        &self,
        session: SessionRecord,
        host_token: &str,
    ) -> EngineResult<bool> {
        let i = self;
        let ttl = Inner::ttl_ms(i.config.session_ttl);
        // Tokens live in their own slots, so "the id is not a token" cannot be part of the
        // script; tokens are random server-chosen ids, so only a deliberate collision gets here.
        let taken = redis::cmd("EXISTS").arg(i.keys.token(&session.id)).clone();
        if i.query::<bool>(&taken).await? {
            return Ok(false);
        }
        // The host token first: a session never exists without it.
        if !i
            .put_token(host_token, &session.id, Grant::Host, ttl)
            .await?
        {
            return Ok(false);
        }
        let mut cm = i.cm();
        let mut inv = i.scripts.register.prepare_invoke();
        inv.key(i.keys.session(&session.id))
            .key(i.keys.tokens(&session.id))
            .arg(&session.code)
            .arg(ttl)
            .arg(host_token)
            .arg(u8::from(session.relay));
        let created: u64 = i.redis("register", inv.invoke_async(&mut cm)).await?;
        if created == 0 {
            let undo = redis::cmd("DEL").arg(i.keys.token(host_token)).clone();
            i.query::<i64>(&undo).await?;
        }
        Ok(created != 0)
    }

    pub(super) async fn resolve(&self, id: &str) -> EngineResult<Option<Access>> {
        let i = self;
        // The id as a session and as a token, in one round trip (two slots on a cluster: the
        // parts go together).
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(i.keys.session(id))
            .arg(&SESSION_FIELDS[..]);
        pipe.cmd("HMGET")
            .arg(i.keys.token(id))
            .arg(&TOKEN_FIELDS[..]);
        let mut cm = i.cm();
        let (session, v): (Vec<Option<String>>, Vec<Option<String>>) =
            i.redis("HMGET", pipe.query_async(&mut cm)).await?;
        if let Some(session) = session_record(id, &session) {
            return Ok(Some(Access {
                session,
                grant: Grant::Public,
                peer: None,
            }));
        }
        let Some((host, grant, peer)) = token_fields(&v) else {
            return Ok(None);
        };
        Ok(i.load_session(host).await?.map(|session| Access {
            session,
            grant,
            peer,
        }))
    }

    pub(super) async fn mint_token(
        &self,
        session: &str,
        grant: Grant,
    ) -> EngineResult<Option<String>> {
        let i = self;
        let mut cm = i.cm();
        let token = crate::protocol::new_id();
        let relay = grant == Grant::Relay;
        let mut inv = i.scripts.token_quota.prepare_invoke();
        inv.key(i.keys.session(session))
            .key(i.keys.tokens(session))
            .arg(i.config.max_tokens_per_session)
            .arg(Inner::ttl_ms(i.config.session_ttl))
            .arg(&token)
            .arg(u8::from(!relay));
        let ttl: i64 = i.redis("token_quota", inv.invoke_async(&mut cm)).await?;
        if ttl <= 0 {
            return Ok(None);
        }
        // A relay token is short-lived and never refreshed with its session.
        let ttl = if relay {
            (ttl as u64).min(Inner::ttl_ms(i.config.relay_token_ttl))
        } else {
            ttl as u64
        };
        Ok(i.put_token(&token, session, grant, ttl)
            .await?
            .then_some(token))
    }

    pub(super) async fn take_relay_token(
        &self,
        token: &str,
    ) -> EngineResult<Option<SessionRecord>> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.token_take.prepare_invoke();
        inv.key(i.keys.token(token));
        let session: Option<String> = i.redis("token_take", inv.invoke_async(&mut cm)).await?;
        match session {
            Some(s) => i.load_session(&s).await,
            None => Ok(None),
        }
    }

    pub(super) async fn bind_token(&self, token: &str, peer: &str) -> EngineResult<()> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.token_bind.prepare_invoke();
        inv.key(i.keys.token(token))
            .arg(peer)
            .arg(Inner::ttl_ms(i.config.session_ttl));
        let _: i64 = i.redis("token_bind", inv.invoke_async(&mut cm)).await?;
        Ok(())
    }

    pub(super) async fn check_code(
        &self,
        session: &str,
        client: &str,
        digest: &str,
    ) -> EngineResult<CodeCheck> {
        let mut cm = self.cm();
        let mut inv = self.scripts.code_check.prepare_invoke();
        self.code_check_args(&mut inv, session, client, digest);
        let v: Vec<String> = self.redis("code_check", inv.invoke_async(&mut cm)).await?;
        Ok(code_check_reply(session, digest, &v))
    }

    /// `lua/code_check.lua`'s KEYS and ARGV, also the first ones of `lua/code_join.lua`.
    pub(super) fn code_check_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        session: &str,
        client: &str,
        digest: &str,
    ) {
        let (k, c) = (&self.keys, &self.config);
        inv.key(k.session(session))
            .key(k.code_failures(session))
            .key(k.client_code_failures(session, client))
            .arg(digest)
            .arg(Inner::ttl_ms(c.code_failure_window))
            .arg(c.max_code_failures)
            .arg(c.max_session_code_failures)
            .arg(crate::protocol::new_id());
    }

    pub(super) async fn rate(
        &self,
        key: &str,
        max: u32,
        window: Duration,
    ) -> EngineResult<Option<Duration>> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.rate.prepare_invoke();
        inv.key(i.keys.rate(key))
            .arg(max)
            .arg(Inner::ttl_ms(window));
        let wait: u64 = i.redis("rate", inv.invoke_async(&mut cm)).await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }

    pub(super) async fn push_offer(
        &self,
        room: &str,
        to: &str,
        payload: String,
    ) -> EngineResult<()> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.offer_push.prepare_invoke();
        inv.key(i.keys.offers(room, to))
            .arg(payload)
            .arg(i.config.max_queued_offers.max(1))
            .arg(Inner::ttl_ms(i.config.mailbox_ttl));
        let _: i64 = i.redis("offer_push", inv.invoke_async(&mut cm)).await?;
        Ok(())
    }

    pub(super) async fn pop_offer(&self, room: &str, to: &str) -> EngineResult<Option<String>> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.offer_pop.prepare_invoke();
        inv.key(i.keys.offers(room, to))
            .arg(Inner::ttl_ms(i.config.mailbox_ttl));
        let v: Vec<String> = i.redis("offer_pop", inv.invoke_async(&mut cm)).await?;
        Ok(v.into_iter().next())
    }

    pub(super) async fn put_answer(
        &self,
        room: &str,
        from: &str,
        to: &str,
        handshake: &str,
        payload: String,
    ) -> EngineResult<bool> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.answer_put.prepare_invoke();
        inv.key(i.keys.answer(room, to, handshake))
            .key(i.keys.answers_from(room, to, from))
            .arg(payload)
            .arg(handshake)
            .arg(Inner::ttl_ms(i.config.mailbox_ttl))
            .arg(i.config.max_queued_answers)
            .arg(from);
        let stored: i64 = i.redis("answer_put", inv.invoke_async(&mut cm)).await?;
        Ok(stored == 1)
    }

    pub(super) async fn take_answer(
        &self,
        room: &str,
        to: &str,
        handshake: &str,
    ) -> EngineResult<Option<String>> {
        let i = self;
        let mut cm = i.cm();
        let mut inv = i.scripts.answer_take.prepare_invoke();
        inv.key(i.keys.answer(room, to, handshake));
        let v: Vec<String> = i.redis("answer_take", inv.invoke_async(&mut cm)).await?;
        let Some((from, answer)) = v.into_iter().next().and_then(|stored| {
            let (from, answer) = stored.split_once('|')?;
            Some((from.to_owned(), answer.to_owned()))
        }) else {
            return Ok(None);
        };
        // A taken answer no longer counts against its sender's quota (which bounds what is
        // *waiting*); a lost ZREM only holds the quota until the mailbox ttl.
        let cmd = redis::cmd("ZREM")
            .arg(i.keys.answers_from(room, to, &from))
            .arg(handshake)
            .clone();
        let _ = i.query::<i64>(&cmd).await;
        Ok(Some(answer))
    }

    /// Gives every token of `session` the session's ttl again (the session was just refreshed):
    /// tokens live in their own slots, so this is one pipeline after the session's script.
    pub(super) async fn refresh_tokens(&self, session: &str) -> EngineResult<()> {
        let members = redis::cmd("SMEMBERS")
            .arg(self.keys.tokens(session))
            .clone();
        let tokens: Vec<String> = self.query(&members).await?;
        if tokens.is_empty() {
            return Ok(());
        }
        let ttl = Inner::ttl_ms(self.config.session_ttl);
        let mut pipe = redis::pipe();
        for t in &tokens {
            pipe.cmd("PEXPIRE")
                .arg(self.keys.token(t))
                .arg(ttl)
                .ignore();
        }
        let mut cm = self.cm();
        self.redis("expire_tokens", pipe.query_async::<()>(&mut cm))
            .await
    }

    /// Writes a token (never overwriting one); false when it existed.
    pub(super) async fn put_token(
        &self,
        token: &str,
        session: &str,
        grant: Grant,
        ttl: u64,
    ) -> EngineResult<bool> {
        let mut cm = self.cm();
        let mut inv = self.scripts.token_put.prepare_invoke();
        inv.key(self.keys.token(token))
            .arg(session)
            .arg(grant.as_str())
            .arg(ttl);
        let put: i64 = self.redis("token_put", inv.invoke_async(&mut cm)).await?;
        Ok(put == 1)
    }
}
