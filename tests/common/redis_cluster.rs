//! A private Redis Cluster per test: three primaries and three replicas on free loopback ports,
//! no persistence, every process killed on drop. Never the system Redis, never a mock. With
//! `start_tls`, TLS only: clients, the cluster bus and replication.
//!
//! Roles (which port is a primary, which owns a slot) are always asked of the cluster
//! (`CLUSTER NODES`), never remembered: failovers, migrations and restarts change them. Every
//! wait is bounded and panics with what was still missing and where the node logs are.

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/bin/redis-server";
const CLI: &str = "/usr/bin/redis-cli";
const NODES: usize = 6;
/// Until a spawned node answers PING.
const NODE_START: Duration = Duration::from_secs(5);
/// Until the cluster has converged after a start, a migration or a restart.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// Connect, read and write timeout of every inspecting connection.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// What a node's `CLUSTER INFO` says once it serves every slot.
const OK_INFO: [&str; 3] = [
    "cluster_state:ok",
    "cluster_slots_assigned:16384",
    "cluster_slots_ok:16384",
];

struct Node {
    port: u16,
    /// `None` while killed.
    child: Option<Child>,
}

pub struct RedisCluster {
    /// Every node's `--dir`: `nodes-P.conf`, `P.log`, `dump-P.rdb`, and `create.log`.
    dir: PathBuf,
    nodes: Vec<Node>,
    /// TLS only (`start_tls`): the directory of `ca.pem`, `redis.pem` and `redis.key`.
    tls: Option<PathBuf>,
}

impl RedisCluster {
    /// Six nodes made a cluster by `redis-cli --cluster create … --cluster-replicas 1`; returns
    /// once it has converged (see `converged`). Retries on fresh ports if one was taken meanwhile.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// As [`RedisCluster::start`], but TLS only: clients, the cluster bus (port P + 10000) and
    /// replication, on the certificates of `certs` (`common::tls::make_certs(certs, "redis")`).
    pub fn start_tls(certs: &Path) -> Self {
        Self::start_with(Some(certs.to_owned()))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        let mut why = String::new();
        for _ in 0..3 {
            let ports = free_ports();
            let nodes = ports.iter().map(|&port| Node { port, child: None });
            let mut c = RedisCluster {
                dir: fresh_dir(),
                nodes: nodes.collect(),
                tls: tls.clone(),
            };
            let created = (0..NODES).try_for_each(|i| c.spawn(i));
            match created.and_then(|()| c.create()) {
                Ok(()) => {
                    c.wait_converged(READY_TIMEOUT, "start");
                    return c;
                }
                Err(e) => why = e, // dropping `c` kills what was started
            }
        }
        panic!("redis cluster did not start: {why}");
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/` (`rediss+cluster://` with TLS):
    /// the current primaries.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.primaries().iter().map(addr).collect();
        format!("{}+cluster://{}/", self.scheme(), seeds.join(","))
    }

    /// `redis://127.0.0.1:P/` (`rediss://` with TLS) of every running node.
    pub fn node_urls(&self) -> Vec<String> {
        let url = |p| format!("{}://{}/", self.scheme(), addr(p));
        self.live().iter().map(url).collect()
    }

