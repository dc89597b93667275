//! `rediss+cluster://` works: ElastiCache with cluster mode and encryption in transit requires
//! TLS on every node. A private Redis Cluster (three primaries, three replicas) listens with TLS
//! only, its bus and replication included, on a certificate from a throwaway CA that the
//! instances trust through `SSL_CERT_FILE` (read by rustls-native-certs). Two instances on it
//! share a session and relay a signal between them.

mod common;

use std::time::Duration;

use serde_json::json;

use common::{bounded_for, url_id, uuid, RedisCluster, Server, ServerBuilder, TempDir, Ws};

/// Certificates, a TLS cluster (`start_tls`, converged) and the instances: ~5 s; slack for a
/// loaded machine.
const LIMIT: Duration = Duration::from_secs(60);
const READY_WITHIN: Duration = Duration::from_secs(10);

async fn wait_ready(server: &Server, i: usize) {
    let api = server.api();
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    while !api.get("/ready").await.is_ok_and(|r| r.status == 200) {
        let late = tokio::time::Instant::now() > deadline;
        assert!(!late, "instance {i} not ready over TLS:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_urls_work() {
    bounded_for(LIMIT, async {
        let certs = TempDir::new("cluster-tls");
        let redis = tokio::task::block_in_place(|| {
            common::tls::make_certs(certs.path(), "redis");
            RedisCluster::start_tls(certs.path())
        });
        let url = redis.url();
        assert!(url.starts_with("rediss+cluster://"), "{url}");
        let ca = certs.join("ca.pem");
        let secret = format!("tls-{}-{}", uuid(), uuid());
        let starts = (0..2).map(|_| {
            ServerBuilder::new()
                .redis_url(&url)
                .env("SSL_CERT_FILE", ca.to_str().unwrap())
                .args(["--secret", &secret])
                .start()
        });
        let servers = futures::future::join_all(starts).await;
        for (i, server) in servers.iter().enumerate() {
            wait_ready(server, i).await;
        }
        let (api0, api1) = (servers[0].api(), servers[1].api());

        // A session registered on one instance is joined on the other.
        let id = uuid();
        let reg = api0.register(&id, Some("TLSOK1")).await;
        assert_eq!(reg["success"], true, "{reg}");
        let joined = api1.join_http(&id, Some("TLSOK1")).await;
        assert_eq!(joined["success"], true, "{joined}");

        // A signal relayed across them: the host on instance 0, the joiner on instance 1.
        let signaling = |v: &serde_json::Value, at: &str| {
            let url = v.pointer(at).and_then(|u| u.as_str());
            url_id(url.unwrap_or_else(|| panic!("no {at} in {v}")))
        };
        let host_token = signaling(&reg, "/transports/0/metadata/signaling_url");
        let joiner_token = signaling(&joined, "/webrtc_offer/signaling_url");
        let mut host = Ws::connect(&servers[0].ws_url(&host_token)).await;
        host.join(None).await;
        let mut joiner = Ws::connect(&servers[1].ws_url(&joiner_token)).await;
        joiner.join(None).await;
        host.recv_type("peer_joined").await;
        let to = joiner.id();
        host.send_json(json!({"type": "signal", "to_peer": to, "signal": {"a": 1}}))
            .await;
        let got = joiner.recv_type("signal").await;
        assert_eq!(got["signal"], json!({"a": 1}), "{got}");

        // The servers are killed before the cluster, the cluster before its certificates.
        drop((host, joiner, servers, redis, certs));
    })
    .await;
}
