//! What the servers cost, read from /proc: CPU time and resident memory of a process.

use std::sync::OnceLock;
use std::time::Instant;

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// CPU ticks of several processes together.
pub fn cpu_ticks_sum(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| cpu_ticks(p)).sum()
}

/// CPU time of `pid`'s live threads in nanoseconds (the first field of each
/// /proc/PID/task/TID/schedstat), or its clock ticks in nanoseconds where the kernel keeps no
/// schedstat. Ticks are 10 ms: a tenth of a µs per message over a burst of 100,000 (a 0.15 s
/// burst on a fast machine is 15 ticks a core). A thread that ends in between takes its time
/// with it: the servers' threads (tokio workers, Redis's) live as long as they do.
pub fn cpu_ns(pid: u32, clk_tck: f64) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let mut total = None;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            *total.get_or_insert(0) += ns;
        }
    }
    total.unwrap_or_else(|| (cpu_ticks(pid) as f64 * 1e9 / clk_tck) as u64)
}

/// CPU nanoseconds of several processes together.
pub fn cpu_ns_sum(pids: &[u32], clk_tck: f64) -> u64 {
    pids.iter().map(|&p| cpu_ns(p, clk_tck)).sum()
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn rss_kib_sum(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

/// Microseconds since this process's first call: the one clock of stamps and receipts.
pub fn now_us() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The `p` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// CPU ticks the whole machine spent busy (user, nice, system, steal; interrupt time is left
/// out, as the processes' own counts leave it out).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    [0, 1, 2, 7].iter().filter_map(|&i| f.get(i)).sum()
}

/// How much CPU the rest of the machine took while a figure ran (other builds or tests compete
/// with the servers and the load for the same cores, and the figures then mean less).
pub struct Foreign {
    busy: u64,
    ours: u64,
    pids: Vec<u32>,
    start: Instant,
}

impl Foreign {
    /// `pids`: the measured servers; this process counts as ours too.
    pub fn start(mut pids: Vec<u32>) -> Foreign {
        pids.push(std::process::id());
        Foreign {
            busy: machine_busy_ticks(),
            ours: cpu_ticks_sum(&pids),
            pids,
            start: Instant::now(),
        }
    }

    /// Cores' worth of CPU used by other processes since `start`.
    pub fn cores(&self, clk_tck: f64) -> f64 {
        let busy = machine_busy_ticks().saturating_sub(self.busy);
        let ours = cpu_ticks_sum(&self.pids).saturating_sub(self.ours);
        busy.saturating_sub(ours) as f64 / clk_tck / self.start.elapsed().as_secs_f64().max(1e-3)
    }
}
