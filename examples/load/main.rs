//! Load generator behind `scripts/bench`: drives running servers over loopback (beach-road, or
//! matchbox_server for comparison) and prints figures as `label key value` lines on stdout, which
//! `load report` turns into the table. It never decides pass or fail.
//!
//! ```text
//! load burst  --pairs 50 --signals 2000   # fire-all signals per pair: throughput, lost, errors, CPU
//! load paced  --pairs 50 --rate 5000 --secs 5   # stamped signals at a total rate: latency
//! load idle   --peers 10000 --group 10     # server RSS per joined idle peer
//! load joins  --peers 2000 --group 10 --concurrency 50   # connect → join_success latency
//!             [--prefix join_one --concurrency 1]        # (one at a time: no queueing)
//! load flood  --signals 20000              # server RSS growth while a peer stops reading
//! load report <results-file>               # medians of the runs, the table and the targets
//! ```
//! Common options: `--kind beach|matchbox`, `--host URL`, `--joiner URL` (the instance the joiners
//! use; defaults to the host's), `--pids P[,P]` (server processes to measure), `--redis-pid P`,
//! `--clk-tck N` (`getconf CLK_TCK`), `--label L` (the first word of every printed line).
//! Every command also prints `foreign_cores`: the CPU other processes of the machine took meanwhile.
//! URLs are `http://127.0.0.1:PORT`. Signals carry a 256-byte JSON payload stamped with the send
//! time; sender and receiver share this process's clock.

mod flood;
mod net;
mod peers;
mod report;
mod stream;
mod sys;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// `cmd --key value ... [positional ...]`.
pub struct Args {
    pub cmd: String,
    opts: HashMap<String, String>,
    pub rest: Vec<String>,
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let cmd = it.next().unwrap_or_default();
        let mut opts = HashMap::new();
        let mut rest = Vec::new();
        while let Some(a) = it.next() {
            match a.strip_prefix("--") {
                Some(key) => {
                    opts.insert(key.to_owned(), it.next().unwrap_or_default());
                }
                None => rest.push(a),
            }
        }
        Args { cmd, opts, rest }
    }

    pub fn get<T: FromStr>(&self, key: &str, default: T) -> T {
        match self.opts.get(key) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("--{key}: cannot parse {v:?}")),
            None => default,
        }
    }

    pub fn str(&self, key: &str) -> String {
        self.opts.get(key).cloned().unwrap_or_default()
    }

    /// Comma-separated process ids.
    pub fn pids(&self, key: &str) -> Vec<u32> {
        self.str(key)
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }
}

/// One figure, `label key value`, for `load report`.
pub fn emit(label: &str, key: &str, value: f64) {
    println!("{label} {key} {value}");
}

fn main() {
    let args = Args::parse();
    if args.cmd == "report" {
        report::run(&args);
        return;
    }
    // The load's own descriptor table, grown once before its threads exist: else its connects
    // stall at every doubling of the table (see `beach_road::descriptors`), and the join figures
    // of every server measured would show the load's stalls.
    let (fd_limit, _) = beach_road::descriptors::raise_limit();
    if let Err(e) = beach_road::descriptors::presize_table(1 << 16, fd_limit) {
        eprintln!("load: cannot size the descriptor table: {e}");
    }
    // One runtime for every socket. The load shares the machine's cores with the servers.
    let threads = args.get("threads", 2usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    let limit = Duration::from_secs(args.get("give-up", 120u64));
    let mut ours = args.pids("pids");
    ours.extend(args.pids("redis-pid"));
    let foreign = sys::Foreign::start(ours);
    let done = rt.block_on(async {
        tokio::time::timeout(limit, async {
            match args.cmd.as_str() {
                "burst" => stream::burst(&args).await,
                "paced" => stream::paced(&args).await,
                "idle" => peers::idle(&args).await,
                "joins" => peers::joins(&args).await,
                "flood" => flood::flood(&args).await,
                _ => eprintln!("usage: see the module docs of examples/load/main.rs"),
            }
        })
        .await
    });
    // Sockets still open are dropped with the runtime, without waiting for their tasks.
    rt.shutdown_background();
    let cores = foreign.cores(args.get("clk-tck", 100f64));
    emit(
        &args.str("label"),
        "foreign_cores",
        (cores * 100.0).round() / 100.0,
    );
    if done.is_err() {
        eprintln!("load {}: gave up after {} s", args.cmd, limit.as_secs());
        std::process::exit(1);
    }
}
