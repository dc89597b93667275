//! A private `redis-server` per test: a free loopback port, no persistence, killed on drop.
//! Never the system Redis on 6379, never a mock.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/bin/redis-server";
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Its working directory (`--dir`), where a replica's full resync writes an RDB file.
    dir: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits (bounded) until it accepts connections.
    pub fn start() -> Self {
        Self::start_with_dir(None)
    }

    /// As [`RedisServer::start`], working in `dir` (for replication, which writes files).
    pub fn start_in(dir: &std::path::Path) -> Self {
        Self::start_with_dir(Some(dir.to_owned()))
    }

    fn start_with_dir(dir: Option<std::path::PathBuf>) -> Self {
        let mut s = Self {
            port: free_port(),
            child: None,
            dir,
        };
        s.spawn();
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut cmd = Command::new(BINARY);
            if let Some(dir) = &self.dir {
                cmd.arg("--dir").arg(dir);
            }
            let child = cmd
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            self.child = Some(child);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
                if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                    break; // exited (port taken after a restart race?): try again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            self.child = None;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, and wait (bounded) until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server if running and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A plain client connection for inspecting or poking the server from a test.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An in-process engine's settings for the Redis at `url`: key prefix `t`, a heartbeat every
/// 200 ms, written off after 2 s.
pub fn engine_settings(url: &str) -> beach_road::engine::redis::RedisSettings {
    beach_road::engine::redis::RedisSettings {
        url: url.to_owned(),
        key_prefix: "t".into(),
        heartbeat_interval: Duration::from_millis(200),
        instance_timeout: Duration::from_secs(2),
    }
}

/// A Redis engine in this test's own process, once it is ready (within 5 s).
pub async fn ready_engine(
    config: beach_road::engine::EngineConfig,
    settings: beach_road::engine::redis::RedisSettings,
) -> beach_road::engine::redis::RedisEngine {
    use beach_road::engine::Engine as _;
    let e = beach_road::engine::redis::RedisEngine::start(config, settings)
        .await
        .expect("valid URL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.ready().await.is_err() {
        assert!(Instant::now() < deadline, "engine not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e
}
