//! systemd integration: READY=1 once serving, and WATCHDOG=1 sent from inside the async
//! runtime, so a frozen process stops feeding the watchdog and systemd restarts it.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{bounded, Server, TempDir};
use tokio::net::UnixDatagram;

/// A server started as systemd starts a unit with `WatchdogSec`: `WATCHDOG_PID` names the
/// service's own pid, so the shell exports its pid and `exec`s the binary in its place.
struct Supervised(std::process::Child);

impl Supervised {
    async fn start(notify: &std::path::Path, watchdog_usec: u64) -> Self {
        let port = common::free_port();
        let script = format!(
            "export WATCHDOG_PID=$$; exec '{}' --bind 127.0.0.1 --port {port}",
            env!("CARGO_BIN_EXE_beach-road")
        );
        let child = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", watchdog_usec.to_string())
            .env_remove("REDIS_URL")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn beach-road");
        let server = Supervised(child);
        let url = format!("http://127.0.0.1:{port}/health");
        for _ in 0..100 {
            if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("beach-road did not start");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, sig) }, 0);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A systemd notify socket (`NOTIFY_SOCKET`) in a fresh temp dir: the dir, the socket's path,
/// and the socket. Keep the dir until the server is gone.
fn notify_socket() -> (TempDir, PathBuf, UnixDatagram) {
    let dir = TempDir::new("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (dir, path, sock)
}

/// Datagrams received on the notify socket within `window`.
async fn collect(sock: &UnixDatagram, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => break,
        }
    }
    out
}

fn count(msgs: &[String], what: &str) -> usize {
    msgs.iter().filter(|m| m.lines().any(|l| l == what)).count()
}

#[tokio::test]
async fn watchdog_is_fed_from_the_runtime_and_stops_while_frozen() {
    bounded(async {
        let (dir, path, sock) = notify_socket();
        // WatchdogSec=1s: the server should notify about every 500 ms.
        let server = Supervised::start(&path, 1_000_000).await;

        let running = collect(&sock, Duration::from_millis(2500)).await;
        assert!(
            count(&running, "WATCHDOG=1") >= 2,
            "watchdog not fed: {running:?}"
        );

        server.signal(libc::SIGSTOP);
        let _in_flight = collect(&sock, Duration::from_millis(200)).await;
        let frozen = collect(&sock, Duration::from_millis(2000)).await;
        assert_eq!(
            count(&frozen, "WATCHDOG=1"),
            0,
            "fed while frozen: {frozen:?}"
        );

        server.signal(libc::SIGCONT);
        let resumed = collect(&sock, Duration::from_millis(2000)).await;
        assert!(
            count(&resumed, "WATCHDOG=1") >= 1,
            "not resumed: {resumed:?}"
        );
        drop(server);
        drop(dir);
    })
    .await;
}

#[tokio::test]
async fn ready_is_notified_once_serving() {
    bounded(async {
        let (dir, path, sock) = notify_socket();
        let server = Server::builder()
            .env("NOTIFY_SOCKET", path.to_str().unwrap())
            .start()
            .await;
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
            .await
            .expect("READY=1 within 3 s")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
        drop(server);
        drop(dir);
    })
    .await;
}