    /// A plain (non-cluster) client of one node; with TLS it trusts the test CA.
    pub fn client_for(&self, port: u16) -> redis::Client {
        let url = format!("{}://{}/", self.scheme(), addr(&port));
        let client = match &self.tls {
            None => redis::Client::open(url),
            Some(certs) => {
                let ca = std::fs::read(certs.join("ca.pem")).expect("read ca.pem");
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca),
                };
                redis::Client::build_with_tls(url, certs)
            }
        };
        client.unwrap()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The running primaries owning slots, in slot order.
    pub fn primaries(&self) -> Vec<u16> {
        let (live, mut owners) = (self.live(), Vec::new());
        for e in self.view() {
            match e.slots.first() {
                Some(r) if e.primary && live.contains(&e.port) => owners.push((r.0, e.port)),
                _ => {}
            }
        }
        owners.sort();
        owners.into_iter().map(|(_, port)| port).collect()
    }

    /// The running replicas.
    pub fn replicas(&self) -> Vec<u16> {
        let live = self.live();
        let view = self.view();
        let running = view.iter().filter(|e| !e.primary && live.contains(&e.port));
        running.map(|e| e.port).collect()
    }

    /// Some primary other than `port`.
    pub fn other_primary(&self, port: u16) -> u16 {
        let others = self.primaries().into_iter().filter(|p| *p != port);
        others.min().expect("a second primary")
    }

    /// The hash slot of `key` as Redis computes it: CRC16-XMODEM of the key, or of its hash tag
    /// (between the first `{` and the next `}`, if not empty), mod 16384. (redis-rs's
    /// `cluster_routing::Slot::for_key` keeps the number private.)
    pub fn slot_of(key: &str) -> u16 {
        let k = key.as_bytes();
        let tag = k.iter().position(|b| *b == b'{').and_then(|open| {
            let len = k[open + 1..].iter().position(|b| *b == b'}')?;
            (len > 0).then(|| &k[open + 1..open + 1 + len])
        });
        let mut crc: u16 = 0;
        for b in tag.unwrap_or(k) {
            crc ^= (*b as u16) << 8;
            for _ in 0..8 {
                crc = (crc << 1) ^ if crc & 0x8000 != 0 { 0x1021 } else { 0 };
            }
        }
        crc % 16384
    }

    /// The port of the primary owning `slot`, as the cluster sees it now.
    pub fn primary_of_slot(&self, slot: u16) -> u16 {
        let owns = |e: &Entry| e.primary && e.slots.iter().any(|r| (r.0..=r.1).contains(&slot));
        let owner = self.view().into_iter().find(owns);
        owner
            .unwrap_or_else(|| panic!("no node owns slot {slot}"))
            .port
    }

    /// SIGKILLs the primary owning `slot` (dead until [`RedisCluster::restart_all`]) and waits
    /// until its replica owns the slot and the survivors have converged. Returns the time from
    /// the kill. A shard whose replica was promoted has none left to fail over to (panics).
    pub fn kill_primary_and_wait_failover(&mut self, slot: u16) -> Duration {
        let port = self.primary_of_slot(slot);
        let t = Instant::now();
        self.kill(self.nodes.iter().position(|n| n.port == port).unwrap());
        let what = format!("failover of slot {slot} from {port}");
        self.wait_converged(FAILOVER_TIMEOUT, &what);
        t.elapsed()
    }

    /// Moves `slot` to the primary `to_port` the standard way: IMPORTING on the target,
    /// MIGRATING on the source, `MIGRATE` of every key, `SETSLOT … NODE` on the target, the
    /// source and the other primaries; returns once every node agrees.
    ///
    /// `pause` is slept after the keys moved, before the handover: in that window the source
    /// still owns the slot but holds none of its keys, so every command on them, and on new
    /// keys, is answered `-ASK` (run this on a thread to relay meanwhile). Usually `ZERO`.
    pub fn migrate_slot(&self, slot: u16, to_port: u16, pause: Duration) {
        let (from, primaries) = (self.primary_of_slot(slot), self.primaries());
        assert_ne!(from, to_port, "slot {slot} is already on {to_port}");
        assert!(primaries.contains(&to_port), "{to_port} is not a primary");
        let (from_id, to_id) = (self.id_of(from), self.id_of(to_port));
        let setslot = |port: u16, how: &str| {
            let node = self.client_for(port);
            let r = ask::<()>(&node, &format!("CLUSTER SETSLOT {slot} {how}"));
            r.unwrap_or_else(|e| panic!("SETSLOT {slot} {how} on {port}: {e}"))
        };
        setslot(to_port, &format!("IMPORTING {from_id}"));
        setslot(from, &format!("MIGRATING {to_id}"));
        self.move_keys(slot, from, to_port);
        std::thread::sleep(pause);
        // A key set on the source bypassing ASK in the window would be lost in the handover.
        self.move_keys(slot, from, to_port);
        // The target first (it bumps its config epoch), then the source (it stops answering ASK).
        let others = primaries.iter().filter(|p| ![from, to_port].contains(p));
        for &port in [to_port, from].iter().chain(others) {
            setslot(port, &format!("NODE {to_id}"));
        }
        self.wait_converged(READY_TIMEOUT, &format!("migration of slot {slot}"));
        assert!(
            self.primary_of_slot(slot) == to_port,
            "slot {slot} did not move"
        );
    }

    /// A full outage: SIGKILLs every node.
    pub fn kill_all(&mut self) {
        (0..NODES).for_each(|i| self.kill(i));
    }

    /// Starts every node again (also one killed by a failover: it rejoins as a replica) on its
    /// port with its `nodes-P.conf`: the cluster configuration survives, the data does not.
    /// Running nodes are killed first. Returns once the cluster has converged again.
    pub fn restart_all(&mut self) {
        self.kill_all();
        for i in 0..NODES {
            // Retried: the port may be briefly taken (an outgoing connection's ephemeral port).
            let up = poll(READY_TIMEOUT, || self.spawn(i));
            up.unwrap_or_else(|e| panic!("redis cluster restart: {e}"));
        }
        self.wait_converged(READY_TIMEOUT, "restart");
    }

    fn live(&self) -> Vec<u16> {
        let running = self.nodes.iter().filter(|n| n.child.is_some());
        running.map(|n| n.port).collect()
    }

    fn id_of(&self, port: u16) -> String {
        ask(&self.client_for(port), "CLUSTER MYID").unwrap_or_else(|e| panic!("{port}: {e}"))
    }

    /// `CLUSTER NODES` of the first running node that answers.
    fn view(&self) -> Vec<Entry> {
        let answer = |p| ask(&self.client_for(p), "CLUSTER NODES").ok();
        let nodes = self.live().into_iter().find_map(answer);
        parse_nodes(nodes.expect("a node answering"))
    }

    /// Spawns node `i` and waits until it answers PING (by then it also bound its bus port).
    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let port = self.nodes[i].port;
        // Relative paths are within `--dir`, which redis-server enters as it reads it; the
        // dbfilename is per node as a replica's full sync writes it. Without
        // `repl-diskless-sync-delay 0` a primary waits 5 s for more replicas before a full sync.
        let args = format!(
            "--bind 127.0.0.1 --cluster-enabled yes --cluster-node-timeout 1000 \
             --cluster-config-file nodes-{port}.conf --logfile {port}.log --appendonly no \
             --dbfilename dump-{port}.rdb --repl-diskless-sync-delay 0"
        );
        let mut cmd = Command::new(SERVER);
        cmd.arg("--dir").arg(&self.dir).args(args.split(' '));
        match &self.tls {
            None => cmd.arg("--port").arg(port.to_string()),
            // The cluster bus (port + 10000) and replication go over TLS too; no client certs.
            Some(certs) => cmd
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(["--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(certs.join("redis.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.pem")),
        };
        cmd.args(["--save", ""]).stdin(Stdio::null());
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let child = child.map_err(|e| format!("{SERVER}: {e}"))?;
        let node = self.client_for(port);
        let child = self.nodes[i].child.insert(child);
        let up = poll(NODE_START, || match ask::<String>(&node, "PING") {
            Ok(_) => Ok(None),
            Err(e) => child.try_wait().ok().flatten().map(Some).ok_or(e),
        });
        match &up {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => self.nodes[i].child = None,
            Err(_) => self.kill(i),
        }
        Err(format!("redis-server on {port}: {up:?} (see {port}.log)"))
    }

    /// SIGKILL and reap (which also releases its lock on its nodes.conf).
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli --cluster create`, bounded: it would wait for the nodes to meet forever.
    fn create(&self) -> Result<(), String> {
        let log = self.dir.join("create.log");
        let out = File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(CLI);
        if let Some(certs) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(certs.join("ca.pem"));
        }
        cmd.args(["--cluster", "create"]);
        cmd.args(self.nodes.iter().map(|n| addr(&n.port)));
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"]);
        cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap());
        let mut cli = cmd.stderr(out).spawn().map_err(|e| format!("{CLI}: {e}"))?;
        let exited = || cli.try_wait().ok().flatten().ok_or("timed out".to_owned());
        let why = match poll(READY_TIMEOUT, exited) {
            Ok(status) if status.success() => return Ok(()),
            Ok(status) => status.to_string(),
            Err(e) => e,
        };
        let _ = cli.kill();
        let _ = cli.wait();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("redis-cli --cluster create: {why}\n{text}"))
    }

    /// Moves every key of `slot` (MIGRATING on `from`, IMPORTING on `to`) from `from` to `to`.
    fn move_keys(&self, slot: u16, from: u16, to: u16) {
        let node = self.client_for(from);
        loop {
            let get = format!("CLUSTER GETKEYSINSLOT {slot} 100");
            let keys: Vec<Vec<u8>> = ask(&node, &get).unwrap_or_else(|e| panic!("{from}: {e}"));
            if keys.is_empty() {
                return;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(to).arg("").arg(0).arg(5000);
            let r = query::<()>(&node, migrate.arg("KEYS").arg(&keys));
            r.unwrap_or_else(|e| panic!("MIGRATE on {from}: {e}"));
        }
    }

    fn wait_converged(&self, limit: Duration, what: &str) {
        if let Err(why) = poll(limit, || self.converged()) {
            let dir = self.dir.display();
            panic!("redis cluster: {what} not done within {limit:?}: {why} (logs in {dir})");
        }
    }

    /// `Ok` once every running node says `cluster_state:ok` with all 16384 slots assigned and
    /// served, sees every running node healthy and no slot on a dead node, agrees with the
    /// others on slots and roles, and (a replica) has its link to its primary up.
    fn converged(&self) -> Result<(), String> {
        let (live, mut agreed) = (self.live(), None);
        for &port in &live {
            let node = self.client_for(port);
            let info: String = ask(&node, "CLUSTER INFO")?;
            let missing = |w: &&str| !info.lines().any(|l| l.trim() == *w);
            if let Some(want) = OK_INFO.into_iter().find(missing) {
                return Err(format!("{port}: not {want}"));
            }
            let view = parse_nodes(ask(&node, "CLUSTER NODES")?);
            let summary = summarize(&view, &live).map_err(|e| format!("{port} sees {e}"))?;
            let first = agreed.get_or_insert_with(|| summary.clone());
            if *first != summary {
                return Err(format!("views differ: [{first}] vs [{summary}] of {port}"));
            }
            if view.iter().any(|e| e.myself && !e.primary) {
                let repl: String = ask(&node, "INFO replication")?;
                if !repl.lines().any(|l| l.trim() == "master_link_status:up") {
                    return Err(format!("replica {port}: link to its primary not up"));
                }
            }
        }
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
        // Left while panicking, for the node logs (as the other harness temp files are).
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One line of `CLUSTER NODES`.
struct Entry {
    id: String,
    port: u16,
    myself: bool,
    primary: bool,
    /// A replica's primary id (`-` for a primary).
    of: String,
    /// Flagged `fail`, `fail?`, `handshake` or `noaddr`.
    unhealthy: bool,
    /// Owned ranges, inclusive, ascending; without the `[slot->-id]` migration markers.
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(text: String) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let flags: Vec<&str> = f[2].split(',').collect();
        let addr = f[1].split('@').next().unwrap(); // `ip:port@bus[,hostname]`
        let range = |s: &&str| {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let bad = ["fail", "fail?", "handshake", "noaddr"];
        let slots = f[8..].iter().filter(|s| !s.starts_with('['));
        entries.push(Entry {
            id: f[0].to_owned(),
            port: addr.rsplit(':').next().unwrap().parse().unwrap_or(0),
            myself: flags.contains(&"myself"),
            primary: flags.contains(&"master"),
            of: f[3].to_owned(),
            unhealthy: flags.iter().any(|f| bad.contains(f)),
            slots: slots.map(range).collect(),
        });
    }
    entries
}

/// The running nodes' roles and slots in one view, e.g. `P1 0-5460 | P4 of P1 | …`; an error if
/// a running node is missing or unhealthy in it, or a dead node still owns slots.
fn summarize(view: &[Entry], live: &[u16]) -> Result<String, String> {
    let dead_owner = |e: &&Entry| !e.slots.is_empty() && !live.contains(&e.port);
    if let Some(e) = view.iter().find(dead_owner) {
        return Err(format!("dead node {} still owning slots", e.port));
    }
    let mut parts = Vec::new();
    for &port in live {
        let e = view.iter().find(|e| e.port == port);
        let e = e.ok_or(format!("no node {port}"))?;
        if e.unhealthy {
            return Err(format!("{port} unhealthy"));
        }
        parts.push(if e.primary {
            let ranges: Vec<String> = e.slots.iter().map(|r| format!("{}-{}", r.0, r.1)).collect();
            format!("{port} {}", ranges.join(","))
        } else {
            let of = view.iter().find(|p| p.id == e.of).map_or(0, |p| p.port);
            format!("{port} of {of}")
        });
    }
    Ok(parts.join(" | "))
}

/// Calls `f` every 50 ms until it is `Ok`, or `limit` has passed (then its last error).
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            done => return done,
        }
    }
}

/// `127.0.0.1:port`
fn addr(port: &u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A command of space-separated words, as [`query`].
fn ask<T: redis::FromRedisValue>(node: &redis::Client, words: &str) -> Result<T, String> {
    let mut cmd = redis::Cmd::new();
    for w in words.split(' ') {
        cmd.arg(w);
    }
    query(node, &cmd)
}

/// One command on a fresh connection to `node` (see `client_for`), bounded by [`IO_TIMEOUT`].
fn query<T: redis::FromRedisValue>(node: &redis::Client, cmd: &redis::Cmd) -> Result<T, String> {
    let con = node.get_connection_with_timeout(IO_TIMEOUT);
    let mut con = con.map_err(|e| e.to_string())?;
    let _ = con.set_read_timeout(Some(IO_TIMEOUT));
    let _ = con.set_write_timeout(Some(IO_TIMEOUT));
    cmd.query(&mut con).map_err(|e| e.to_string())
}

/// Six ports P < 55535 with P and its cluster bus port P + 10000 free a moment ago; all held
/// until the six are found, so they differ.
fn free_ports() -> Vec<u16> {
    let (mut held, mut ports) = (Vec::new(), Vec::new());
    while ports.len() < NODES && held.len() < 1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().unwrap().port();
        if port < 55535 {
            if let Ok(bus) = TcpListener::bind(("127.0.0.1", port + 10000)) {
                ports.push(port);
                held.push(bus);
            }
        }
        held.push(l);
    }
    assert_eq!(ports.len(), NODES, "no free port pairs for a redis cluster");
    ports
}

fn fresh_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("beach-road-redis-cluster-{}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir); // a leftover of an earlier process with this pid
    std::fs::create_dir_all(&dir).expect("create the cluster's directory");
    dir
}
