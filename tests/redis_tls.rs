//! `rediss://` works: ElastiCache with encryption in transit (terraform/) needs TLS. A private
//! redis-server listens with TLS only, on a certificate from a throwaway CA that the server
//! trusts through `SSL_CERT_FILE` (read by rustls-native-certs).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{bounded, free_port, Server, TempDir};

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn rediss_urls_work() {
    bounded(async {
        let dir = TempDir::new("tls");
        common::tls::make_certs(dir.path(), "redis");
        let port = free_port();
        let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        let redis = Redis(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .args([
                    "--tls-cert-file",
                    &path("redis.pem"),
                    "--tls-key-file",
                    &path("redis.key"),
                ])
                .args([
                    "--tls-ca-cert-file",
                    &path("ca.pem"),
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server"),
        );
        let server = Server::builder()
            .redis_url(&format!("rediss://localhost:{port}"))
            .env("SSL_CERT_FILE", &path("ca.pem"))
            .start()
            .await;
        let api = server.api();
        let mut ready = false;
        for _ in 0..100 {
            if api.get("/ready").await.is_ok_and(|r| r.status == 200) {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "not ready over TLS:\n{}", server.log());
        let id = common::uuid();
        let reg = api.register(&id, Some("TLSOK1")).await;
        assert_eq!(reg["success"], true, "{reg}");
        let joined = api.join_http(&id, Some("TLSOK1")).await;
        assert_eq!(joined["success"], true, "{joined}");
        drop(server);
        drop(redis);
        drop(dir);
    })
    .await;
}
