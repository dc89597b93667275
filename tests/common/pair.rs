//! Two `beach-road` instances on one private Redis, sharing a fresh secret (so either checks
//! the other's join codes), both ready when `start` returns.

use std::time::{Duration, Instant};

use futures::future::join_all;

use super::{uuid, RedisServer, Server, ServerBuilder, Session, Ws};

/// Field order: the servers are killed before Redis.
pub struct Pair {
    pub servers: Vec<Server>,
    _redis: RedisServer,
}

impl Pair {
    /// Both instances with `args` besides Redis and the secret; waits (10 s at most) until
    /// both are ready.
    pub async fn start<S: AsRef<str>>(args: &[S]) -> Pair {
        let redis = RedisServer::start();
        let secret = format!("pair-{}-{}", uuid(), uuid());
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let starts = (0..2).map(|_| {
            ServerBuilder::new()
                .redis_url(&redis.url())
                .args(args.clone())
                .args(["--secret", &secret])
                .start()
        });
        let servers = join_all(starts).await;
        for s in &servers {
            let until = Instant::now() + Duration::from_secs(10);
            while s.api().get("/ready").await.map(|r| r.status).ok() != Some(200) {
                assert!(Instant::now() < until, "instance not ready within 10 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Pair {
            servers,
            _redis: redis,
        }
    }

    /// HTTP join on instance `i`, then the socket of its token there (joined); returns the
    /// socket and the token.
    pub async fn joiner(&self, i: usize, session: &Session) -> (Ws, String) {
        let s = &self.servers[i];
        let token = s.api().join_token(&session.id, &session.code).await;
        let mut ws = Ws::connect(&s.ws_url(&token)).await;
        ws.join(Some(&session.code)).await;
        (ws, token)
    }
}
